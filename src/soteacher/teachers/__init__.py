"""Teacher-training methods, registered by name (``soteacher list teachers``).

A method is a builder returning an ``Objective`` for the teacher. It may declare the context
arguments in ``TEACHER_CONTEXT`` (``num_samples``, ``num_classes``, ``num_epochs``,
``input_shape``, ``val_set``: the validation split or ``None``, ``model``: the teacher being
trained); every other parameter is a user option. An objective may carry a list ``callbacks`` of
trainer callbacks (weight averaging, best-on-validation, temperature fitting) that the pipeline
hands to the trainer.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from torch import nn
from torch.utils.data import Dataset

from ..objective import Objective, call_builder
from ..registry import Registry
from ..regularizers.schedules import STEP_START
from .objective import TeacherObjective

TEACHERS = Registry("teacher method")

#: Arguments a builder may declare that the library supplies (never user options).
TEACHER_CONTEXT = ("num_samples", "num_classes", "num_epochs", "input_shape", "val_set", "model")


@TEACHERS.register("standard")
def standard(label_smoothing: float = 0.0) -> TeacherObjective:
    """Plain empirical risk minimisation: cross-entropy on augmented inputs."""
    return TeacherObjective(label_smoothing=label_smoothing)


@TEACHERS.register("soteacher")
def soteacher(num_samples: int, num_classes: int, num_epochs: int,
              lipschitz_weight: float = 1e-5, consistency_weight: float = 1.0,
              consistency_schedule: str = "linear", consistency_start_epoch: int = STEP_START,
              consistency_update: str = "reference", ema_decay: float = 0.9,
              label_smoothing: float = 0.0, crl_weight: float = 0.0,
              crl_schedule: str = "constant", crl_start_epoch: int = STEP_START,
              bank_dtype: str = "float32", bank_device: str = "auto") -> TeacherObjective:
    """SoTeacher (Dong, Liu & Shang, ICLR 2024): ERM + Lipschitz + consistency regularisation.

    Defaults follow the paper's main setting: ``lambda_LR = 1e-5`` and a consistency weight
    rising linearly to ``lambda_CR = 1`` over training. ``crl_weight > 0`` adds confidence-aware
    ranking (the combination the reference code meant but silently dropped), weighted by
    ``crl_schedule``. The ``step`` schedules keep their term at 0 for ``*_start_epoch`` epochs
    (50, the official code's default). ``bank_dtype``
    (float32 | float16 | bfloat16) and ``bank_device`` (auto: the training device | cpu, pinned
    on CUDA machines) set where the consistency bank is kept, for ImageNet-sized banks.
    """
    return TeacherObjective(
        label_smoothing=label_smoothing,
        lipschitz_weight=lipschitz_weight,
        consistency_weight=consistency_weight,
        num_samples=num_samples, num_classes=num_classes, num_epochs=num_epochs,
        consistency_schedule=consistency_schedule,
        consistency_start_epoch=consistency_start_epoch,
        consistency_update=consistency_update, ema_decay=ema_decay, crl_weight=crl_weight,
        crl_schedule=crl_schedule, crl_start_epoch=crl_start_epoch,
        bank_dtype=bank_dtype, bank_device=bank_device,
    )


def build_teacher_objective(method: str, options: dict[str, Any] | None = None, *,
                            num_samples: int, num_classes: int, num_epochs: int,
                            input_shape: Sequence[int] | None = None,
                            val_set: Dataset | None = None,
                            model: nn.Module | None = None) -> Objective:
    """The objective of teacher-training ``method`` with user ``options``.

    Its ``callbacks`` attribute (if any) lists trainer callbacks the method needs."""
    return call_builder(TEACHERS.get(method), dict(options or {}), f"teacher method {method!r}",
                        num_samples=num_samples, num_classes=num_classes, num_epochs=num_epochs,
                        input_shape=tuple(input_shape) if input_shape is not None else None,
                        val_set=val_set, model=model)


def teacher_params(method: str) -> list[str]:
    """Names of the parameters (context and options) of teacher method ``method``."""
    return list(inspect.signature(TEACHERS.get(method)).parameters)


def list_teachers() -> list[str]:
    """Names of every registered teacher-training method, sorted; pass one to
    :func:`build_teacher_objective` (or ``teacher.method`` in a config)."""
    return TEACHERS.names()


# Imported last: registers the baselines into TEACHERS defined above.
from . import methods  # noqa: E402,F401
from .calibration import TemperatureScaled, fit_temperature, wrap_for_spec  # noqa: E402
from .callbacks import BestOnValidation, TemperatureFit, WeightAveraging  # noqa: E402
from .crl import ConfidenceRanking, crl_loss  # noqa: E402
from .sftn import SFTNObjective  # noqa: E402

__all__ = ["TEACHERS", "TEACHER_CONTEXT", "BestOnValidation", "ConfidenceRanking",
           "SFTNObjective", "TeacherObjective", "TemperatureFit", "TemperatureScaled",
           "WeightAveraging", "build_teacher_objective", "crl_loss", "fit_temperature",
           "list_teachers", "teacher_params", "wrap_for_spec"]
