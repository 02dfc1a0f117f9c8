"""Correlation congruence (Peng, Jin, Liu, Zhou, Wu, Liu, Li & Zhang, ICCV 2019,
"Correlation Congruence for Knowledge Distillation").

Two forms of the loss are offered:

* ``"repdistiller"`` (the default), the form behind every CC number of the CRD benchmark
  (RepDistiller, which says it got it from the paper's authors): on the *unnormalised* linear
  embeddings of the pooled features, with ``delta = e_s - e_t`` (B, D), the mean over the
  ``B - 1`` consecutive sample pairs ``(i, i + 1)`` of ``sum_d |delta_i,d| |delta_i+1,d|``;
* ``"taylor_gaussian"``, the paper's text: the squared difference of the two batch correlation
  matrices, each an order-P Taylor expansion of a Gaussian RBF kernel on L2-normalised
  embeddings. It is about five orders of magnitude smaller than the first form at the same
  weight, so it needs a much larger ``cc_weight``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .common import FeatureDistiller, check_positive, check_reduction, check_weight

#: values of the ``variant`` option of :class:`CC`, the default first
VARIANTS = ("repdistiller", "taylor_gaussian")


def cc_loss(student: Tensor, teacher: Tensor, reduction: str = "mean") -> Tensor:
    """Correlation congruence of two embeddings (B, D) as RepDistiller computes it.

    With ``delta = |student - teacher|`` (B, D): one value per consecutive pair of samples,
    ``sum_d delta[i, d] * delta[i + 1, d]`` for ``i = 0 .. B - 2`` (no wrap-around), so
    ``reduction="none"`` gives ``B - 1`` values and ``"mean"`` their mean. A batch of one sample
    has no pair: the loss is then 0 (the reference's mean of nothing would be NaN).
    The embeddings are used as they are (not normalised).
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"cc_loss compares two embeddings of the same shape (B, D), got "
                         f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}; "
                         f"embed both to the same dimension first")
    delta = (student - teacher).abs()
    per_pair = (delta[:-1] * delta[1:]).sum(dim=1)
    if per_pair.numel() == 0 and reduction == "mean":
        return delta.sum() * 0.0
    return check_reduction(per_pair, reduction)


def correlation_matrix(embedding: Tensor, gamma: float = 0.4, order: int = 2) -> Tensor:
    """Batch correlation (B, B) with the order-P Taylor expansion of a Gaussian RBF kernel.

    For unit vectors ``||x - y||^2 = 2 - 2 x.y``, so ``exp(-gamma ||x - y||^2)
    = exp(-2 gamma) exp(2 gamma x.y) ~ exp(-2 gamma) sum_{p<=P} (2 gamma x.y)^p / p!``.
    ``embedding`` (B, D) is L2-normalised here first.
    """
    e = F.normalize(embedding, dim=1)
    sim = e @ e.t()
    out = 0.0
    for p in range(order + 1):
        out = out + (2 * gamma) ** p / math.factorial(p) * sim.pow(p)
    return math.exp(-2 * gamma) * out


def cc_taylor_gaussian_loss(student: Tensor, teacher: Tensor, gamma: float = 0.4,
                            order: int = 2) -> Tensor:
    """``||C_s - C_t||_F^2 / B^2`` for the correlation matrices (:func:`correlation_matrix`) of
    two embeddings (B, D_s), (B, D_t): the paper's kernel form of CC (not RepDistiller's).

    A property of the whole batch (no per-sample reduction).
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher embeddings have different batch sizes "
                         f"({student.shape[0]} and {teacher.shape[0]})")
    return F.mse_loss(correlation_matrix(student, gamma, order),
                      correlation_matrix(teacher, gamma, order))


class LinearEmbed(nn.Module):
    """A linear projection of the flattened input (B, ...) to (B, ``dim``), not normalised."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


class Embed(LinearEmbed):
    """A linear projection to ``dim`` followed by L2 normalisation (CRD's embedding)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(super().forward(x), dim=1)


class CC(FeatureDistiller):
    """Correlation congruence: ``ce + cc_weight * loss(embed_s(f_s), embed_t(f_t))``.

    ``f`` is each model's pooled feature (B, F); the two learnable linear embeddings (F_s and F_t
    to ``embed_dim``, with bias, not normalised) are trained with the student. ``variant``
    chooses the loss (see the module docstring): ``"repdistiller"`` (:func:`cc_loss`) or
    ``"taylor_gaussian"`` (:func:`cc_taylor_gaussian_loss` with ``gamma`` and ``order``, which
    only this variant uses; defaults P = 2, gamma = 0.4 as in common re-implementations).

    Defaults (RepDistiller's ``train_student.py`` and run script, ``-b 0.02``, ``--feat_dim
    128``): ``variant`` "repdistiller", ``cc_weight`` 0.02, ``embed_dim`` 128, ``ce_weight`` 1,
    ``kd_weight`` 0 (T = 4). Works across architectures.
    """

    name = "cc"

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 cc_weight: float = 0.02, embed_dim: int = 128, variant: str = "repdistiller",
                 gamma: float = 0.4, order: int = 2, ce_weight: float = 1.0,
                 kd_weight: float = 0.0, temperature: float = 4.0,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature, teacher_layers=teacher_layers,
                         student_layers=student_layers, input_shape=input_shape)
        if variant not in VARIANTS:
            raise ValueError(f"unknown CC variant {variant!r}; use one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.cc_weight = check_weight("cc_weight", cc_weight)
        self.gamma = check_positive("gamma", gamma)
        if isinstance(order, bool) or int(order) != order or order < 0:
            raise ValueError(f"order must be an int >= 0, got {order!r}")
        self.order = int(order)
        if isinstance(embed_dim, bool) or int(embed_dim) != embed_dim or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        self.need_pooled()
        self.embed_s = LinearEmbed(self.s_shapes.pooled, int(embed_dim))
        self.embed_t = LinearEmbed(self.t_shapes.pooled, int(embed_dim))

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        e_s, e_t = self.embed_s(s_feats["pooled"]), self.embed_t(t_feats["pooled"])
        if self.variant == "taylor_gaussian":
            loss = cc_taylor_gaussian_loss(e_s, e_t, self.gamma, self.order)
        else:
            loss = cc_loss(e_s, e_t)
        return {"cc": self.cc_weight * loss}
