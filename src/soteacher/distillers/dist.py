"""DIST (Huang, You, Wang, Qian & Xu, NeurIPS 2022, "Knowledge Distillation from A Stronger
Teacher")."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..objective import StepOutput
from .base import Distiller
from .common import check_positive, check_weight


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation between corresponding rows of a, b (N, M) -> (N,).

    ``eps`` is added to the product of the centred norms, as in DIST's code (1e-8)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(student_logits: Tensor, teacher_logits: Tensor,
               temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(inter, intra)`` relation losses of DIST on logits (B, C), each multiplied by ``T^2``.

    With ``Y = softmax(logits / T)`` (B, C): inter-class ``1 - mean_i pearson(Y_s[i], Y_t[i])``
    (each sample's class ranking) and intra-class ``1 - mean_c pearson(Y_s[:, c], Y_t[:, c])``
    (each class's ranking across the batch). Batch-level, so no per-sample reduction. Equal to
    the terms of ``DIST(beta, gamma, tau)`` in hunto/image_classification_sota
    ``lib/models/losses/dist_kd.py`` (the loss DIST_KD's README names;
    ``tests/test_fidelity_logits.py``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    y_s = F.softmax(student_logits / temperature, dim=1)
    y_t = F.softmax(teacher_logits / temperature, dim=1)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
    return inter * temperature**2, intra * temperature**2


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float = 2.0,
              gamma: float = 2.0, temperature: float = 4.0) -> Tensor:
    """``beta * inter + gamma * intra`` (see :func:`dist_terms`)."""
    inter, intra = dist_terms(student_logits, teacher_logits, temperature)
    return beta * inter + gamma * intra


class DIST(Distiller):
    """DIST: ``ce_weight * CE + beta * inter-class + gamma * intra-class relation loss``.

    Student and teacher logits (B, C), labels (B,). DIST's code (hunto/image_classification_sota,
    ``KDLoss`` in ``lib/models/losses/__init__.py``) builds ``DIST(beta=1, gamma=1, tau)`` and
    returns ``ori_loss_weight * CE + kd_loss_weight * DIST``, so its effective weights are
    ``ce_weight = ori_loss_weight`` and ``beta = gamma = kd_loss_weight``.
    Defaults: ``ce_weight`` 1, ``beta`` 2, ``gamma`` 2, ``temperature`` 4, the effective
    weights of its CIFAR-100 config (``configs/strategies/distill/dist_cifar.yaml``:
    ``ori_loss_weight`` 1, ``kd_loss_weight`` 2, ``kd: dist_t4``). Its ImageNet configs
    (``resnet_dist.yaml``, and ``dist_b2.yaml`` for the stronger training strategy:
    ``kd: dist``, ``kd_loss_weight`` 2) are ``beta = gamma = 2``, ``temperature`` 1,
    ``ce_weight`` 1. Both are checked against the reference's values in
    ``tests/test_fidelity_logits.py``.

    ``logit_standardize=True`` z-scores both logits before the temperature softmax (Sun et al.,
    CVPR 2024). Terms: ``ce``, ``dist_inter``, ``dist_intra``.
    """

    def __init__(self, teacher: nn.Module, beta: float = 2.0, gamma: float = 2.0,
                 temperature: float = 4.0, ce_weight: float = 1.0,
                 logit_standardize: bool = False) -> None:
        super().__init__(teacher)
        self.beta = check_weight("beta", beta)
        self.gamma = check_weight("gamma", gamma)
        self.temperature = check_positive("temperature", temperature)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.logit_standardize = bool(logit_standardize)

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor) -> StepOutput:
        logits, s, t = self.logits(model, x, self.logit_standardize)
        inter, intra = dist_terms(s, t, self.temperature)
        return StepOutput(logits, {"ce": self.ce_weight * F.cross_entropy(logits, y),
                                   "dist_inter": self.beta * inter,
                                   "dist_intra": self.gamma * intra})
