"""The teacher's objective: cross-entropy plus optional SoTeacher regularisers and CRL."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from ..objective import Objective, StepOutput
from ..regularizers import ConsistencyRegularizer, lipschitz_bound
from .crl import ConfidenceRanking


class TeacherObjective(Objective):
    """``ce + lipschitz_weight * LipschitzBound(model) + lambda_CR(epoch) * consistency
    + crl_weight * ConfidenceRanking``.

    Terms whose weight is zero are left out (and cost nothing). The consistency term needs
    ``num_samples`` and ``num_classes`` for its bank, and ``num_epochs`` for its schedule; the
    CRL term (see :mod:`.crl`) needs ``num_samples`` for its correctness counts.
    """

    def __init__(self, label_smoothing: float = 0.0, lipschitz_weight: float = 0.0,
                 consistency_weight: float = 0.0, num_samples: int | None = None,
                 num_classes: int | None = None, num_epochs: int = 1,
                 consistency_schedule: str = "linear", consistency_start_epoch: int = 1,
                 consistency_update: str = "reference", ema_decay: float = 0.9,
                 crl_weight: float = 0.0, bank_dtype: str = "float32",
                 bank_device: str = "auto") -> None:
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
            self.crl = ConfidenceRanking(num_samples)

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        super().set_epoch(epoch, num_epochs)
        if self.consistency is not None:
            self.consistency.num_epochs = num_epochs

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor) -> StepOutput:
        logits = model(x)
        losses = {"ce": F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)}
        if self.lipschitz_weight > 0:
            losses["lipschitz"] = self.lipschitz_weight * lipschitz_bound(model)
        if self.consistency is not None:
            losses["consistency"] = self.consistency(logits, index, self.epoch)
        if self.crl is not None:
            losses["crl"] = self.crl_weight * self.crl(logits, y, index, self.epoch)
        return StepOutput(logits, losses)
