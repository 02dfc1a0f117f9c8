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
    """Per-sample (B,) TCKD and NCKD of logits (B, C) and targets (B,), each times ``T^2``.

    * TCKD: KL(teacher || student) between the binary distributions ``(p_target, 1 - p_target)``
      of the softmax at temperature T;
    * NCKD: KL(teacher || student) between the distributions over the *non-target* classes only
      (softmax of the other logits at temperature T).

    Their batch means are mdistiller's TCKD and NCKD (``dkd_loss`` with ``alpha, beta`` = 1, 0
    and 0, 1; ``tests/test_fidelity_logits.py``). The target class is removed exactly, where
    mdistiller subtracts 1000 from its logit and takes the log of summed probabilities: the two
    agree to float precision unless a probability underflows, where mdistiller's can reach inf.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s, t = student_logits / temperature, teacher_logits / temperature
    # the target-class mask, built on the device (F.one_hot reads the labels' range on the host)
    gt = torch.zeros_like(s, dtype=torch.bool).scatter_(1, target.view(-1, 1), True)
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
    """``alpha * TCKD + beta * NCKD`` (see :func:`dkd_terms`); ``reduction`` over the batch.

    With the default ``"mean"`` this is mdistiller's ``dkd_loss``
    (``tests/test_fidelity_logits.py``).
    """
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature)
    return check_reduction(alpha * tckd + beta * nckd, reduction)


class DKD(Distiller):
    """DKD: ``ce_weight * CE + w(epoch) * (alpha * TCKD + beta * NCKD)``.

    Student and teacher logits (B, C), labels (B,). With ``warmup_epochs=20`` the terms equal
    mdistiller's ``DKD.forward_train`` (``mdistiller/distillers/DKD.py``) epoch by epoch, warm-up
    ``w = min(epoch / 20, 1)`` over 1-based epochs included (``tests/test_fidelity_logits.py``).

    Defaults are mdistiller's CIFAR-100 ones (``mdistiller/engine/cfg.py``): ``ce_weight`` 1,
    ``alpha`` 1, ``beta`` 8, ``temperature`` 4, ``warmup_epochs`` 20 (a fixed length, whatever
    the run's). ``warmup_epochs="scaled"`` is a named variant that scales those 20 epochs of 240
    to the run (``num_epochs // 12``), so that a short run does not spend most of its epochs in
    the warm-up; 0 switches the warm-up off.

    ``beta`` depends on the pair in mdistiller's CIFAR-100 configs
    (``configs/cifar100/dkd/*.yaml``): 2 for resnet56 -> resnet20 and resnet110 -> resnet32; 6
    for vgg13 -> vgg8, vgg13 -> MobileNetV2, wrn_40_2 -> wrn_16_2 and wrn_40_2 -> wrn_40_1; the
    default 8 for resnet32x4 -> resnet8x4 and the other pairs. ``configs/cifar100/mdistiller-dkd``
    holds them. On ImageNet mdistiller uses ``beta`` 0.5 (ResNet34 -> ResNet18) or 2 (ResNet50 ->
    MobileNetV1), ``temperature`` 1 and a 1-epoch warm-up.

    ``logit_standardize=True`` z-scores both logits before the temperature softmax (Sun et al.,
    CVPR 2024, :func:`~soteacher.distillers.base.standardize_logits`); the CE term stays on the
    raw logits. Their published runs also multiply ``alpha`` and ``beta`` by a KD weight and
    set the temperature to a base temperature per pair: ``configs/cifar100/logit-std-dkd``.
    Terms: ``ce``, ``tckd``, ``nckd``.
    """

    def __init__(self, teacher: nn.Module, alpha: float = 1.0, beta: float = 8.0,
                 temperature: float = 4.0, ce_weight: float = 1.0,
                 warmup_epochs: int | str = 20, logit_standardize: bool = False) -> None:
        super().__init__(teacher)
        self.alpha = check_weight("alpha", alpha)
        self.beta = check_weight("beta", beta)
        self.temperature = check_positive("temperature", temperature)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        if warmup_epochs != "scaled" and (isinstance(warmup_epochs, (bool, str))
                                          or not isinstance(warmup_epochs, (int, float))
                                          or int(warmup_epochs) != warmup_epochs
                                          or warmup_epochs < 0):
            raise ValueError(f"warmup_epochs must be an int >= 0 or 'scaled', got "
                             f"{warmup_epochs!r}")
        self.warmup_epochs = "scaled" if warmup_epochs == "scaled" else int(warmup_epochs)
        self.logit_standardize = bool(logit_standardize)

    def warmup_factor(self) -> float:
        w = self.num_epochs // 12 if self.warmup_epochs == "scaled" else self.warmup_epochs
        return 1.0 if w <= 0 else min(self.epoch / w, 1.0)

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor) -> StepOutput:
        logits, s, t = self.logits(model, x, self.logit_standardize)
        tckd, nckd = dkd_terms(s, t, y, self.temperature)
        w = self.warmup_factor()
        return StepOutput(logits, {"ce": self.ce_weight * F.cross_entropy(logits, y),
                                   "tckd": w * self.alpha * tckd.mean(),
                                   "nckd": w * self.beta * nckd.mean()})
