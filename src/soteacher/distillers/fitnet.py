"""FitNets (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, ICLR 2015, "FitNets: Hints for
Thin Deep Nets")."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from .common import (FeatureDistiller, check_reduction, check_weight, conv_regressor, hint_list,
                     regressed_size, spatial_rank)


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

    The hint is the feature at position ``hint_layer`` of each network's ``[stem, *stages]`` list,
    RepDistiller's ``feat[hint_layer]`` (default 2: the second stage's output, e.g. 32x16x16 on
    ``resnet20``, 256x8x8 on ``vgg13``, 16x8x8 on ``mobilenetv2``); for models without a stem
    feature (MLP, plain CNNs, hooked modules) the index runs over the stages and defaults to the
    middle one. The learnable regressor is :func:`~.common.conv_regressor` with ReLU (one
    convolution chosen by the spatial sizes, batch norm, ReLU: RepDistiller's ``ConvReg``); it is
    trained with the student. A map paired with a vector (CNN teacher, MLP student) is globally
    average pooled first and regressed by a linear layer.

    Deviation from the paper, shared with RepDistiller: the paper trains the hint in a separate
    first stage and then runs KD; here, as in RepDistiller, the hint term is added to the
    classification loss for the whole run.

    Defaults (RepDistiller): ``fitnet_weight`` 100, ``hint_layer`` 2, ``ce_weight`` 1,
    ``kd_weight`` 0 (T = 4).
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
        t_list, s_list = self.t_shapes.hint_list, self.s_shapes.hint_list
        n = min(len(t_list), len(s_list))
        if hint_layer is None:
            with_stem = self.t_shapes.stem is not None and self.s_shapes.stem is not None
            hint_layer = min(2, n - 1) if with_stem else len(self.pairs) // 2
        if isinstance(hint_layer, bool) or int(hint_layer) != hint_layer or not 0 <= hint_layer < n:
            raise ValueError(f"hint_layer must index one of the {n} features [stem, *stages] "
                             f"both networks report (0..{n - 1}), got {hint_layer!r}")
        self.hint_layer = int(hint_layer)
        t_shape, s_shape = t_list[self.hint_layer], s_list[self.hint_layer]
        self.pair_layout(t_shape, s_shape, allow_global_pool=True)
        self.regressed = regressed_size(s_shape, t_shape)
        if self.regressed or spatial_rank(s_shape) != spatial_rank(t_shape):
            self.regressor = conv_regressor(s_shape, t_shape, relu=True)
        else:   # student map smaller than the teacher's: pool the teacher to the student's size
            self.regressor = conv_regressor(s_shape, (t_shape[0], *s_shape[1:]), relu=True)

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        t = hint_list(t_feats)[self.hint_layer]
        s = hint_list(s_feats)[self.hint_layer]
        if self.regressed:
            s = self.regressor(s)
        else:
            t, s = self.align(t, s)
            s = self.regressor(s)
        return {"fitnet": self.fitnet_weight * fitnet_loss(s, t)}
