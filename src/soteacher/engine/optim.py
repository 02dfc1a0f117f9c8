"""Optimiser and learning-rate schedule, built from plain arguments."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

SCHEDULES = ("step", "cosine", "constant")


class ScheduleWarning(UserWarning):
    """A learning-rate schedule that is valid but cannot do what it says (e.g. milestones after
    the last epoch: the rate never decays)."""
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainSettings:
    """How one model is trained: SGD with momentum and a per-epoch learning-rate schedule.

    Defaults are the paper's CIFAR-100 protocol (240 epochs, lr 0.05 decayed x0.1 at epochs
    150/180/210, batch 64, momentum 0.9, weight decay 5e-4). The milestones do not follow
    ``epochs``: a shorter run needs its own, and :meth:`validate` warns
    (:class:`ScheduleWarning`) about milestones at or after the last epoch.
    """

    epochs: int = 240
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "step"                     # step | cosine | constant
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    eval_every: int = 1                        # evaluate on the test set every N epochs (0: only at the end)
    checkpoint_every: int = 0                  # also checkpoint every N steps inside an epoch (0: epoch ends only)
    nonfinite: str = "error"                   # a NaN/inf loss: "error" stops, "skip" drops the step and counts it
    amp: str = "off"                           # autocast: off | bf16 | fp16 (fp16 adds a grad scaler)
    channels_last: bool = False                # NHWC memory format for 2-D conv nets
    compile: bool = False                      # torch.compile the model
    sync_bn: bool = False                      # torchrun: batch norm over all processes (CUDA)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.lr == 0:
            raise ValueError("lr must be > 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.schedule!r}; available: {', '.join(SCHEDULES)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"unknown amp mode {self.amp!r}; available: {', '.join(AMP_DTYPES)}")
        if self.nonfinite not in ("error", "skip"):
            raise ValueError(f"nonfinite must be 'error' or 'skip', got {self.nonfinite!r}")
        for problem in self.schedule_problems():
            warnings.warn(problem, ScheduleWarning, stacklevel=2)

    def schedule_problems(self) -> list[str]:
        """What in a valid schedule cannot take effect: ``step`` milestones at or after the last
        epoch (milestone m lowers the rate from epoch m + 1 on)."""
        if self.schedule != "step" or self.gamma == 1:
            return []
        late = [m for m in self.milestones if m >= self.epochs]
        if not late:
            return []
        E = self.epochs
        scaled = sorted({min(E - 1, max(1, round(E * f))) for f in (150 / 240, 180 / 240, 210 / 240)})
        inside = (f"milestones inside the run (the paper's, scaled to {E} epochs: {scaled}) or "
                  if E > 1 else "")
        return [f"milestone(s) {', '.join(map(str, late))} of the {E}-epoch run fall at or after "
                f"its last epoch, so the learning rate never decays there (milestone m lowers it "
                f"from epoch m + 1; the defaults 150, 180, 210 are the paper's 240-epoch "
                f"schedule); give {inside}schedule='cosine' or 'constant'"]


def build_optimizer(params: Iterable[nn.Parameter], s: TrainSettings) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(params), lr=s.lr, momentum=s.momentum,
                           weight_decay=s.weight_decay, nesterov=s.nesterov)


def learning_rate(s: TrainSettings, epoch: int) -> float:
    """Learning rate during 1-based ``epoch``: a pure function of the epoch, so nothing about
    the schedule needs saving. ``step`` multiplies by ``gamma`` once for every milestone already
    passed (milestone 150 means epochs 151.. run at the lower rate); ``cosine`` anneals from
    ``lr`` toward 0 over ``epochs``."""
    if s.schedule == "step":
        return s.lr * s.gamma ** sum(epoch > m for m in s.milestones)
    if s.schedule == "cosine":
        return s.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / s.epochs))
    return s.lr
