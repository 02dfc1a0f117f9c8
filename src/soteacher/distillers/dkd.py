"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022, "Decoupled
Knowledge Distillation")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..objective import StepOutput
from .base import Distiller
from .common import check_positive, check_reduction, check_weight


def dkd_terms(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
              temperature: float = 4.0) -> tuple[Tensor, Tensor]:
    """Per-sample (B,) TCKD and NCKD, each multiplied by ``T^2``.

    * TCKD: KL between the binary distributions ``(p_target, 1 - p_target)`` of teacher and
      student (softmax at temperature T);
    * NCKD: KL between the teacher's and the student's distributions over the *non-target*
      classes only (softmax of the other logits at temperature T).

    The target class is removed exactly (not by subtracting a large constant).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s, t = student_logits / temperature, teacher_logits / temperature
    gt = F.one_hot(target, s.shape[1]).bool()
    neg_inf = torch.finfo(s.dtype).min

    def binary_log_probs(z: Tensor) -> Tensor:
        log_all = torch.logsumexp(z, dim=1)
        log_target = z.gather(1, target.view(-1, 1)).squeeze(1) - log_all
        log_other = torch.logsumexp(z.masked_fill(gt, neg_inf), dim=1) - log_all
        return torch.stack([log_target, log_other], dim=1)

    lb_s, lb_t = binary_log_probs(s), binary_log_probs(t)
    tckd = (lb_t.exp() * (lb_t - lb_s)).sum(dim=1)
    ls_s = F.log_softmax(s.masked_fill(gt, neg_inf), dim=1)
    ls_t = F.log_softmax(t.masked_fill(gt, neg_inf), dim=1)
    nckd = torch.where(gt, torch.zeros_like(ls_t), ls_t.exp() * (ls_t - ls_s)).sum(dim=1)
    return tckd * temperature**2, nckd * temperature**2


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0, reduction: str = "mean") -> Tensor:
    """``alpha * TCKD + beta * NCKD`` (see :func:`dkd_terms`); ``reduction`` over the batch."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature)
    return check_reduction(alpha * tckd + beta * nckd, reduction)


class DKD(Distiller):
    """DKD: ``ce_weight * CE + w(epoch) * (alpha * TCKD + beta * NCKD)``.

    ``w(epoch) = min(epoch / warmup_epochs, 1)`` ramps the distillation terms in linearly as in
    the reference (mdistiller): 20 warm-up epochs of 240. ``warmup_epochs=None`` scales this to
    the run, ``num_epochs // 12``; 0 switches the warm-up off. ``logit_standardize=True``
    z-scores both logits before the temperature softmax (Sun et al., CVPR 2024).

    Defaults (mdistiller, CIFAR-100): ``ce_weight`` 1, ``alpha`` 1, ``beta`` 8 (ImageNet: 0.5),
    ``temperature`` 4. Terms: ``ce``, ``tckd``, ``nckd``.
    """

    def __init__(self, teacher: nn.Module, alpha: float = 1.0, beta: float = 8.0,
                 temperature: float = 4.0, ce_weight: float = 1.0,
                 warmup_epochs: int | None = None, logit_standardize: bool = False) -> None:
        super().__init__(teacher)
        self.alpha = check_weight("alpha", alpha)
        self.beta = check_weight("beta", beta)
        self.temperature = check_positive("temperature", temperature)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        if warmup_epochs is not None and (isinstance(warmup_epochs, bool)
                                          or int(warmup_epochs) != warmup_epochs
                                          or warmup_epochs < 0):
            raise ValueError(f"warmup_epochs must be an int >= 0 or None, got {warmup_epochs!r}")
        self.warmup_epochs = None if warmup_epochs is None else int(warmup_epochs)
        self.logit_standardize = bool(logit_standardize)

    def warmup_factor(self) -> float:
        w = self.warmup_epochs if self.warmup_epochs is not None else self.num_epochs // 12
        return 1.0 if w <= 0 else min(self.epoch / w, 1.0)

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor) -> StepOutput:
        logits, s, t = self.logits(model, x, self.logit_standardize)
        tckd, nckd = dkd_terms(s, t, y, self.temperature)
        w = self.warmup_factor()
        return StepOutput(logits, {"ce": self.ce_weight * F.cross_entropy(logits, y),
                                   "tckd": w * self.alpha * tckd.mean(),
                                   "nckd": w * self.beta * nckd.mean()})
