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

#: values of the ``negatives`` option of :class:`CRD`, the default first
NEGATIVES = ("class", "uniform")

#: rows x samples per block of :func:`class_negatives` (bounds its temporary memory)
_BLOCK = 1 << 24


def nce_loss(scores: Tensor, num_samples: int, eps: float = 1e-7,
             reduction: str = "mean") -> Tensor:
    """NCE loss of CRD on normalised scores (B, 1 + K): column 0 the positive, the rest the K
    negatives, with noise probability ``1 / N`` for ``N = num_samples``.

    Per sample ``-[log(P_0 / (P_0 + K/N + eps)) + sum_k log((K/N) / (P_k + K/N + eps))]``, so
    ``"mean"`` is the reference's sum over the batch divided by its size (RepDistiller's
    ``ContrastLoss``, equal in ``tests/test_fidelity_relations.py``).
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
             teacher_rows: Tensor, z_student: float | Tensor, z_teacher: float | Tensor,
             num_samples: int, temperature: float = 0.07, eps: float = 1e-7,
             reduction: str = "mean") -> Tensor:
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


def class_negatives(keys: Tensor, u: Tensor, labels: Tensor, anchor_labels: Tensor,
                    anchor_index: Tensor) -> Tensor:
    """K negative indices per anchor among the samples of *other* classes, from given uniform
    random numbers: RepDistiller's ``mode='exact'`` sampling (its CIFAR-100 dataset's
    ``np.random.choice(cls_negative[target], K, replace=K > len(cls_negative[target]))``).

    ``keys`` (B, N) and ``u`` (B, K) are uniform in [0, 1); ``labels`` (N,) the class of every
    sample (-1: not known yet); ``anchor_labels`` and ``anchor_index`` (B,) each anchor's class
    (-1: not known) and dataset index. A sample is a candidate for an anchor if it is not the
    anchor itself and its class differs from the anchor's, or either class is unknown. With at
    least K candidates the K with the largest keys are taken (a uniform draw without
    replacement); with fewer, ``u`` picks K of them with replacement. An anchor without any
    candidate (a one-class data set) draws among all the other samples.

    Returns (B, K) int64 indices; needs K < N. No host synchronisation.
    """
    b, n = keys.shape
    k = u.shape[1]
    rows = torch.arange(b, device=keys.device)
    known = (labels[None, :] >= 0) & (anchor_labels[:, None] >= 0)
    cand = ~known | (labels[None, :] != anchor_labels[:, None])
    cand[rows, anchor_index] = False
    count = cand.sum(dim=1)
    others = torch.ones_like(cand)
    others[rows, anchor_index] = False
    cand = torch.where((count > 0)[:, None], cand, others)
    count = cand.sum(dim=1)
    distinct = torch.where(cand, keys, -1.0).topk(k, dim=1, sorted=False).indices
    rank = (u * count[:, None]).long().minimum(count[:, None] - 1)
    repeated = torch.searchsorted(cand.cumsum(dim=1), rank + 1).clamp(max=n - 1)
    return torch.where((count >= k)[:, None], distinct, repeated)


class CRD(FeatureDistiller):
    """CRD: ``ce + crd_weight * crd_loss``, with memory banks of every training sample.

    The pooled features of student and teacher (B, F_s), (B, F_t) are embedded (linear + L2
    norm to ``feat_dim``, both learnable and trained with the student). Two memory banks of
    shape ``(num_samples, feat_dim)`` (buffers, so they go into checkpoints), initialised
    uniform in ``[-s, s]`` with ``s = 1 / sqrt(feat_dim / 3)``, hold a momentum average of each
    sample's student and teacher embedding: after every training step the rows of the batch
    become ``normalize(momentum * row + (1 - momentum) * embedding)``. Row 0 of each sample's
    contrast set is the sample itself, then ``K = min(nce_k, num_samples - 1)`` negatives. The
    normalising constants Z are fixed on the first step to ``mean(scores) * N`` and stored as
    buffers; the memories are only read, never updated, in eval mode. Given the same contrast
    indices, :meth:`contrast_loss` equals RepDistiller's ``CRDLoss`` step by step (loss, Z,
    memories and gradients; ``tests/test_fidelity_relations.py``).

    ``negatives`` chooses how the K negatives are drawn:

    * ``"class"`` (default, RepDistiller's ``mode='exact'`` used by its CIFAR-100 scripts): K
      distinct samples of other classes (:func:`class_negatives`; with replacement only when a
      class has fewer than K others). The classes come from ``sample_labels`` (the training
      set's labels in dataset-index order) when given; otherwise they are learned from the
      batches (``y`` at ``index``) and a sample whose class is not known yet, during the first
      epoch, counts as another class (so in epoch 1 a negative may share the anchor's class,
      about 1 in C for C balanced classes); the sample itself is never a negative;
    * ``"uniform"``: K draws with replacement over all samples, the sampler the reference
      memory falls back on when it is given no contrast indices (``AliasMethod`` over uniform
      weights).

    Several processes (DDP): the memories and labels are replicated; after every step the rows
    of all processes are all-gathered and every replica applies the same update, random numbers
    are drawn for the whole global batch (each process keeps its slice) and Z is the mean over
    the global batch, so a run follows a single-process run.

    Deviation: ``nce_k`` is capped at ``num_samples - 1`` for small data sets (the reference
    would draw 16384 indices with replacement; CIFAR-100's 50000 samples are not affected).

    Defaults (RepDistiller's ``train_student.py`` and ``run_cifar_distill.sh``, ``-a 0 -b
    0.8``): ``crd_weight`` 0.8, ``feat_dim`` 128, ``nce_k`` 16384, ``nce_t`` 0.07,
    ``nce_momentum`` 0.5, ``negatives`` "class", ``ce_weight`` 1, ``kd_weight`` 0 (T = 4).
    Works across architectures. Needs the context ``num_samples``.
    """

    name = "crd"

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 num_samples: int | None = None, crd_weight: float = 0.8, feat_dim: int = 128,
                 nce_k: int = 16384, nce_t: float = 0.07, nce_momentum: float = 0.5,
                 negatives: str = "class", sample_labels: Sequence[int] | Tensor | None = None,
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
        if negatives not in NEGATIVES:
            raise ValueError(f"unknown negatives {negatives!r}; use one of {', '.join(NEGATIVES)}")
        self.crd_weight = check_weight("crd_weight", crd_weight)
        self.nce_t = check_positive("nce_t", nce_t)
        self.nce_momentum = float(nce_momentum)
        self.negatives = negatives
        self.num_samples = int(num_samples)
        self.nce_k = min(int(nce_k), self.num_samples - 1)
        self.need_pooled()
        d = int(feat_dim)
        self.embed_s = Embed(self.s_shapes.pooled, d)
        self.embed_t = Embed(self.t_shapes.pooled, d)
        bound = 1.0 / math.sqrt(d / 3)
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, torch.rand(self.num_samples, d).mul_(2 * bound).sub_(bound))
        # Normalising constants; negative means "not set yet" (fixed on the first step).
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        # Each sample's class for the "class" negatives; -1 while not known.
        self.register_buffer("sample_labels", self._labels(sample_labels))
        # Whether Z may still be unset: checked (without a host read) on the first step after
        # construction or loading a state dict.
        self._z_pending = True
        self.register_load_state_dict_post_hook(_z_check_again)

    def _labels(self, sample_labels: Sequence[int] | Tensor | None) -> Tensor:
        if sample_labels is None:
            return torch.full((self.num_samples,), -1, dtype=torch.long)
        labels = torch.as_tensor(sample_labels)
        if labels.shape != (self.num_samples,) or labels.is_floating_point():
            raise ValueError(f"sample_labels must hold one integer class per training sample "
                             f"({self.num_samples}), got shape {tuple(labels.shape)} and dtype "
                             f"{labels.dtype}; pass the training set's labels in index order")
        if len(labels) and int(labels.min()) < 0:
            raise ValueError("sample_labels must be class indices >= 0")
        return labels.to(torch.long).clone()

    # ---- sampling --------------------------------------------------------------------------
    def contrast_indices(self, index: Tensor, y: Tensor | None = None) -> Tensor:
        """(B, 1 + K): each sample's own index, then its K negatives (see ``negatives``).

        ``y`` (B,) are the samples' classes (by default the known ``sample_labels``). Under DDP
        the random numbers are drawn for the whole global batch and this process keeps the rows
        of its slice: the same numbers a single process draws for these samples."""
        lo, hi, total = distributed.batch_layout(len(index), index.device)
        k, n = self.nce_k, self.num_samples
        if self.negatives == "uniform":
            neg = torch.randint(0, n, (total, k), device=index.device)[lo:hi]
        else:
            labels = self.sample_labels.to(index.device)
            anchor = labels[index] if y is None or y.dim() != 1 else y.to(torch.long)
            block = max(1, _BLOCK // n)
            parts = []
            for start in range(0, total, block):       # same draws as one process, in blocks
                stop = min(start + block, total)
                keys = torch.rand(stop - start, n, device=index.device)
                u = torch.rand(stop - start, k, device=index.device)
                a, b = max(start, lo), min(stop, hi)
                if a < b:
                    parts.append(class_negatives(keys[a - start:b - start], u[a - start:b - start],
                                                 labels, anchor[a - lo:b - lo],
                                                 index[a - lo:b - lo]))
            neg = torch.cat(parts) if parts else index.new_zeros(0, k, dtype=torch.long)
        return torch.cat([index.view(-1, 1).to(neg.dtype), neg], dim=1)

    # ---- the loss --------------------------------------------------------------------------
    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        idx = self.contrast_indices(index, y)
        loss = self.contrast_loss(s_feats["pooled"], t_feats["pooled"], index, idx, y)
        return {"crd": self.crd_weight * loss}

    def contrast_loss(self, f_s: Tensor, f_t: Tensor, index: Tensor, contrast_idx: Tensor,
                      y: Tensor | None = None) -> Tensor:
        """The unweighted CRD loss of pooled features (B, F_s), (B, F_t) for the samples
        ``index`` (B,) with contrast indices (B, 1 + K), column 0 the samples themselves: embed,
        score against the memories, fix Z on the first step, and (in training mode) update the
        memories and record the classes ``y``."""
        e_s, e_t = self.embed_s(f_s), self.embed_t(f_t)
        rows_s = self.memory_s[contrast_idx].detach()
        rows_t = self.memory_t[contrast_idx].detach()
        if self._z_pending:
            self._fix_z(e_s, e_t, rows_s, rows_t)
        loss = crd_loss(e_s, e_t, rows_s, rows_t, self.z_student, self.z_teacher,
                        self.num_samples, self.nce_t)
        if self.training:
            self.update_memory(index, e_s.detach(), e_t.detach(), y)
        return loss

    @torch.no_grad()
    def _fix_z(self, e_s: Tensor, e_t: Tensor, rows_s: Tensor, rows_t: Tensor) -> None:
        """Set each Z still unset (< 0) to ``mean(scores) * N`` over the (global) batch."""
        s_scores = contrast_scores(e_s, rows_t, self.nce_t)
        t_scores = contrast_scores(e_t, rows_s, self.nce_t)
        if distributed.is_distributed():
            # The mean over the global batch, as a single process computes it.
            stats = torch.stack([s_scores.sum().double(), t_scores.sum().double(),
                                 torch.tensor(float(s_scores.numel()), dtype=torch.float64,
                                              device=e_s.device)])
            stats = distributed.all_reduce_sum(stats)
            s_mean, t_mean = stats[0] / stats[2], stats[1] / stats[2]
        else:
            s_mean, t_mean = s_scores.mean(), t_scores.mean()
        for z, mean in ((self.z_student, s_mean), (self.z_teacher, t_mean)):
            z.copy_(torch.where(z < 0, (mean * self.num_samples).to(z.dtype), z))
        self._z_pending = False

    @torch.no_grad()
    def update_memory(self, index: Tensor, embed_s: Tensor, embed_t: Tensor,
                      y: Tensor | None = None) -> None:
        """Momentum update of the batch's rows: ``normalize(m * row + (1 - m) * embedding)``,
        and the batch's classes ``y`` into ``sample_labels``.

        Under DDP the rows of every process are gathered first (a no-op in one process)."""
        labels = y is not None and y.dim() == 1 and not y.is_floating_point()
        rows = (index, embed_s, embed_t) + ((y,) if labels else ())
        if distributed.is_distributed():
            rows = distributed.all_gather_rows(*rows)
        index, embed_s, embed_t = rows[:3]
        m = self.nce_momentum
        for memory, e in ((self.memory_s, embed_s), (self.memory_t, embed_t)):
            new = memory[index] * m + e.to(memory.dtype) * (1 - m)
            memory[index] = F.normalize(new, dim=1)
        if labels:
            self.sample_labels[index] = rows[3].to(self.sample_labels.dtype)


def _z_check_again(module: CRD, incompatible_keys: Any) -> None:
    module._z_pending = True
