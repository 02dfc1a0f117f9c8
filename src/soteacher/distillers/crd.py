"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020, "Contrastive
Representation Distillation")."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import distributed
from .cc import Embed
from .common import FeatureDistiller, check_positive, check_reduction, check_weight


def nce_loss(scores: Tensor, num_samples: int, eps: float = 1e-7,
             reduction: str = "mean") -> Tensor:
    """NCE loss of CRD on normalised scores (B, 1 + K): column 0 the positive, the rest the K
    negatives drawn uniformly from ``num_samples`` items (noise probability ``1 / N``).

    Per sample ``-[log(P_0 / (P_0 + K/N + eps)) + sum_k log((K/N) / (P_k + K/N + eps))]``, so
    ``"mean"`` equals the reference's sum over the batch divided by its size.
    """
    k = scores.shape[1] - 1
    noise = k / num_samples
    pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    neg = torch.log(noise / (scores[:, 1:] + noise + eps)).sum(dim=1)
    return check_reduction(-(pos + neg), reduction)


def contrast_scores(anchor: Tensor, rows: Tensor, temperature: float) -> Tensor:
    """``exp(<rows[b, k], anchor[b]> / T)`` for anchors (B, D) and memory rows (B, 1 + K, D)."""
    return torch.exp(torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / temperature)


def crd_loss(student_embed: Tensor, teacher_embed: Tensor, student_rows: Tensor,
             teacher_rows: Tensor, z_student: float, z_teacher: float, num_samples: int,
             temperature: float = 0.07, eps: float = 1e-7, reduction: str = "mean") -> Tensor:
    """CRD's two-sided NCE loss.

    The student embedding (B, D) is contrasted with rows of the *teacher* memory
    ``teacher_rows`` (B, 1 + K, D) and the teacher embedding with rows of the *student* memory
    ``student_rows``; row 0 is the sample itself, the rest K negatives. Scores
    ``exp(<row, anchor> / T)`` are divided by the normalising constants ``z_student`` (student
    anchors) and ``z_teacher`` (teacher anchors); the result is
    ``nce_loss(student side) + nce_loss(teacher side)``.
    """
    s_side = contrast_scores(student_embed, teacher_rows, temperature) / z_student
    t_side = contrast_scores(teacher_embed, student_rows, temperature) / z_teacher
    return (nce_loss(s_side, num_samples, eps, reduction)
            + nce_loss(t_side, num_samples, eps, reduction))


class CRD(FeatureDistiller):
    """CRD: ``ce + crd_weight * crd_loss``, with memory banks of every training sample.

    The pooled features of student and teacher are embedded (linear + L2 norm to ``feat_dim``,
    both learnable and trained with the student). Two memory banks of shape
    ``(num_samples, feat_dim)`` (buffers, so they go into checkpoints) hold a momentum average of
    each sample's student and teacher embedding: after every training step the rows of the batch
    become ``normalize(momentum * row + (1 - momentum) * embedding)``. Each step draws
    ``K = min(nce_k, num_samples - 1)`` negative indices uniformly (row 0 is the sample itself).
    The normalising constants Z are fixed on the first training step to ``mean(scores) * N`` (as
    in the reference) and stored as buffers; the memories are only read, never updated, in eval
    mode.

    Several processes (DDP): the memories are replicated; after every step the ``(index,
    embeddings)`` rows of all processes are all-gathered and every replica applies the same
    update, negatives are drawn for the whole global batch (each process keeps its slice) and Z
    is the mean over the global batch, so the memories follow a single-process run.

    Deviations: the reference's default ``mode='exact'`` draws negatives only among samples of
    other classes through its dataset; here negatives are uniform over all samples (the
    reference memory's own fallback), as the objective does not see the dataset. ``nce_k`` is
    capped at ``num_samples - 1`` for small data sets.

    Defaults (RepDistiller): ``crd_weight`` 0.8, ``feat_dim`` 128, ``nce_k`` 16384,
    ``nce_t`` 0.07, ``nce_momentum`` 0.5, ``ce_weight`` 1, ``kd_weight`` 0 (T = 4). Works
    across architectures. Needs the context ``num_samples``.
    """

    name = "crd"

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 num_samples: int | None = None, crd_weight: float = 0.8, feat_dim: int = 128,
                 nce_k: int = 16384, nce_t: float = 0.07, nce_momentum: float = 0.5,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature, teacher_layers=teacher_layers,
                         student_layers=student_layers, input_shape=input_shape)
        if num_samples is None:
            raise ValueError("crd needs num_samples (the training-set size) for its memory; pass "
                             "num_samples= to build_distiller")
        if int(num_samples) != num_samples or num_samples < 2:
            raise ValueError(f"crd needs num_samples >= 2, got {num_samples!r}")
        for name, v in (("feat_dim", feat_dim), ("nce_k", nce_k)):
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0.0 <= nce_momentum < 1.0:
            raise ValueError(f"nce_momentum must be in [0, 1), got {nce_momentum!r}")
        self.crd_weight = check_weight("crd_weight", crd_weight)
        self.nce_t = check_positive("nce_t", nce_t)
        self.nce_momentum = float(nce_momentum)
        self.num_samples = int(num_samples)
        self.nce_k = min(int(nce_k), self.num_samples - 1)
        self.need_pooled()
        d = int(feat_dim)
        self.embed_s = Embed(self.s_shapes.pooled, d)
        self.embed_t = Embed(self.t_shapes.pooled, d)
        bound = 1.0 / math.sqrt(d / 3)
        self.register_buffer("memory_s", torch.rand(self.num_samples, d).mul_(2 * bound).sub_(bound))
        self.register_buffer("memory_t", torch.rand(self.num_samples, d).mul_(2 * bound).sub_(bound))
        # Normalising constants; negative means "not set yet" (fixed on the first step).
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))

    def contrast_indices(self, index: Tensor) -> Tensor:
        """(B, 1 + K): each sample's own index, then K uniform draws over all samples.

        Under DDP the draws are made for the whole global batch and this process keeps the rows
        of its slice: the same numbers a single process draws for these samples."""
        lo, hi, total = distributed.batch_layout(len(index), index.device)
        neg = torch.randint(0, self.num_samples, (total, self.nce_k), device=index.device)[lo:hi]
        return torch.cat([index.view(-1, 1).to(neg.dtype), neg], dim=1)

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        e_s = self.embed_s(s_feats["pooled"])
        e_t = self.embed_t(t_feats["pooled"])
        idx = self.contrast_indices(index)
        rows_s = self.memory_s[idx].detach()
        rows_t = self.memory_t[idx].detach()
        if self.z_student < 0 or self.z_teacher < 0:
            with torch.no_grad():
                s_scores = contrast_scores(e_s, rows_t, self.nce_t)
                t_scores = contrast_scores(e_t, rows_s, self.nce_t)
                if distributed.is_distributed():
                    # The mean over the global batch, as a single process computes it.
                    stats = torch.stack([s_scores.sum().double(), t_scores.sum().double(),
                                         torch.tensor(float(s_scores.numel()),
                                                      dtype=torch.float64, device=e_s.device)])
                    s_mean, t_mean, count = distributed.all_reduce_sum(stats).tolist()
                    s_mean, t_mean = s_mean / count, t_mean / count
                else:
                    s_mean, t_mean = s_scores.mean(), t_scores.mean()
                self.z_student.fill_(s_mean * self.num_samples)
                self.z_teacher.fill_(t_mean * self.num_samples)
        loss = crd_loss(e_s, e_t, rows_s, rows_t, self.z_student, self.z_teacher,
                        self.num_samples, self.nce_t)
        if self.training:
            self.update_memory(index, e_s.detach(), e_t.detach())
        return {"crd": self.crd_weight * loss}

    @torch.no_grad()
    def update_memory(self, index: Tensor, embed_s: Tensor, embed_t: Tensor) -> None:
        """Momentum update of the batch's rows: ``normalize(m * row + (1 - m) * embedding)``.

        Under DDP the rows of every process are gathered first (a no-op in one process)."""
        if distributed.is_distributed():
            index, embed_s, embed_t = distributed.all_gather_rows(
                index, embed_s.float(), embed_t.float())
        m = self.nce_momentum
        for memory, e in ((self.memory_s, embed_s), (self.memory_t, embed_t)):
            rows = memory[index] * m + e.to(memory.dtype) * (1 - m)
            memory[index] = F.normalize(rows, dim=1)
