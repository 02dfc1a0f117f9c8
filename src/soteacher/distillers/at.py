"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention:
Improving the Performance of Convolutional Neural Networks via Attention Transfer")."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .common import FeatureDistiller, check_positive, check_reduction, check_weight, match_spatial


def attention_map(feature: Tensor, p: float = 2.0, absolute: bool = False) -> Tensor:
    """Spatial attention (B, positions) of a map (B, C, *spatial): ``mean_c f_c^p`` (``|f_c|^p``
    when ``absolute``), flattened over positions, then divided by its L2 norm."""
    act = feature.abs() if absolute else feature
    return F.normalize(act.pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student: Tensor, teacher: Tensor, p: float = 2.0, reduction: str = "mean",
            absolute: bool = False) -> Tensor:
    """Squared distance between the normalised attention maps of two feature maps (B, C_s, *S)
    and (B, C_t, *S) of the same spatial size S (channel numbers may differ).

    Per sample the mean over positions of ``(Q_s - Q_t)^2`` with ``Q = attention_map``, so
    ``"mean"`` is RepDistiller's ``Attention.at_loss`` on maps of equal size (the mean over
    batch and positions; equal in ``tests/test_fidelity_relations.py``). The paper writes the
    p-norm of the difference; its code and RepDistiller use this squared form.
    """
    q_s, q_t = attention_map(student, p, absolute), attention_map(teacher, p, absolute)
    if q_s.shape != q_t.shape:
        raise ValueError(f"spatial sizes differ: student {tuple(student.shape[2:])}, "
                         f"teacher {tuple(teacher.shape[2:])}; pool the larger map first")
    return check_reduction((q_s - q_t).pow(2).mean(dim=1), reduction)


class AT(FeatureDistiller):
    """Attention transfer: ``ce + at_weight * sum over stage pairs of at_loss``.

    Every stage pair is used (``stages`` are RepDistiller's ``feat[1:-1]``, paired from the
    shallowest as its ``zip``; see :mod:`.common`). Maps of different spatial sizes are
    compared after adaptive average pooling of the larger to the smaller size, RepDistiller's
    rule for its square maps (it pools to ``(H, H)`` of the smaller map; here every axis is
    pooled to the smaller size, the same for square maps). AT needs spatial maps on both sides,
    so a CNN/MLP pair raises a ``ValueError``. No learnable parts.

    The attention map raises the activations to the power ``p`` as RepDistiller does
    (``f^p``); ``absolute=True`` uses ``|f|^p``, the paper's definition, which differs only for
    odd or fractional ``p``. Defaults (RepDistiller's ``run_cifar_distill.sh``, ``-a 0 -b
    1000``): ``at_weight`` 1000, ``p`` 2, ``absolute`` False, ``ce_weight`` 1, ``kd_weight`` 0
    (T = 4).
    """

    name = "at"

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 at_weight: float = 1000.0, p: float = 2.0, ce_weight: float = 1.0,
                 kd_weight: float = 0.0, temperature: float = 4.0,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 input_shape: Sequence[int] | None = None, absolute: bool = False) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature, teacher_layers=teacher_layers,
                         student_layers=student_layers, input_shape=input_shape)
        self.at_weight = check_weight("at_weight", at_weight)
        self.p = check_positive("p", p)
        self.absolute = bool(absolute)
        self.need_stages()
        for ti, si in self.pairs:
            self.pair_layout(self.t_shapes.stages[ti], self.s_shapes.stages[si], min_rank=1)

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        total = 0.0
        for ti, si in self.pairs:
            t, s = match_spatial(t_feats["stages"][ti], s_feats["stages"][si])
            total = total + at_loss(s, t, self.p, absolute=self.absolute)
        return {"at": self.at_weight * total}
