"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention:
Improving the Performance of Convolutional Neural Networks via Attention Transfer")."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .common import FeatureDistiller, check_positive, check_reduction, check_weight, match_spatial


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention of a map (B, C, *spatial): ``mean_c |f_c|^p``, flattened, unit L2 norm."""
    return F.normalize(feature.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student: Tensor, teacher: Tensor, p: float = 2.0, reduction: str = "mean") -> Tensor:
    """Squared distance between the normalised attention maps of two feature maps.

    Per sample the mean over spatial positions of ``(Q_s - Q_t)^2`` with ``Q = attention_map``,
    so ``"mean"`` is RepDistiller's ``(at(f_s) - at(f_t)).pow(2).mean()``. Channel numbers may
    differ; spatial sizes must match. (The paper writes the p-norm of the difference; the
    customary implementation uses this squared form.)
    """
    q_s, q_t = attention_map(student, p), attention_map(teacher, p)
    if q_s.shape != q_t.shape:
        raise ValueError(f"spatial sizes differ: student {tuple(student.shape[2:])}, "
                         f"teacher {tuple(teacher.shape[2:])}")
    return check_reduction((q_s - q_t).pow(2).mean(dim=1), reduction)


class AT(FeatureDistiller):
    """Attention transfer: ``ce + at_weight * sum over stage pairs of at_loss``.

    Every stage pair (aligned from the deepest) is used, as RepDistiller uses every stage. Maps
    of different spatial sizes are compared after average pooling the larger; AT needs spatial
    maps on both sides, so a CNN/MLP pair raises a ``ValueError``. No learnable parts.

    ``|f|^p`` is used (the paper's definition); for the default even ``p = 2`` this equals the
    reference ``f^p``. Defaults (RepDistiller): ``at_weight`` 1000, ``p`` 2, ``ce_weight`` 1,
    ``kd_weight`` 0 (T = 4).
    """

    name = "at"

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 at_weight: float = 1000.0, p: float = 2.0, ce_weight: float = 1.0,
                 kd_weight: float = 0.0, temperature: float = 4.0,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature, teacher_layers=teacher_layers,
                         student_layers=student_layers, input_shape=input_shape)
        self.at_weight = check_weight("at_weight", at_weight)
        self.p = check_positive("p", p)
        self.need_stages()
        for ti, si in self.pairs:
            self.pair_layout(self.t_shapes.stages[ti], self.s_shapes.stages[si], min_rank=1)

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        total = 0.0
        for ti, si in self.pairs:
            t, s = match_spatial(t_feats["stages"][ti], s_feats["stages"][si])
            total = total + at_loss(s, t, self.p)
        return {"at": self.at_weight * total}
