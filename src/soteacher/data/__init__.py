"""Datasets: a registry of builders returning ``DataBundle``s, plus the dataset containers.

Builders are plain functions of keyword options (each with a default)::

    known_truth   synthetic shifted Gaussian mixture with known p*(y|x) (the SoTeacher testbed)
    mnist1d       MNIST-1D, generated locally with the ``mnist1d`` package
    digits        scikit-learn's 8x8 handwritten digits

``build_dataset(name, **options)`` calls the builder registered as ``name``.
"""

from __future__ import annotations

from typing import Any

from .augment import RandomCropPad, RandomFlip, RandomRoll
from .base import DATASETS, ArrayDataset, DataBundle, IndexedDataset
from .known_truth import KnownTruthTask, OracleTeacher
from . import digits as _digits, mnist1d as _mnist1d  # noqa: F401  (registers the builders)

__all__ = [
    "DATASETS", "ArrayDataset", "DataBundle", "IndexedDataset", "KnownTruthTask", "OracleTeacher",
    "RandomCropPad", "RandomFlip", "RandomRoll", "build_dataset", "list_datasets",
]


def build_dataset(name: str, **options: Any) -> DataBundle:
    """The ``DataBundle`` of dataset ``name`` built with keyword ``options``.

    An unknown name raises ``KeyError`` listing the available ones; an unknown option raises the
    builder's ``TypeError``.
    """
    return DATASETS.get(name)(**options)


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted."""
    return DATASETS.names()
