"""Confidence-aware ranking (CRL; Moon et al., ICML 2020), as the SoTeacher reference code uses it
(``helper/crl_util.py`` of the official SoTeacher code, Dong, Liu & Shang, ICLR 2024).

Every sample keeps a running count of how often it has been classified correctly so far, over
the whole run (a per-sample buffer, saved in checkpoints). Within a batch (B samples), each
sample is paired with the next one (the last with the first); the pair's max-softmax
confidences are ranked like their counts. During the 1-based epoch ``k``:

    M   = 1 in epochs 1 and 2, k - 1 in epoch k >= 2   (the epochs completed before this one,
                                                        at least 1)
    m   = min_j count_j                                (over all N samples, not the batch)
    c_i = (count_i - m) / (M - m)
    loss = mean_i max(0, |c_i - c_next| - sign(c_i - c_next) * (conf_i - conf_next))

so a sample that was right more often must be more confident by at least the difference of the
normalised counts; pairs with equal counts contribute zero. The counts are read before this
batch's correctness is added to them, so in epoch 1 (each epoch visits every sample once) every
count read is still 0 and the loss is 0.

Deviation from the reference, in a degenerate case only: when ``M <= m`` (every sample has been
right in every epoch so far) the reference divides by zero or by a negative number (NaN / inf
losses, or an inverted ranking); here every normalised count is then 0 and the loss is 0.

Under DDP the counts are replicated: every process adds the correctness of the whole global
batch, so the counts equal a single process's. Pairs are formed within each process's own slice
of the batch (the last sample of a slice is paired with the first of the same slice, not with
the first of the next process's slice), so the loss differs from a single process's there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..regularizers.schedules import SCHEDULES, STEP_START, schedule_weight

try:    # under DDP every process applies the whole global batch's counts, as the bank does
    from ..engine.distributed import all_gather_rows
except ImportError:         # an engine without multi-process support: one process
    def all_gather_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
        return tensors

__all__ = ["ConfidenceRanking", "crl_loss", "max_count", "normalised_counts"]


def max_count(epoch: int) -> int:
    """The reference's normaliser ``M`` during 1-based ``epoch``: 1 in epochs 1 and 2, then
    ``epoch - 1``."""
    if epoch < 1:
        raise ValueError(f"epochs are counted from 1, got {epoch}")
    return max(1, epoch - 1)


def normalised_counts(counts: Tensor, epoch: int) -> Tensor:
    """Correctness counts (N,) scaled by ``(c - m) / (M - m)``, ``m`` the smallest count of all
    N samples and ``M = max_count(epoch)``; all zeros when ``M <= m``. Returns (N,).

    Counts read during ``epoch`` are at most ``epoch - 1``, so the values lie in [0, 1]."""
    lo = counts.min()
    span = max_count(epoch) - lo
    usable = span > 0
    # torch.where instead of an `if`: no host read inside a training step
    return torch.where(usable, (counts - lo) / torch.where(usable, span, torch.ones_like(span)),
                       torch.zeros_like(counts))


def crl_loss(logits: Tensor, norm_counts: Tensor) -> Tensor:
    """The ranking loss of a batch: ``logits`` (B, C) and the samples' normalised counts (B,);
    a scalar, computed in float32 or wider (float64 logits stay float64)."""
    conf = logits.to(torch.promote_types(logits.dtype, torch.float32))
    conf = conf.softmax(dim=1).max(dim=1).values
    c = norm_counts.to(conf)
    diff_c = c - c.roll(-1)
    diff_conf = conf - conf.roll(-1)
    return F.relu(diff_c.abs() - torch.sign(diff_c) * diff_conf).mean()


class ConfidenceRanking(nn.Module):
    """The weighted CRL term with its per-sample correctness counts (buffer ``counts``, (N,)).

    Call it once per training step with the step's logits (B, C), labels (B,), dataset indices
    (B,) and the 1-based epoch; it returns ``weight(epoch) * crl_loss`` and then, in training
    mode, adds the batch's correctness to the counts. The weight follows ``schedule`` over
    ``num_epochs`` epochs (needed by every schedule but ``constant``; see
    :mod:`soteacher.regularizers.schedules`; default ``constant``, the reference's default),
    ``start_epoch`` being the number of epochs at weight 0 of the ``step`` schedule (default 50,
    the reference's ``--crl_start_at``).
    """

    def __init__(self, num_samples: int, weight: float = 1.0, num_epochs: int | None = None,
                 schedule: str = "constant", start_epoch: int = STEP_START) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown CRL schedule {schedule!r}; available: "
                             f"{', '.join(SCHEDULES)}")
        if num_epochs is None and schedule != "constant":
            raise ValueError(f"the CRL schedule {schedule!r} needs num_epochs (the run's length)")
        self.weight = weight
        self.num_epochs = num_epochs
        self.schedule = schedule
        self.start_epoch = start_epoch
        self.register_buffer("counts", torch.zeros(num_samples))

    def weight_at(self, epoch: int) -> float:
        """The weight during 1-based ``epoch``."""
        if self.schedule == "constant":
            return self.weight
        return schedule_weight(self.schedule, self.weight, epoch, self.num_epochs,
                               self.start_epoch)

    def forward(self, logits: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        index = index.to(self.counts.device)
        norm = normalised_counts(self.counts, epoch)[index]
        loss = self.weight_at(epoch) * crl_loss(logits, norm.to(logits.device))
        if self.training:
            with torch.no_grad():
                correct = (logits.detach().argmax(dim=1) == y).to(self.counts.dtype)
                index, correct = all_gather_rows(index, correct)
                self.counts.index_add_(0, index.to(self.counts.device),
                                       correct.to(self.counts.device))
        return loss
