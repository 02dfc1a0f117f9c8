"""Teacher-training methods, registered by name (``soteacher list teachers``).

A method is a builder returning an ``Objective`` for the teacher. It may declare the context
arguments ``num_samples`` and ``num_classes``; every other parameter is a user option.
"""

from __future__ import annotations

from typing import Any

from ..objective import Objective, call_builder
from ..registry import Registry
from .objective import TeacherObjective

TEACHERS = Registry("teacher method")


@TEACHERS.register("standard")
def standard(label_smoothing: float = 0.0) -> TeacherObjective:
    """Plain empirical risk minimisation: cross-entropy on augmented inputs."""
    return TeacherObjective(label_smoothing=label_smoothing)


@TEACHERS.register("soteacher")
def soteacher(num_samples: int, num_classes: int, num_epochs: int,
              lipschitz_weight: float = 1e-5, consistency_weight: float = 1.0,
              consistency_schedule: str = "linear", consistency_start_epoch: int = 1,
              consistency_update: str = "reference", ema_decay: float = 0.9,
              label_smoothing: float = 0.0) -> TeacherObjective:
    """SoTeacher (Dong, Liu & Shang, ICLR 2024): ERM + Lipschitz + consistency regularisation.

    Defaults follow the paper's main setting: ``lambda_LR = 1e-5`` and a consistency weight
    rising linearly to ``lambda_CR = 1`` over training.
    """
    return TeacherObjective(
        label_smoothing=label_smoothing,
        lipschitz_weight=lipschitz_weight,
        consistency_weight=consistency_weight,
        num_samples=num_samples, num_classes=num_classes, num_epochs=num_epochs,
        consistency_schedule=consistency_schedule,
        consistency_start_epoch=consistency_start_epoch,
        consistency_update=consistency_update, ema_decay=ema_decay,
    )


def build_teacher_objective(method: str, options: dict[str, Any] | None = None, *,
                            num_samples: int, num_classes: int, num_epochs: int) -> Objective:
    """The objective of teacher-training ``method`` with user ``options``."""
    return call_builder(TEACHERS.get(method), dict(options or {}), f"teacher method {method!r}",
                        num_samples=num_samples, num_classes=num_classes, num_epochs=num_epochs)


def list_teachers() -> list[str]:
    return TEACHERS.names()


__all__ = ["TEACHERS", "TeacherObjective", "build_teacher_objective", "list_teachers"]
