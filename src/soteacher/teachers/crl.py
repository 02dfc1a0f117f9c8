"""Confidence-aware ranking (CRL; Moon et al., ICML 2020), as the SoTeacher reference uses it.

Every sample keeps a running count of how often it has been classified correctly so far (a
per-sample buffer, saved in checkpoints). Within a batch, each sample is paired with the next one
(the last with the first); the pair's max-softmax confidences are ranked like their counts:

    c_i = (count_i - min_j count_j) / (k - min_j count_j)      (k: the current 1-based epoch,
                                                               the most any count can reach)
    loss = mean_i max(0, |c_i - c_next| - sign(c_i - c_next) * (conf_i - conf_next))

so a sample that was right more often must be more confident by at least the difference of the
normalised counts; pairs with equal counts contribute zero. The counts are read before this
batch's correctness is added to them. Under DDP the counts are replicated: every process adds the
correctness of the whole global batch (pairs are formed within each process's own batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:    # under DDP every process applies the whole global batch's counts, as the bank does
    from ..engine.distributed import all_gather_rows
except ImportError:         # an engine without multi-process support: one process
    def all_gather_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
        return tensors

__all__ = ["ConfidenceRanking", "crl_loss", "normalised_counts"]


def normalised_counts(counts: Tensor, epoch: int) -> Tensor:
    """Correctness counts (N,) scaled to 0..1 by ``(c - min) / (epoch - min)`` (0 if the range is
    empty), ``min`` over all samples."""
    lo = counts.min()
    span = float(epoch) - lo
    if span <= 0:
        return torch.zeros_like(counts)
    return ((counts - lo) / span).clamp(0.0, 1.0)


def crl_loss(logits: Tensor, norm_counts: Tensor) -> Tensor:
    """The ranking loss of a batch: ``logits`` (B, C) and the samples' normalised counts (B,)."""
    conf = logits.float().softmax(dim=1).max(dim=1).values
    c = norm_counts.to(conf)
    diff_c = c - c.roll(-1)
    diff_conf = conf - conf.roll(-1)
    return F.relu(diff_c.abs() - torch.sign(diff_c) * diff_conf).mean()


class ConfidenceRanking(nn.Module):
    """CRL term with its per-sample correctness counts (buffer ``counts``, shape (N,))."""

    def __init__(self, num_samples: int) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.register_buffer("counts", torch.zeros(num_samples))

    def forward(self, logits: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        index = index.to(self.counts.device)
        loss = crl_loss(logits, normalised_counts(self.counts, epoch)[index])
        if self.training:
            with torch.no_grad():
                correct = (logits.detach().argmax(dim=1) == y).to(self.counts.dtype)
                index, correct = all_gather_rows(index, correct)
                self.counts.index_add_(0, index.to(self.counts.device),
                                       correct.to(self.counts.device))
        return loss
