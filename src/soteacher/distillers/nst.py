"""Neuron selectivity transfer (Huang & Wang, 2017, "Like What You Like: Knowledge Distill via
Neuron Selectivity Transfer")."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .common import FeatureDistiller, check_reduction, check_weight, match_spatial


def poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Per sample, the mean over channel pairs of ``k(a_i, b_j) = (a_i . b_j)^2`` for
    a (B, Ca, N), b (B, Cb, N)."""
    return (a @ b.transpose(1, 2)).pow(2).flatten(1).mean(dim=1)


def nst_loss(student: Tensor, teacher: Tensor, reduction: str = "mean") -> Tensor:
    """Squared MMD with the polynomial kernel ``k(x, y) = (x . y)^2`` between the channels of
    two maps (B, C_s, *S) and (B, C_t, *S), each channel flattened over positions and
    L2-normalised: ``mean k(t, t) + mean k(s, s) - 2 mean k(s, t)`` per sample. Channel numbers
    may differ; spatial sizes must match. With ``"mean"`` this is RepDistiller's
    ``NSTLoss.nst_loss`` (its full loss; equal in ``tests/test_fidelity_relations.py``)."""
    if student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"spatial sizes differ: student {tuple(student.shape[2:])}, "
                         f"teacher {tuple(teacher.shape[2:])}; pool the larger map first")
    s = F.normalize(student.flatten(2), dim=2)
    t = F.normalize(teacher.flatten(2), dim=2)
    mmd = poly_kernel_mean(t, t) + poly_kernel_mean(s, s) - 2 * poly_kernel_mean(s, t)
    return check_reduction(mmd, reduction)


class NST(FeatureDistiller):
    """NST: ``ce + nst_weight * sum over stage pairs of nst_loss``; no learnable parts.

    Every stage pair is used (``stages`` are RepDistiller's ``feat[1:-1]``, paired from the
    shallowest as its ``zip``; see :mod:`.common`); different spatial sizes are matched by
    adaptive average pooling of the larger map, as RepDistiller does for its square maps. NST
    compares channel activation patterns over positions, so it needs spatial maps on both
    sides (a CNN/MLP pair, or two MLPs, raise a ``ValueError``). Defaults (RepDistiller's
    ``run_cifar_distill.sh``, ``-a 0 -b 50``): ``nst_weight`` 50, ``ce_weight`` 1,
    ``kd_weight`` 0 (T = 4).
    """

    name = "nst"

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 nst_weight: float = 50.0, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 temperature: float = 4.0,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature, teacher_layers=teacher_layers,
                         student_layers=student_layers, input_shape=input_shape)
        self.nst_weight = check_weight("nst_weight", nst_weight)
        self.need_stages()
        for ti, si in self.pairs:
            self.pair_layout(self.t_shapes.stages[ti], self.s_shapes.stages[si], min_rank=1)

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        total = 0.0
        for ti, si in self.pairs:
            t, s = match_spatial(t_feats["stages"][ti], s_feats["stages"][si])
            total = total + nst_loss(s, t)
        return {"nst": self.nst_weight * total}
