"""Evaluation metrics as pure functions on tensors.

Conventions: ``logits`` is (N, C); ``y`` is (N,) int64 class indices; ``log_p`` / ``log_q`` /
``log_p_true`` are (N, C) log-probability matrices (``-inf`` allowed for zero probability).
Computation is done in float64 on CPU-cheap tensors: the values are reported and compared
across runs, so float32 rounding (e.g. in a KL of nearly equal distributions) is unwelcome.
Scalar results are Python floats.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["accuracy", "agreement", "bayes_accuracy", "classification_metrics", "ece",
           "kl_divergence", "nll", "reliability", "truth_metrics", "tv_distance"]


# ---- input checks ------------------------------------------------------------------------------
def _matrix(t: Tensor, name: str) -> Tensor:
    t = torch.as_tensor(t)
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (N, C) matrix, got shape {tuple(t.shape)}")
    return t.detach().to(torch.float64)


def _labels(y: Tensor, n: int) -> Tensor:
    y = torch.as_tensor(y).detach()
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},) to match the logits, got {tuple(y.shape)}")
    return y.long()


def _pair(a: Tensor, b: Tensor, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    a, b = _matrix(a, names[0]), _matrix(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    # Same device for the elementwise arithmetic; metrics are cheap enough for the CPU.
    return a.cpu(), b.cpu()


def _reduce(per_row: Tensor, reduction: str) -> float | Tensor:
    if reduction == "mean":
        return float(per_row.mean())
    if reduction == "none":
        return per_row
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# ---- classification ----------------------------------------------------------------------------
def accuracy(logits: Tensor, y: Tensor) -> float:
    """Top-1 accuracy: fraction of rows of ``logits`` (N, C) whose argmax equals ``y`` (N,)."""
    logits = _matrix(logits, "logits")
    y = _labels(y, logits.shape[0]).to(logits.device)
    return float((logits.argmax(dim=1) == y).double().mean())


def nll(logits: Tensor, y: Tensor) -> float:
    """Mean cross entropy (negative log-likelihood) of labels ``y`` (N,) under ``logits`` (N, C)."""
    logits = _matrix(logits, "logits")
    y = _labels(y, logits.shape[0]).to(logits.device)
    return float(F.cross_entropy(logits, y))


def _binning(logits: Tensor, y: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Equal-width confidence bins on (0, 1]: returns edges (n_bins+1,), counts, summed
    correctness and summed confidence per bin (each (n_bins,))."""
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins!r}")
    n_bins = int(n_bins)
    logits = _matrix(logits, "logits").cpu()
    y = _labels(y, logits.shape[0]).cpu()
    probs = logits.softmax(dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == y).double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # bucketize with right=False gives i such that uppers[i-1] < conf <= uppers[i], i.e. the bin
    # (lower, upper] with lower exclusive. The clamp only guards against conf rounding above 1.
    idx = torch.bucketize(conf, edges[1:], right=False).clamp_(max=n_bins - 1)
    counts = torch.bincount(idx, minlength=n_bins).double()
    sum_correct = torch.bincount(idx, weights=correct, minlength=n_bins)
    sum_conf = torch.bincount(idx, weights=conf, minlength=n_bins)
    return edges, counts, sum_correct, sum_conf


def ece(logits: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of ``logits`` (N, C) against labels ``y`` (N,).

    Confidence is the max softmax probability; bins are ``n_bins`` equal-width intervals
    ``(lower, upper]`` on (0, 1]. ECE = sum_b (|b| / N) * |acc_b - mean_conf_b|.
    """
    _, counts, sum_correct, sum_conf = _binning(logits, y, n_bins)
    # (|b|/N) * |acc_b - conf_b| = |sum_correct_b - sum_conf_b| / N; this form needs no
    # division by empty bin counts.
    return float((sum_correct - sum_conf).abs().sum() / counts.sum())


def reliability(logits: Tensor, y: Tensor, n_bins: int = 15) -> dict[str, Any]:
    """Per-bin statistics for a reliability diagram, with the binning of :func:`ece`.

    Returns ``{"edges": [n_bins + 1 floats], "counts": [n_bins ints], "accuracies": [...],
    "confidences": [...]}``; accuracy and mean confidence are ``nan`` for empty bins.
    """
    edges, counts, sum_correct, sum_conf = _binning(logits, y, n_bins)
    nonempty = counts > 0
    nan = torch.full_like(counts, float("nan"))
    acc = torch.where(nonempty, sum_correct / counts.clamp(min=1), nan)
    conf = torch.where(nonempty, sum_conf / counts.clamp(min=1), nan)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()],
            "accuracies": acc.tolist(), "confidences": conf.tolist()}


def agreement(logits_a: Tensor, logits_b: Tensor) -> float:
    """Fraction of rows where two (N, C) score matrices have the same argmax (e.g. teacher and
    student predictions)."""
    a, b = _pair(logits_a, logits_b, ("logits_a", "logits_b"))
    return float((a.argmax(dim=1) == b.argmax(dim=1)).double().mean())


def classification_metrics(logits: Tensor, y: Tensor, n_bins: int = 15) -> dict[str, float]:
    """``{"acc", "nll", "ece"}`` of ``logits`` (N, C) against labels ``y`` (N,)."""
    return {"acc": accuracy(logits, y), "nll": nll(logits, y), "ece": ece(logits, y, n_bins)}


# ---- distances between label distributions -----------------------------------------------------
def _log_normalise(log_p: Tensor) -> Tensor:
    # Identity on proper log-probabilities (up to rounding); makes logits acceptable too.
    return log_p.log_softmax(dim=1)


def tv_distance(log_p: Tensor, log_q: Tensor, reduction: str = "mean") -> float | Tensor:
    """Total-variation distance 0.5 * sum_c |p_c - q_c| per row of two (N, C) log-probability
    matrices. ``reduction="mean"`` -> float; ``"none"`` -> Tensor (N,) float64."""
    log_p, log_q = _pair(log_p, log_q, ("log_p", "log_q"))
    p, q = _log_normalise(log_p).exp(), _log_normalise(log_q).exp()
    # Rounding can put two disjoint distributions a hair above 1; the distance is at most 1.
    return _reduce((0.5 * (p - q).abs().sum(dim=1)).clamp(max=1.0), reduction)


def kl_divergence(log_p: Tensor, log_q: Tensor, reduction: str = "mean") -> float | Tensor:
    """KL(p || q) = sum_c p_c (log p_c - log q_c) per row of two (N, C) log-probability matrices.

    Terms with p_c == 0 contribute 0 (0 log 0 = 0), even where q_c == 0 too; p_c > 0 with
    q_c == 0 gives ``inf``. ``reduction="mean"`` -> float; ``"none"`` -> Tensor (N,) float64.
    """
    log_p, log_q = _pair(log_p, log_q, ("log_p", "log_q"))
    log_p, log_q = _log_normalise(log_p), _log_normalise(log_q)
    p = log_p.exp()
    # torch.where, not p * (...): with log p = log q = -inf the difference is nan and
    # 0 * nan would stay nan.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    # KL >= 0 exactly; clamp the ~1e-17 negatives rounding produces for equal rows.
    return _reduce(terms.sum(dim=1).clamp(min=0.0), reduction)


def bayes_accuracy(log_p_true: Tensor) -> float:
    """Expected accuracy of the Bayes classifier: mean over rows of max_c p*(c | x), with
    ``log_p_true`` (N, C) the true log label distribution."""
    log_p = _log_normalise(_matrix(log_p_true, "log_p_true"))
    return float(log_p.exp().max(dim=1).values.mean())


def truth_metrics(logits: Tensor, log_p_true: Tensor) -> dict[str, float]:
    """Distance of a model's predictive distribution to the true one, both (N, C):
    ``{"tv_true": mean TV, "kl_true": mean KL(p* || model)}``."""
    logits, log_p_true = _pair(logits, log_p_true, ("logits", "log_p_true"))
    log_model = logits.log_softmax(dim=1)
    return {"tv_true": float(tv_distance(log_p_true, log_model)),
            "kl_true": float(kl_divergence(log_p_true, log_model))}
