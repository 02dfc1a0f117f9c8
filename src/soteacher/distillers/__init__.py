"""Distillation algorithms, registered by lower-case name (``soteacher list distillers``).

A distiller class takes the frozen ``teacher`` first; it may also declare the context arguments
``student``, ``num_samples`` and ``num_classes``; every other parameter is a user option.

Logit-based: ``kd``, ``dkd``, ``dist`` (each with the option ``logit_standardize``).
Feature-based (see :mod:`.common` for features, stage pairing and preliminary stages):
``fitnet``, ``at``, ``sp``, ``cc``, ``vid``, ``rkd``, ``pkt``, ``ab``, ``ft``, ``fsp``, ``nst``,
``crd``. Each class docstring names its paper and its defaults.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from torch import nn
from torch.utils.data import Dataset

from ..data.base import dataset_labels
from ..objective import call_builder
from ..registry import Registry
from .ab import AB, ab_loss
from .at import AT, at_loss, attention_map
from .base import Distiller
from .cc import CC, cc_loss, correlation_matrix
from .common import FeatureDistiller
from .crd import CRD, crd_loss, nce_loss
from .dist import DIST, dist_loss, dist_terms
from .dkd import DKD, dkd_loss, dkd_terms
from .fitnet import FitNet, fitnet_loss
from .fsp import FSP, fsp_loss, fsp_matrix
from .ft import FT, ft_loss
from .kd import KD, kd_loss, standardize_logits
from .nst import NST, nst_loss
from .pkt import PKT, pkt_loss
from .rkd import RKD, rkd_angle_loss, rkd_distance_loss, rkd_loss
from .sp import SP, sp_loss
from .vid import VID, vid_loss

DISTILLERS = Registry("distiller")
for _name, _cls in (("kd", KD), ("dkd", DKD), ("dist", DIST), ("fitnet", FitNet), ("at", AT),
                    ("sp", SP), ("cc", CC), ("vid", VID), ("rkd", RKD), ("pkt", PKT),
                    ("ab", AB), ("ft", FT), ("fsp", FSP), ("nst", NST), ("crd", CRD)):
    DISTILLERS.register(_name)(_cls)


def build_distiller(method: str, teacher: nn.Module, options: dict[str, Any] | None = None, *,
                    student: nn.Module | None = None, num_samples: int | None = None,
                    num_classes: int | None = None,
                    input_shape: Sequence[int] | None = None,
                    train_set: Dataset | None = None) -> Distiller:
    """The distiller ``method`` around ``teacher``, with user ``options``.

    ``input_shape`` (one sample's shape) is a default for the option of the same name of the
    feature-based methods, which run both models once on a dummy input at construction; it is
    only needed for models without an ``input_shape`` attribute (registered models have one).
    ``train_set`` gives CRD the training labels in index order (``sample_labels``), so that its
    negatives come from other classes from the first step, as in the reference.
    """
    cls = DISTILLERS.get(method)
    options = dict(options or {})
    params = inspect.signature(cls).parameters
    if input_shape is not None and "input_shape" not in options and "input_shape" in params:
        options["input_shape"] = tuple(input_shape)
    if train_set is not None and "sample_labels" not in options and "sample_labels" in params:
        labels = dataset_labels(train_set)
        if labels is not None:
            options["sample_labels"] = labels
    return call_builder(cls, options, f"distiller {method!r}",
                        teacher=teacher, student=student, num_samples=num_samples,
                        num_classes=num_classes)


def list_distillers() -> list[str]:
    """Names of every registered distillation method, sorted; pass one to
    :func:`build_distiller` (or ``distill.method`` in a config)."""
    return DISTILLERS.names()


__all__ = [
    "AB", "AT", "CC", "CRD", "DISTILLERS", "DIST", "DKD", "Distiller", "FSP", "FT",
    "FeatureDistiller", "FitNet", "KD", "NST", "PKT", "RKD", "SP", "VID", "ab_loss", "at_loss",
    "attention_map", "build_distiller", "cc_loss", "correlation_matrix", "crd_loss", "dist_loss",
    "dist_terms", "dkd_loss", "dkd_terms", "fitnet_loss", "fsp_loss", "fsp_matrix", "ft_loss",
    "kd_loss", "list_distillers", "nce_loss", "nst_loss", "pkt_loss", "rkd_angle_loss",
    "rkd_distance_loss", "rkd_loss", "sp_loss", "standardize_logits", "vid_loss",
]
