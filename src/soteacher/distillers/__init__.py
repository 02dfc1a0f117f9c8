"""Distillation algorithms, registered by lower-case name (``soteacher list distillers``).

A distiller class takes the frozen ``teacher`` first; it may also declare the context arguments
``student``, ``num_samples`` and ``num_classes``; every other parameter is a user option.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..objective import call_builder
from ..registry import Registry
from .base import Distiller
from .kd import KD, kd_loss

DISTILLERS = Registry("distiller")
DISTILLERS.register("kd")(KD)


def build_distiller(method: str, teacher: nn.Module, options: dict[str, Any] | None = None, *,
                    student: nn.Module | None = None, num_samples: int | None = None,
                    num_classes: int | None = None) -> Distiller:
    """The distiller ``method`` around ``teacher``, with user ``options``."""
    return call_builder(DISTILLERS.get(method), dict(options or {}), f"distiller {method!r}",
                        teacher=teacher, student=student, num_samples=num_samples,
                        num_classes=num_classes)


def list_distillers() -> list[str]:
    return DISTILLERS.names()


__all__ = ["DISTILLERS", "Distiller", "KD", "build_distiller", "kd_loss", "list_distillers"]
