"""Dataset containers whose items are ``(input, label, index)``.

The index lets per-sample state (e.g. SoTeacher's consistency bank of past predictions) be looked
up for each example of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..registry import Registry

if TYPE_CHECKING:
    from .known_truth import KnownTruthTask
    from .known_truth_net import NetTruthTask

__all__ = ["DATASETS", "ArrayDataset", "IndexedDataset", "DataBundle", "dataset_labels"]

#: Dataset builders by name; each is a function of keyword options returning a ``DataBundle``.
DATASETS = Registry("dataset")


def dataset_labels(dataset: Dataset) -> Tensor | None:
    """Every sample's label (N,) in index order, where the dataset holds them without loading
    its inputs (``y`` of an :class:`ArrayDataset`, ``targets`` of an image folder); else None."""
    for attr in ("y", "targets"):
        labels = getattr(dataset, attr, None)
        if isinstance(labels, Tensor) and labels.dim() == 1 and len(labels) == len(dataset):
            return labels
    return None


class ArrayDataset(Dataset):
    """In-memory dataset; item ``i`` is ``(x[i], y[i], i)``.

    ``x`` is float32 of shape (N, *input_shape) (``dtype=None`` keeps its dtype) and ``y`` int64 of
    shape (N,). Both are public: the trainer slices them directly instead of going through a
    DataLoader.
    """

    def __init__(self, x: Tensor | np.ndarray, y: Tensor | np.ndarray,
                 dtype: torch.dtype | None = torch.float32) -> None:
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if x.dim() < 1 or y.dim() != 1:
            raise ValueError(f"expected x of shape (N, ...) and y of shape (N,); got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if len(x) != len(y):
            raise ValueError(f"x and y have different lengths: {len(x)} and {len(y)}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError("labels must be integer class indices")
        self.x: Tensor = x if dtype is None else x.to(dtype)
        self.y: Tensor = y.to(torch.int64)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        i = int(i)
        return self.x[i], self.y[i], i

    def __repr__(self) -> str:
        return f"ArrayDataset(n={len(self)}, input_shape={tuple(self.x.shape[1:])})"


def _as_label(y: Any, i: int) -> Tensor:
    t = torch.as_tensor(y)
    if t.numel() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"item {i}: the label must be an integer class index; got {y!r}")
    return t.reshape(()).to(torch.int64)


class IndexedDataset(Dataset):
    """Wraps a map-style dataset whose items are ``(x, y)`` so that items become ``(x, y, index)``.

    ``y`` becomes an int64 scalar tensor; an ``x`` that is not a tensor (e.g. a numpy array)
    becomes a float32 tensor. Items are checked when accessed: anything that is not an
    ``(input, label)`` pair raises ``ValueError``.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        i = int(i)
        item = self.dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            what = type(item).__name__
            if isinstance(item, (tuple, list)):
                what += f" of length {len(item)}"
            raise ValueError(f"the dataset must return (input, label) pairs; item {i} is a {what}")
        x, y = item
        if not isinstance(x, Tensor):
            x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        return x, _as_label(y, i), i

    def __repr__(self) -> str:
        return f"IndexedDataset({self.dataset!r})"


@dataclass
class DataBundle:
    """Everything a run needs to know about a dataset.

    ``train`` and ``test`` yield ``(x, y, index)`` items. ``augment`` is applied by the trainer to
    whole batches (B, *input_shape) on the device, during training only. ``truth`` is set only for
    data whose true label distribution p*(y|x) is known (``KnownTruthTask``, ``NetTruthTask``:
    ``log_prob(x)``, ``bayes_accuracy(x)``; ``soteacher.data.oracle_teacher(truth)`` is the
    teacher whose logits are log p*).

    ``preprocess`` is a deterministic batch transform applied on the device to every batch before
    it reaches a model: in training (after ``augment``) and in evaluation alike. Image datasets
    store uint8 pixels (N, C, H, W) and augment them as uint8; their ``preprocess`` converts to
    float and normalises (``Normalize(mean, std)``). ``None`` (the default) means the items are
    already model inputs, as for the float datasets. ``input_shape`` is the shape the model sees,
    i.e. after ``augment`` and ``preprocess`` (it may differ from the stored items' shape, e.g.
    ImageNet training images stored larger than the random crops taken from them).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    augment: nn.Module | None
    truth: KnownTruthTask | NetTruthTask | None = None
    preprocess: nn.Module | None = None
    #: What the ``test`` slot holds: the prefix of its metrics in a run's log (``test_acc``).
    #: ``soteacher tune`` puts the validation split there and names it ``"val"``.
    test_name: str = "test"
