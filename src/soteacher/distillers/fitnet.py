"""FitNets (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, ICLR 2015, "FitNets: Hints for
Thin Deep Nets")."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from .common import FeatureDistiller, batch_norm, check_reduction, check_weight, conv


def fitnet_loss(student: Tensor, teacher: Tensor, reduction: str = "mean") -> Tensor:
    """Hint loss: squared error between the regressed student feature and the teacher's hint.

    Per sample the mean of ``(student - teacher)^2`` over all feature elements, so ``"mean"``
    equals ``F.mse_loss(student, teacher)``. Shapes must match: (B, ...).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"shapes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    per_sample = (student - teacher).pow(2).flatten(1).mean(dim=1)
    return check_reduction(per_sample, reduction)


class FitNet(FeatureDistiller):
    """FitNet hint learning: ``ce + fitnet_weight * MSE(regressor(student hint), teacher hint)``.

    The hint is one stage pair: ``hint_layer`` indexes the list of stage pairs (aligned from the
    deepest, see :mod:`.common`); by default the middle pair (``len(pairs) // 2``), like
    RepDistiller's ``hint_layer=2`` on three-stage ResNets. The learnable regressor (a 'same'
    3-wide convolution, batch norm and ReLU, as RepDistiller's ``ConvReg``; a linear layer for
    vector features) maps the student feature to the teacher's channels; it is trained with the
    student. Different spatial sizes are matched by average pooling the larger map; a map paired
    with a vector (CNN teacher, MLP student) is globally average pooled first.

    Deviation: the paper trains the hint in a separate first stage and then runs KD; like
    RepDistiller, the hint term is simply added to the classification loss for the whole run.

    Defaults (RepDistiller): ``fitnet_weight`` 100, ``ce_weight`` 1, ``kd_weight`` 0 (T = 4).
    """

    name = "fitnet"

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 fitnet_weight: float = 100.0, hint_layer: int | None = None,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature, teacher_layers=teacher_layers,
                         student_layers=student_layers, input_shape=input_shape)
        self.fitnet_weight = check_weight("fitnet_weight", fitnet_weight)
        self.need_stages()
        n = len(self.pairs)
        if hint_layer is None:
            hint_layer = n // 2
        if not -n <= int(hint_layer) < n:
            raise ValueError(f"hint_layer must index one of the {n} stage pair(s), got {hint_layer}")
        self.hint_layer = int(hint_layer)
        self.t_index, self.s_index = self.pairs[self.hint_layer]
        t_shape = self.t_shapes.stages[self.t_index]
        s_shape = self.s_shapes.stages[self.s_index]
        rank, _ = self.pair_layout(t_shape, s_shape, allow_global_pool=True)
        self.regressor = nn.Sequential(conv(rank, s_shape[0], t_shape[0], 3 if rank else 1),
                                       batch_norm(rank, t_shape[0]), nn.ReLU())

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        t, s = self.align(t_feats["stages"][self.t_index], s_feats["stages"][self.s_index])
        return {"fitnet": self.fitnet_weight * fitnet_loss(self.regressor(s), t)}
