"""MNIST-1D (Greydanus, 2020): 10 classes of 1D signals of length 40, generated locally.

The data are produced with the ``mnist1d`` package's generator (never its download path), so
they depend only on ``num_samples``, ``train_split`` and ``seed``.
"""

from __future__ import annotations

import random

import numpy as np

from .augment import RandomCropPad
from .base import DATASETS, ArrayDataset, DataBundle

__all__ = ["mnist1d"]


@DATASETS.register("mnist1d")
def mnist1d(num_samples: int = 5000, train_split: float = 0.8, seed: int = 42,
            max_shift: int = 4) -> DataBundle:
    """MNIST-1D with inputs (1, 40) and 10 classes.

    ``num_samples`` are generated (rounded down to a multiple of 10: the generator makes equal
    numbers per class) and the first ``train_split`` of them form the training set. The
    augmentation translates each signal by up to ``max_shift`` positions with zero fill.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError(
            "mnist1d is needed for this dataset: pip install 'soteacher[data]'") from e
    if not 0.0 < train_split < 1.0:
        raise ValueError(f"train_split must be in (0, 1); got {train_split}")
    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.train_split = float(train_split)
    args.seed = int(seed)
    # make_dataset reseeds numpy's and Python's global RNGs; keep the caller's streams intact.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    train = ArrayDataset(np.asarray(d["x"], np.float32)[:, None, :], np.asarray(d["y"], np.int64))
    test = ArrayDataset(np.asarray(d["x_test"], np.float32)[:, None, :],
                        np.asarray(d["y_test"], np.int64))
    return DataBundle(name="mnist1d", train=train, test=test, num_classes=10,
                      input_shape=(1, train.x.shape[-1]),
                      augment=RandomCropPad(max_shift) if max_shift > 0 else None)
