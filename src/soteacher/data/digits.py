"""scikit-learn's handwritten digits: 1797 grey 8x8 images, 10 classes (ships with sklearn)."""

from __future__ import annotations

import numpy as np
import torch

from .augment import RandomCropPad
from .base import DATASETS, ArrayDataset, DataBundle

__all__ = ["digits"]


@DATASETS.register("digits")
def digits(test_fraction: float = 0.3, seed: int = 0) -> DataBundle:
    """Digits with inputs (1, 8, 8) scaled to [0, 1] and a stratified random split.

    Each class contributes ``round(test_fraction * its size)`` test images, chosen by a
    permutation seeded with ``seed``. The augmentation is a random translation by up to one
    pixel per axis with zero fill (random crop with padding 1).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("scikit-learn is needed for this dataset: "
                          "pip install 'soteacher[data]'") from e
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    raw = load_digits()
    x = torch.as_tensor(np.asarray(raw.images, np.float32) / 16.0)[:, None]   # (N, 1, 8, 8)
    y = torch.as_tensor(np.asarray(raw.target, np.int64))
    g = torch.Generator().manual_seed(int(seed))
    test_idx, train_idx = [], []
    for c in range(10):
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_test = int(round(test_fraction * len(members)))
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    # Shuffle so the classes are interleaved rather than in blocks.
    train_idx = torch.cat(train_idx)[torch.randperm(sum(map(len, train_idx)), generator=g)]
    test_idx = torch.cat(test_idx)[torch.randperm(sum(map(len, test_idx)), generator=g)]
    return DataBundle(name="digits", train=ArrayDataset(x[train_idx], y[train_idx]),
                      test=ArrayDataset(x[test_idx], y[test_idx]), num_classes=10,
                      input_shape=(1, 8, 8), augment=RandomCropPad(1))
