"""The teacher-training baselines beside ``standard`` and ``soteacher``.

Registered here (``soteacher list teachers``):

* ``lipschitz`` / ``consistency``: one SoTeacher regulariser alone;
* ``label_smoothing``: cross-entropy against labels smoothed toward uniform, ``(1 - eps)`` on
  the label and ``eps / C`` on every class, ``eps = 0.1`` by default (Szegedy et al., 2016);
* ``crl``: confidence-aware ranking (see :mod:`.crl`), with ``crl_schedule`` and
  ``crl_start_epoch`` (the step schedule's epochs at weight 0, default 50); also an option
  ``crl_weight`` of ``soteacher`` and of the methods below, so it combines with the SoTeacher
  terms;
* ``swa``: stochastic weight averaging as the official SoTeacher code runs it: the mean of the
  weights at the end of every epoch from ``swa_start`` (default 150, the reference's) on, with
  the batch-norm statistics recomputed on the training set after every update;
* ``early_stop``: the weights of the epoch with the best accuracy on the validation split (with
  ``patience``, training also stops after that many epochs without a new best);
* ``temperature_scaled``: a temperature fitted on the validation split by NLL after training,
  dividing the teacher's logits wherever it is used;
* ``sftn``: student-friendly teacher networks (see :mod:`.sftn`).

``swa``, ``early_stop`` and ``temperature_scaled`` train with cross-entropy by default and accept
the SoTeacher terms as options (``lipschitz_weight``, ``consistency_weight``,
``consistency_schedule``, ``crl_weight``), e.g. ``temperature_scaled`` on top of SoTeacher.
``early_stop`` and ``temperature_scaled`` are baselines reviewers asked for; the official
SoTeacher code has neither of them, nor label smoothing (checked against the logit-standardisation
KD code's instead).
Methods that need the validation split declare the context argument ``val_set``: set
``data.val_fraction`` (e.g. 0.1) to carve it out of the training set.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from torch.utils.data import Dataset

from ..regularizers.schedules import STEP_START
from . import TEACHERS
from .callbacks import BN_REFRESH, BestOnValidation, TemperatureFit, WeightAveraging
from .objective import TeacherObjective
from .sftn import SFTNObjective

#: The official SoTeacher code's ``--swa_start`` default and ``--epochs`` default.
SWA_START, SWA_REFERENCE_EPOCHS = 150, 240


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
    """Cross-entropy against smoothed labels (Szegedy et al., CVPR 2016): with ``eps =
    label_smoothing`` and ``C`` classes the target is ``(1 - eps)`` on the label plus ``eps / C``
    on every class (the label included), i.e. ``mean_i [(1 - eps) * CE(z_i, y_i) + eps *
    mean_c(-log softmax(z_i)_c)]`` over the batch (logits (B, C), labels (B,)).

    The official SoTeacher code has no label smoothing; formula, ``eps / C`` convention, batch
    mean and default ``eps = 0.1`` are those of ``CrossEntropyLabelSmooth`` in the
    logit-standardisation KD code (``mdistiller/distillers/loss.py``), which the fidelity tests
    run against."""
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
def swa(num_samples: int, num_classes: int, num_epochs: int, swa_start: int | str = SWA_START,
        swa_interval: int = 1, bn_refresh: str = "every_update", label_smoothing: float = 0.0,
        lipschitz_weight: float = 0.0, consistency_weight: float = 0.0,
        consistency_schedule: str = "linear", crl_weight: float = 0.0) -> TeacherObjective:
    """Stochastic weight averaging (Izmailov et al., UAI 2018) of the teacher, as the official
    SoTeacher code (``train_teacher.py`` with ``--swa``, ``helper/regularizer.py: SWA``).

    The weights at the end of 1-based epochs ``swa_start, swa_start + swa_interval, ...`` are
    averaged (their arithmetic mean; ``swa_start`` itself is included); after every update the
    averaged model's batch-norm statistics are recomputed with one pass over the augmented
    training set (``bn_refresh="every_update"``; ``"end"``: one pass after the last epoch only;
    ``"off"``: none). The averaged model is the teacher saved and distilled; see
    :class:`~soteacher.teachers.callbacks.WeightAveraging`.

    Defaults are the reference's: ``swa_start = 150`` (its ``--swa_start``, fixed whatever the
    number of epochs; with its 240 epochs, the last epoch before the learning rate first decays)
    and interval 1 (hard-coded there). ``swa_start="scaled"`` moves the start to the same
    fraction of a run of another length, ``round(num_epochs * 150 / 240)`` (at least 1). A start
    after the last epoch averages nothing and keeps the trained weights, as the reference does;
    that is warned."""
    if swa_start == "scaled":
        swa_start = max(1, round(num_epochs * SWA_START / SWA_REFERENCE_EPOCHS))
    if isinstance(swa_start, bool) or not isinstance(swa_start, int) or swa_start < 1:
        raise ValueError(f"swa_start must be the first averaged epoch (a whole number >= 1, "
                         f"1-based) or 'scaled', got {swa_start!r}")
    if isinstance(swa_interval, bool) or not isinstance(swa_interval, int) or swa_interval < 1:
        raise ValueError(f"swa_interval must be a whole number of epochs >= 1, got "
                         f"{swa_interval!r}")
    if bn_refresh not in BN_REFRESH:
        raise ValueError(f"unknown bn_refresh {bn_refresh!r}; available: {', '.join(BN_REFRESH)}")
    if swa_start > num_epochs:
        warnings.warn(f"swa_start {swa_start} is after the last of the {num_epochs} epochs: no "
                      f"weights are averaged and the teacher is the plainly trained one (as in "
                      f"the reference); set swa_start to an epoch <= {num_epochs}, or "
                      f"swa_start=scaled for the reference's 150/240 of the run", UserWarning,
                      stacklevel=2)
    obj = _objective(num_samples, num_classes, num_epochs, label_smoothing, lipschitz_weight,
                     consistency_weight, consistency_schedule, crl_weight)
    obj.callbacks = [WeightAveraging(swa_start, swa_interval, bn_refresh)]
    return obj


@TEACHERS.register("early_stop")
def early_stop(val_set: Dataset | None, num_samples: int, num_classes: int, num_epochs: int,
               metric: str = "acc", label_smoothing: float = 0.0, lipschitz_weight: float = 0.0,
               consistency_weight: float = 0.0, consistency_schedule: str = "linear",
               crl_weight: float = 0.0, patience: int | None = None) -> TeacherObjective:
    """Early stopping on the validation split (a baseline reviewers asked for; no reference
    code): after every epoch the teacher is evaluated on the validation split, never the test
    set, and the weights of the epoch with the best ``metric`` are kept and saved: ``"acc"``
    (top-1 accuracy, default) or ``"nll"``; on a tie the earlier epoch. Parameters and
    batch-norm statistics of that epoch are restored at the end. ``patience=None`` (default)
    trains all ``num_epochs``; a number ``p`` stops training once ``p`` epochs have passed
    without a new best. See :class:`~soteacher.teachers.callbacks.BestOnValidation`."""
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
    """Temperature scaling (Guo et al., ICML 2017; a baseline reviewers asked for, no reference
    code): train all epochs, then fit one temperature ``T`` on the validation split by
    minimising the labels' mean NLL under ``softmax(logits / T)``. The saved teacher keeps the
    last epoch's weights and divides its logits by ``T`` wherever it is used (``load_model``
    rebuilds it so): a distiller sees ``logits / T`` as the teacher's logits (KD at temperature
    ``tau`` softens them to ``softmax(logits / (T * tau))``); features are unchanged. A
    validation split the teacher classifies without error has no NLL-optimal temperature: then
    it warns and keeps ``T = 1``. See :class:`~soteacher.teachers.callbacks.TemperatureFit`."""
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
