"""Relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019, "Relational Knowledge
Distillation")."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import FeatureDistiller, check_weight


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances (B, B) between the rows of ``e`` (B, D); zero on the diagonal."""
    sq = e.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), dtype=e.dtype, device=e.device))


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Distance-wise RKD on (B, ...) features: smooth-L1 (Huber, beta 1) loss between the
    pairwise distances of the two batches, each divided by its mean off-diagonal distance (so
    the scales of the two spaces do not matter); squared distances are clamped at 1e-12 before
    the square root."""
    s, t = student.flatten(1), teacher.flatten(1)
    d_s, d_t = pairwise_distances(s), pairwise_distances(t)
    # the diagonal is exactly 0, so the off-diagonal mean is the whole sum over B (B - 1)
    # (a boolean index would make the host wait for the device)
    pairs = len(s) * (len(s) - 1)
    d_s = d_s / (d_s.sum() / pairs)
    d_t = d_t / (d_t.sum() / pairs)
    return F.smooth_l1_loss(d_s, d_t)


def triplet_angles(e: Tensor) -> Tensor:
    """Cosines (B, B, B) of the angle at vertex j of every triplet (i, j, k): entry ``[j, i, k]``
    is ``<u(e_i - e_j), u(e_k - e_j)>`` with ``u`` the unit vector (0 when i = j or k = j)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)   # diff[j, i] = u(e_i - e_j)
    return diff @ diff.transpose(1, 2)


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Angle-wise RKD on (B, ...) features: smooth-L1 (Huber, beta 1) loss between the (B, B, B)
    triplet angle cosines of the two batches."""
    return F.smooth_l1_loss(triplet_angles(student.flatten(1)), triplet_angles(teacher.flatten(1)))


def rkd_loss(student: Tensor, teacher: Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> Tensor:
    """``distance_weight * rkd_distance_loss + angle_weight * rkd_angle_loss`` on embeddings
    (B, ...) flattened to (B, D_s), (B, D_t). Relational, so a property of the whole batch (no
    per-sample reduction). RepDistiller's ``RKDLoss(w_d, w_a)`` (equal in
    ``tests/test_fidelity_relations.py``)."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher embeddings have different batch sizes "
                         f"({student.shape[0]} and {teacher.shape[0]})")
    return (distance_weight * rkd_distance_loss(student, teacher)
            + angle_weight * rkd_angle_loss(student, teacher))


class RKD(FeatureDistiller):
    """Relational KD: ``ce + rkd_weight * (25 * distance + 50 * angle)`` on pooled features.

    Relations are computed within each network, so teacher and student feature sizes may
    differ and no connector is needed (as in RepDistiller). ``embed_dim`` optionally adds a
    learnable linear embedding of the student's pooled feature (trained with the student); it is
    off by default. Works across architectures.

    Defaults (RepDistiller's ``RKDLoss()`` and ``run_cifar_distill.sh``, ``-a 0 -b 1``):
    ``rkd_weight`` 1, ``distance_weight`` 25, ``angle_weight`` 50, ``embed_dim`` None,
    ``ce_weight`` 1, ``kd_weight`` 0 (T = 4).
    """

    name = "rkd"

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 rkd_weight: float = 1.0, distance_weight: float = 25.0,
                 angle_weight: float = 50.0, embed_dim: int | None = None,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature, teacher_layers=teacher_layers,
                         student_layers=student_layers, input_shape=input_shape)
        self.rkd_weight = check_weight("rkd_weight", rkd_weight)
        self.distance_weight = check_weight("distance_weight", distance_weight)
        self.angle_weight = check_weight("angle_weight", angle_weight)
        self.need_pooled()
        self.embed: nn.Module = nn.Identity()
        if embed_dim is not None:
            if int(embed_dim) != embed_dim or embed_dim < 1:
                raise ValueError(f"embed_dim must be a positive int or None, got {embed_dim!r}")
            self.embed = nn.Linear(self.s_shapes.pooled, int(embed_dim))

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        loss = rkd_loss(self.embed(s_feats["pooled"]), t_feats["pooled"], self.distance_weight,
                        self.angle_weight)
        return {"rkd": self.rkd_weight * loss}
