"""Flow of solution procedure (Yim, Joo, Bae & Kim, CVPR 2017, "A Gift from Knowledge
Distillation: Fast Optimization, Network Minimization and Transfer Learning")."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from .common import (FeatureDistiller, check_reduction, check_weight, hint_list, match_spatial,
                     spatial_rank)


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """Gram matrix (B, C1, C2) between two feature maps of one network: ``G[i, j] = mean over
    positions of first_i * second_j``. The larger map is average pooled to the smaller size;
    vectors (B, C) count as maps with one position."""
    if first.dim() != second.dim():
        raise ValueError(f"the two features have different numbers of spatial axes: "
                         f"{tuple(first.shape[1:])} and {tuple(second.shape[1:])}")
    if first.dim() == 2:
        first, second = first.unsqueeze(2), second.unsqueeze(2)
    first, second = match_spatial(first, second)
    a, b = first.flatten(2), second.flatten(2)
    return a @ b.transpose(1, 2) / a.shape[2]


def fsp_loss(student_fsp: Tensor, teacher_fsp: Tensor, reduction: str = "mean") -> Tensor:
    """Squared difference of two FSP matrices (B, C1, C2): per sample the mean over entries, so
    ``"mean"`` is RepDistiller's ``(G_s - G_t).pow(2).mean()`` (the paper's L2 up to a constant)."""
    if student_fsp.shape != teacher_fsp.shape:
        raise ValueError(f"FSP matrices differ in shape: student {tuple(student_fsp.shape)}, "
                         f"teacher {tuple(teacher_fsp.shape)}; FSP needs the same channel "
                         f"numbers in teacher and student")
    return check_reduction((student_fsp - teacher_fsp).pow(2).flatten(1).mean(dim=1), reduction)


class FSP(FeatureDistiller):
    """FSP: match the Gram matrices between consecutive stages of teacher and student.

    The features are ``[stem, *stages]`` of each network (RepDistiller's ``feat[:-1]``, so the
    first matrix pairs the stem with the first stage), paired position by position from the
    shallowest; for every two consecutive positions ``fsp_loss(G(s_j, s_{j+1}), G(t_j, t_{j+1}))``
    is summed. This needs at least two features on each side and *the same channel numbers* at
    each paired position (as the reference, which raises for unequal channels): e.g. resnet110
    -> resnet20 or, without stems, a ``cnn1d`` teacher with ``widths=(8, 16)`` for a
    ``cnn1d_small`` student. Spatial sizes are free (G has none). A ``ValueError`` names the
    mismatch at construction. No learnable parts.

    Preliminary stage: as in the paper and RepDistiller, the FSP loss first trains the student's
    feature modules (stem and stages, not the classifier) alone: the step returns only
    ``{"fsp_init": init_weight * FSP}``. By default (``init_stage="separate"``, RepDistiller's
    ``init``) this takes ``init_epochs`` (default 30) extra epochs before the main schedule,
    with its own SGD optimiser over those modules at the constant learning rate ``init_lr``
    (default: the main run's initial rate), the rest of the student in eval mode.
    ``init_stage="in_run"`` uses the first ``init_epochs`` epochs of the run instead (default:
    an eighth of it, see :mod:`.common`); ``init_epochs=0`` skips the stage.

    After the preliminary stage the reference trains with the classification loss alone
    (RepDistiller sets ``loss_kd = 0`` for FSP, so its script's ``-b 50`` has no effect): hence
    ``fsp_weight`` (the weight of an ``"fsp"`` term during distillation) defaults to 0, and the
    term is then left out. ``fsp_weight=50`` keeps it with the script's value; beware that FSP
    matrices of un-normalised features can be very large.

    Defaults: ``init_weight`` 1, ``fsp_weight`` 0, ``ce_weight`` 1, ``kd_weight`` 0 (T = 4),
    ``init_epochs`` None (30), ``init_stage`` "separate", ``init_lr`` None.
    """

    name = "fsp"
    has_init_stage = True

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 init_weight: float = 1.0, fsp_weight: float = 0.0,
                 init_epochs: int | None = None, init_stage: str = "separate",
                 init_lr: float | None = None, ce_weight: float = 1.0,
                 kd_weight: float = 0.0, temperature: float = 4.0,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature, teacher_layers=teacher_layers,
                         student_layers=student_layers, input_shape=input_shape,
                         init_epochs=init_epochs, init_stage=init_stage, init_lr=init_lr)
        self.fsp_weight = check_weight("fsp_weight", fsp_weight)
        self.init_weight = check_weight("init_weight", init_weight)
        self.need_stages(1)
        t_list, s_list = self.t_shapes.hint_list, self.s_shapes.hint_list
        for who, shapes in (("teacher", t_list), ("student", s_list)):
            if len(shapes) < 2:
                raise ValueError(f"fsp needs at least two features of the {who} ([stem, *stages]), "
                                 f"got {len(shapes)}; name more layers with "
                                 f"{who}_layers")
            ranks = {spatial_rank(s) for s in shapes}
            if len(ranks) > 1:
                raise ValueError(f"fsp needs {who} features with one number of spatial axes, "
                                 f"got {shapes}")
        #: feature positions in [stem, *stages] paired between teacher and student
        self.positions = list(range(min(len(t_list), len(s_list))))
        t_ch = [t_list[i][0] for i in self.positions]
        s_ch = [s_list[i][0] for i in self.positions]
        if t_ch != s_ch:
            raise ValueError(f"fsp needs the same channel numbers at the paired stages of teacher "
                             f"and student, got teacher {t_ch} and student {s_ch}; choose a "
                             f"student as wide as the teacher (e.g. cnn1d widths) or other layers "
                             f"with teacher_layers / student_layers")

    def fsp_total(self, s_feats, t_feats) -> Tensor:
        s_list, t_list = hint_list(s_feats), hint_list(t_feats)
        total = 0.0
        for a, b in zip(self.positions[:-1], self.positions[1:]):
            total = total + fsp_loss(fsp_matrix(s_list[a], s_list[b]),
                                     fsp_matrix(t_list[a], t_list[b]))
        return total

    def init_terms(self, s_feats, t_feats) -> dict[str, Tensor]:
        return {"fsp_init": self.init_weight * self.fsp_total(s_feats, t_feats)}

    def uses_teacher(self) -> bool:
        return self.fsp_weight > 0

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        if self.fsp_weight == 0:
            return {}
        return {"fsp": self.fsp_weight * self.fsp_total(s_feats, t_feats)}
