"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, "Learning Deep
Representations with Probabilistic Knowledge Transfer")."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .common import FeatureDistiller, check_reduction, check_weight


def cosine_conditional(e: Tensor, eps: float = 1e-7) -> Tensor:
    """Conditional probabilities (B, B) from the cosine kernel ``(1 + cos(e_i, e_j)) / 2`` of
    features (B, ...), each row divided by its sum.

    Rows are normalised as ``e_i / (||e_i|| + eps)`` (a NaN entry becomes 0), as the authors'
    code does, so a row of tiny norm is shrunk rather than blown up to unit length.
    """
    e = e.flatten(1)
    u = e / (e.norm(dim=1, keepdim=True) + eps)
    u = torch.where(torch.isnan(u), torch.zeros_like(u), u)
    k = (u @ u.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7,
             reduction: str = "mean") -> Tensor:
    """``mean_ij  P_t[i,j] * log((P_t[i,j] + eps) / (P_s[i,j] + eps))`` (KL between the
    cosine-kernel conditional distributions of two batches of features (B, ...)).

    Per sample i: the mean over j of row i, so ``"mean"`` averages the whole (B, B) matrix.
    ``eps`` also enters the normalisation (:func:`cosine_conditional`). Feature sizes may
    differ. With ``"mean"`` this is RepDistiller's ``PKT`` (``cosine_similarity_loss``), equal
    in ``tests/test_fidelity_relations.py``.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher features have different batch sizes "
                         f"({student.shape[0]} and {teacher.shape[0]})")
    p_s, p_t = cosine_conditional(student, eps), cosine_conditional(teacher, eps)
    per_row = (p_t * ((p_t + eps) / (p_s + eps)).log()).mean(dim=1)
    return check_reduction(per_row, reduction)


class PKT(FeatureDistiller):
    """PKT: ``ce + pkt_weight * pkt_loss(pooled_s, pooled_t)``; no learnable parts.

    Works across architectures. Defaults (RepDistiller's ``run_cifar_distill.sh``, ``-a 0 -b
    30000``): ``pkt_weight`` 30000, ``eps`` 1e-7, ``ce_weight`` 1, ``kd_weight`` 0 (T = 4).
    """

    name = "pkt"

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 pkt_weight: float = 30000.0, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 temperature: float = 4.0,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature, teacher_layers=teacher_layers,
                         student_layers=student_layers, input_shape=input_shape)
        self.pkt_weight = check_weight("pkt_weight", pkt_weight)
        self.need_pooled()

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        return {"pkt": self.pkt_weight * pkt_loss(s_feats["pooled"], t_feats["pooled"])}
