"""Evaluation of a classifier on a dataset: predictions, calibration, distance to the truth."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .. import metrics as M


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"cpu" -> CPU; "auto" -> CUDA when available, else CPU; anything else as given."""
    if device is None:
        return torch.device("cpu")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available; "
                         f"use the CPU (device='cpu' in the Python API, --device cpu on the "
                         f"command line)")
    return dev


def iterate_eval(dataset: Dataset, batch_size: int):
    """Yield ``(x, y)`` batches in order, slicing in-memory datasets directly."""
    if hasattr(dataset, "x") and hasattr(dataset, "y"):
        for i in range(0, len(dataset), batch_size):
            yield dataset.x[i:i + batch_size], dataset.y[i:i + batch_size]
        return
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield batch[0], batch[1]


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, device: torch.device | str | None = None,
            batch_size: int = 1024, truth: Any = None,
            preprocess: nn.Module | None = None) -> dict[str, Tensor]:
    """Logits (N, C) and labels (N,) of ``model`` in eval mode, without augmentation.

    ``preprocess`` (e.g. uint8 -> normalised float) is applied to each batch on the device. With
    ``truth`` (an object with ``log_prob(x) -> (B, C)``) also ``log_p_true`` (N, C), computed on
    the raw inputs. The model's train/eval mode is restored afterwards.
    """
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    logits, ys, truths = [], [], []
    try:
        for x, y in iterate_eval(dataset, batch_size):
            x = x.to(device)
            if truth is not None:
                truths.append(truth.log_prob(x).float().cpu())
            if preprocess is not None:
                x = preprocess.to(device)(x)
            logits.append(model(x).float().cpu())
            ys.append(torch.as_tensor(y).long())
    finally:
        model.train(was_training)
    out = {"logits": torch.cat(logits), "y": torch.cat(ys)}
    if truth is not None:
        out["log_p_true"] = torch.cat(truths)
    return out


def evaluate(model: nn.Module, dataset: Dataset, truth: Any = None,
             device: torch.device | str | None = None, batch_size: int = 1024,
             prefix: str = "", preprocess: nn.Module | None = None) -> dict[str, float]:
    """Top-1 accuracy, NLL and ECE (15 bins); with ``truth`` also the mean total-variation distance
    and KL(p* || model) to the true label distribution. Keys are prefixed with ``prefix``."""
    pred = predict(model, dataset, device, batch_size, truth, preprocess)
    out = M.classification_metrics(pred["logits"], pred["y"])
    if truth is not None:
        out.update(M.truth_metrics(pred["logits"], pred["log_p_true"]))
    return {prefix + k: v for k, v in out.items()}
