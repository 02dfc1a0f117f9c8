"""Datasets: a registry of builders returning ``DataBundle``s, plus the dataset containers.

Builders are plain functions of keyword options (each with a default)::

    known_truth   synthetic shifted Gaussian mixture with known p*(y|x) (the SoTeacher testbed)
    known_truth_net  synthetic 1-D signals labelled by a fixed random network's softmax (known p*)
    mnist1d       MNIST-1D, generated locally with the ``mnist1d`` package
    digits        scikit-learn's 8x8 handwritten digits
    cifar10       CIFAR-10 from the python-version archive or its folder (uint8 images)
    cifar100      CIFAR-100, likewise
    tiny_imagenet Tiny-ImageNet (200 classes, 64x64) from its folder, decoded with Pillow
    imagenet      ImageNet from train/<class>/ and val/<class>/ folders, decoded with Pillow

Image datasets keep uint8 pixels; their bundle's ``preprocess`` converts batches to normalised
float on the device. ``soteacher.data.download.download`` fetches CIFAR-10/100.

``build_dataset(name, **options)`` calls the builder registered as ``name``.
"""

from __future__ import annotations

from typing import Any

from .augment import (Normalize, RandomCropPad, RandomFlip, RandomResizedCrop, RandomRoll,
                      ToFloat)
from .base import DATASETS, ArrayDataset, DataBundle, IndexedDataset
from .known_truth import KnownTruthTask, OracleTeacher
from .known_truth_net import NetOracleTeacher, NetTruthTask, oracle_teacher
from . import digits as _digits, mnist1d as _mnist1d  # noqa: F401  (registers the builders)
from .cifar import ImageArrayDataset, UnsafePickleError  # (registers cifar10, cifar100)
from .download import ChecksumError, DatasetError  # the module stays soteacher.data.download
from .imagefolder import ImageFolderDataset  # (registers tiny_imagenet, imagenet)

__all__ = [
    "DATASETS", "ArrayDataset", "ChecksumError", "DataBundle", "DatasetError", "ImageArrayDataset",
    "ImageFolderDataset", "IndexedDataset", "KnownTruthTask", "NetOracleTeacher", "NetTruthTask",
    "Normalize", "OracleTeacher", "RandomCropPad", "RandomFlip", "RandomResizedCrop", "RandomRoll",
    "ToFloat", "UnsafePickleError", "build_dataset", "list_datasets", "oracle_teacher",
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
