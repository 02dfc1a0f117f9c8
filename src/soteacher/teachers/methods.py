"""The teacher-training baselines beside ``standard`` and ``soteacher``.

Registered here (``soteacher list teachers``):

* ``lipschitz`` / ``consistency``: one SoTeacher regulariser alone;
* ``label_smoothing``: cross-entropy with smoothed labels (0.1 by default);
* ``crl``: confidence-aware ranking (see :mod:`.crl`), with ``crl_schedule`` and
  ``crl_start_epoch`` (the step schedule's epochs at weight 0, default 50); also an option
  ``crl_weight`` of ``soteacher`` and of the methods below, so it combines with the SoTeacher
  terms;
* ``swa``: stochastic weight averaging from epoch ``swa_start`` (default: the reference's 150
  of 240 epochs, scaled to the run's length), then a batch-norm refresh;
* ``early_stop``: the epoch with the best accuracy on the validation split (with ``patience``,
  training also stops after that many epochs without a new best);
* ``temperature_scaled``: a temperature fitted on the validation split by NLL after training;
* ``sftn``: student-friendly teacher networks (see :mod:`.sftn`).

``swa``, ``early_stop`` and ``temperature_scaled`` train with cross-entropy by default and accept
the SoTeacher terms as options (``lipschitz_weight``, ``consistency_weight``,
``consistency_schedule``, ``crl_weight``), e.g. ``temperature_scaled`` on top of SoTeacher.
Methods that need the validation split declare the context argument ``val_set``: set
``data.val_fraction`` (e.g. 0.1) to carve it out of the training set.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch.utils.data import Dataset

from ..regularizers.schedules import STEP_START
from . import TEACHERS
from .callbacks import BestOnValidation, TemperatureFit, WeightAveraging
from .objective import TeacherObjective
from .sftn import SFTNObjective

SWA_REFERENCE_START, SWA_REFERENCE_EPOCHS = 150, 240


def _need_val(val_set: Dataset | None, method: str) -> Dataset:
    if val_set is None or len(val_set) == 0:
        raise ValueError(f"teacher method {method!r} needs a validation split of the training "
                         f"set; set data.val_fraction=0.1 (or another fraction in (0, 1))")
    return val_set


def _objective(num_samples: int, num_classes: int, num_epochs: int, label_smoothing: float,
               lipschitz_weight: float, consistency_weight: float, consistency_schedule: str,
               crl_weight: float) -> TeacherObjective:
    return TeacherObjective(label_smoothing=label_smoothing, lipschitz_weight=lipschitz_weight,
                            consistency_weight=consistency_weight, num_samples=num_samples,
                            num_classes=num_classes, num_epochs=num_epochs,
                            consistency_schedule=consistency_schedule, crl_weight=crl_weight)


@TEACHERS.register("lipschitz")
def lipschitz(lipschitz_weight: float = 1e-5, label_smoothing: float = 0.0) -> TeacherObjective:
    """Cross-entropy + SoTeacher's Lipschitz regularisation only (no consistency term)."""
    return TeacherObjective(label_smoothing=label_smoothing, lipschitz_weight=lipschitz_weight)


@TEACHERS.register("consistency")
def consistency(num_samples: int, num_classes: int, num_epochs: int,
                consistency_weight: float = 1.0, consistency_schedule: str = "linear",
                consistency_start_epoch: int = STEP_START, consistency_update: str = "reference",
                ema_decay: float = 0.9, label_smoothing: float = 0.0) -> TeacherObjective:
    """Cross-entropy + SoTeacher's consistency regularisation only (no Lipschitz term)."""
    return TeacherObjective(
        label_smoothing=label_smoothing, consistency_weight=consistency_weight,
        num_samples=num_samples, num_classes=num_classes, num_epochs=num_epochs,
        consistency_schedule=consistency_schedule,
        consistency_start_epoch=consistency_start_epoch, consistency_update=consistency_update,
        ema_decay=ema_decay)


@TEACHERS.register("label_smoothing")
def label_smoothing_method(label_smoothing: float = 0.1) -> TeacherObjective:
    """Cross-entropy against labels smoothed toward uniform by ``label_smoothing``."""
    return TeacherObjective(label_smoothing=label_smoothing)


@TEACHERS.register("crl")
def crl(num_samples: int, num_epochs: int, crl_weight: float = 1.0,
        crl_schedule: str = "constant", crl_start_epoch: int = STEP_START,
        label_smoothing: float = 0.0) -> TeacherObjective:
    """Cross-entropy + confidence-aware ranking (Moon et al., 2020), weight ``crl_weight``
    following ``crl_schedule`` (``constant`` by default, as the reference's default; a ``step``
    schedule keeps it at 0 for ``crl_start_epoch`` epochs, 50 by default)."""
    return TeacherObjective(label_smoothing=label_smoothing, crl_weight=crl_weight,
                            num_samples=num_samples, num_epochs=num_epochs,
                            crl_schedule=crl_schedule, crl_start_epoch=crl_start_epoch)


@TEACHERS.register("swa")
def swa(num_samples: int, num_classes: int, num_epochs: int, swa_start: int | None = None,
        refresh_bn: bool = True, label_smoothing: float = 0.0, lipschitz_weight: float = 0.0,
        consistency_weight: float = 0.0, consistency_schedule: str = "linear",
        crl_weight: float = 0.0) -> TeacherObjective:
    """Stochastic weight averaging of the weights at the end of every epoch after
    ``swa_start`` (default: ``round(num_epochs * 150 / 240)``, the reference's start scaled,
    at most ``num_epochs - 1``), then one pass over the training data to refresh batch norm."""
    if swa_start is None:
        swa_start = min(round(num_epochs * SWA_REFERENCE_START / SWA_REFERENCE_EPOCHS),
                        num_epochs - 1)
    if isinstance(swa_start, bool) or int(swa_start) != swa_start or not \
            0 <= swa_start < num_epochs:
        raise ValueError(f"swa_start must be an epoch in [0, {num_epochs}) (weights after it are "
                         f"averaged), got {swa_start!r}")
    obj = _objective(num_samples, num_classes, num_epochs, label_smoothing, lipschitz_weight,
                     consistency_weight, consistency_schedule, crl_weight)
    obj.callbacks = [WeightAveraging(int(swa_start), refresh_bn=refresh_bn)]
    return obj


@TEACHERS.register("early_stop")
def early_stop(val_set: Dataset | None, num_samples: int, num_classes: int, num_epochs: int,
               metric: str = "acc", label_smoothing: float = 0.0, lipschitz_weight: float = 0.0,
               consistency_weight: float = 0.0, consistency_schedule: str = "linear",
               crl_weight: float = 0.0, patience: int | None = None) -> TeacherObjective:
    """The weights of the epoch with the best validation ``metric`` (``acc`` or ``nll``),
    evaluated on the validation split after every epoch; never the test set. With ``patience``,
    training also stops after that many epochs without a new best."""
    val = _need_val(val_set, "early_stop")
    obj = _objective(num_samples, num_classes, num_epochs, label_smoothing, lipschitz_weight,
                     consistency_weight, consistency_schedule, crl_weight)
    obj.callbacks = [BestOnValidation(val, metric, patience)]
    return obj


@TEACHERS.register("temperature_scaled")
def temperature_scaled(val_set: Dataset | None, num_samples: int, num_classes: int,
                       num_epochs: int, label_smoothing: float = 0.0,
                       lipschitz_weight: float = 0.0, consistency_weight: float = 0.0,
                       consistency_schedule: str = "linear",
                       crl_weight: float = 0.0) -> TeacherObjective:
    """Train, then fit one temperature on the validation split by NLL; the saved teacher's
    logits are divided by it wherever it is used (``load_model`` rebuilds it so). A validation
    split the teacher classifies without error has no NLL-optimal temperature: then it warns
    and keeps 1."""
    val = _need_val(val_set, "temperature_scaled")
    obj = _objective(num_samples, num_classes, num_epochs, label_smoothing, lipschitz_weight,
                     consistency_weight, consistency_schedule, crl_weight)
    obj.callbacks = [TemperatureFit(val)]
    return obj


@TEACHERS.register("sftn")
def sftn(model: Any, num_classes: int, input_shape: Sequence[int] | None,
         student_model: str | None = None, student_options: dict[str, Any] | None = None,
         teacher_weight: float = 1.0, branch_ce_weight: float = 1.0,
         branch_kl_weight: float = 3.0, kl_temperature: float = 1.0,
         label_smoothing: float = 0.0) -> SFTNObjective:
    """Student-friendly teacher network (Park et al., 2021): student branches built from the
    registered model ``student_model`` (with ``student_options``) train with the teacher and are
    discarded after. Run from a config, the student defaults to ``student.model``."""
    from ..models import create_model
    if student_model is None:
        raise ValueError("teacher method 'sftn' needs the student architecture: set "
                         "teacher.options.student_model=<model name> (and student_options)")
    if model is None or input_shape is None:
        raise ValueError("teacher method 'sftn' needs the teacher model and the input shape "
                         "(pass model= and input_shape= to build_teacher_objective)")
    opts = dict(student_options or {})
    make = lambda: create_model(student_model, num_classes=num_classes,
                                input_shape=tuple(input_shape), **opts)
    return SFTNObjective(model, make, tuple(input_shape), teacher_weight=teacher_weight,
                         branch_ce_weight=branch_ce_weight, branch_kl_weight=branch_kl_weight,
                         kl_temperature=kl_temperature, label_smoothing=label_smoothing)
