"""Similarity-preserving distillation (Tung & Mori, ICCV 2019, "Similarity-Preserving Knowledge
Distillation")."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .common import FeatureDistiller, check_weight


def similarity_matrix(feature: Tensor) -> Tensor:
    """Row-normalised batch similarity (B, B) ``G = normalize_rows(A A^T)`` of a feature
    (B, ...) flattened to ``A`` (B, D)."""
    a = feature.flatten(1)
    return F.normalize(a @ a.t(), dim=1)


def sp_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``||G_s - G_t||_F^2 / B^2`` for the (B, B) similarity matrices of the two features.

    Features (B, ...) may have any (different) shapes as long as the batch size agrees. The
    loss is a property of the whole batch, so there is no per-sample reduction. RepDistiller's
    ``Similarity.similarity_loss`` (equal in ``tests/test_fidelity_relations.py``).
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher features have different batch sizes "
                         f"({student.shape[0]} and {teacher.shape[0]})")
    b = student.shape[0]
    return (similarity_matrix(student) - similarity_matrix(teacher)).pow(2).sum() / (b * b)


class SP(FeatureDistiller):
    """Similarity preserving: ``ce + sp_weight * sp_loss(last student stage, last teacher stage)``.

    Compares each network's last stage (``stages[-1]``, RepDistiller's ``feat[-2]``), whatever
    the numbers of stages. Works across architectures (the batch similarity matrices have the
    same size whatever the features). No learnable parts. Defaults (RepDistiller's
    ``run_cifar_distill.sh``, ``-a 0 -b 3000``): ``sp_weight`` 3000, ``ce_weight`` 1,
    ``kd_weight`` 0 (T = 4).
    """

    name = "sp"

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 sp_weight: float = 3000.0, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 temperature: float = 4.0,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature, teacher_layers=teacher_layers,
                         student_layers=student_layers, input_shape=input_shape)
        self.sp_weight = check_weight("sp_weight", sp_weight)
        self.need_stages()

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        return {"sp": self.sp_weight * sp_loss(s_feats["stages"][-1], t_feats["stages"][-1])}
