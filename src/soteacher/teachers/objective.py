"""The teacher's objective: cross-entropy plus optional SoTeacher regularisers and CRL."""

from __future__ import annotations

import math
import warnings

import torch.nn.functional as F
from torch import Tensor, nn

from ..objective import Objective, StepOutput
from ..regularizers import ConsistencyRegularizer, lipschitz_bound
from ..regularizers.schedules import STEP_START, schedule_weight
from .crl import ConfidenceRanking


class TeacherObjective(Objective):
    """``ce + lipschitz_weight * LipschitzBound(model) + lambda_CR(epoch) * consistency
    + crl_weight(epoch) * ConfidenceRanking``.

    ``ce`` is the batch mean of the cross-entropy of logits (B, C) against labels (B,); with
    ``label_smoothing = eps > 0`` the target is ``(1 - eps)`` on the label plus ``eps / C`` on
    every class (Szegedy et al., 2016; PyTorch's ``label_smoothing``, not ``eps / (C - 1)`` on
    the other classes).

    Terms whose weight is zero are left out (and cost nothing). The consistency term needs
    ``num_samples`` and ``num_classes`` for its bank, and ``num_epochs`` for its schedule; the
    CRL term (see :mod:`.crl`) needs ``num_samples`` for its correctness counts.

    Each of the two scheduled weights follows its schedule (``consistency_schedule``, default
    ``linear``; ``crl_schedule``, default ``constant``; see
    :mod:`soteacher.regularizers.schedules`). ``consistency_start_epoch`` and
    ``crl_start_epoch`` are the numbers of epochs at weight 0 of a ``step`` schedule (default
    50 each, the reference code's ``--consist_start_at`` and ``--crl_start_at``): the term
    switches on in the epoch after.
    """

    def __init__(self, label_smoothing: float = 0.0, lipschitz_weight: float = 0.0,
                 consistency_weight: float = 0.0, num_samples: int | None = None,
                 num_classes: int | None = None, num_epochs: int = 1,
                 consistency_schedule: str = "linear",
                 consistency_start_epoch: int = STEP_START,
                 consistency_update: str = "reference", ema_decay: float = 0.9,
                 crl_weight: float = 0.0, bank_dtype: str = "float32",
                 bank_device: str = "auto", crl_schedule: str = "constant",
                 crl_start_epoch: int = STEP_START) -> None:
        super().__init__()
        for name, value in (("label_smoothing", label_smoothing),
                            ("lipschitz_weight", lipschitz_weight),
                            ("consistency_weight", consistency_weight),
                            ("crl_weight", crl_weight)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if label_smoothing >= 1:
            raise ValueError(f"label_smoothing must be < 1, got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.lipschitz_weight = lipschitz_weight
        self.consistency: ConsistencyRegularizer | None = None
        if consistency_weight > 0:
            if num_samples is None or num_classes is None:
                raise ValueError("consistency regularisation needs num_samples and num_classes")
            self.consistency = ConsistencyRegularizer(
                num_samples, num_classes, weight=consistency_weight, num_epochs=num_epochs,
                schedule=consistency_schedule, start_epoch=consistency_start_epoch,
                update=consistency_update, ema_decay=ema_decay, bank_dtype=bank_dtype,
                bank_device=bank_device)
        self.crl_weight = crl_weight
        self.crl: ConfidenceRanking | None = None
        if crl_weight > 0:
            if num_samples is None:
                raise ValueError("confidence-aware ranking (crl_weight > 0) needs num_samples")
            self.crl = ConfidenceRanking(num_samples, weight=crl_weight, num_epochs=num_epochs,
                                         schedule=crl_schedule, start_epoch=crl_start_epoch)
        for term, name, schedule, start in (
                (self.consistency, "consistency", consistency_schedule, consistency_start_epoch),
                (self.crl, "crl", crl_schedule, crl_start_epoch)):
            if term is None:
                continue
            schedule_weight(schedule, 1.0, 1, max(num_epochs, 1), start)   # raises if invalid
            if schedule == "step" and start >= num_epochs:
                warnings.warn(f"{name}_schedule 'step' keeps the {name} weight at 0 for "
                              f"{start} epochs ({name}_start_epoch) but training has "
                              f"{num_epochs}: the term is never used; set {name}_start_epoch "
                              f"below {num_epochs}", UserWarning, stacklevel=2)

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        super().set_epoch(epoch, num_epochs)
        if self.consistency is not None:
            self.consistency.num_epochs = num_epochs
        if self.crl is not None:
            self.crl.num_epochs = num_epochs

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor) -> StepOutput:
        logits = model(x)
        losses = {"ce": F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)}
        if self.lipschitz_weight > 0:
            losses["lipschitz"] = self.lipschitz_weight * lipschitz_bound(model)
        if self.consistency is not None:
            losses["consistency"] = self.consistency(logits, index, self.epoch)
        if self.crl is not None:
            losses["crl"] = self.crl(logits, y, index, self.epoch)
        return StepOutput(logits, losses)
