"""The one training-objective contract shared by teacher training and distillation.

An objective is an ``nn.Module`` called once per step with the model being trained and a batch.
It returns the model's logits and a dict of *named, already weighted* scalar loss terms; the
trainer sums the terms, back-propagates, and logs each one by name. Any state the objective keeps
(a consistency bank, learnable connectors, a memory) lives in its ``state_dict`` and so goes into
every checkpoint. Its trainable parameters are optimised together with the model's.

An objective may also ask for a *preliminary stage* (:class:`PreliminaryStage`): epochs run
before the main schedule, with their own optimiser over a chosen set of modules, as RepDistiller
runs its ``init`` stage for AB, FSP and FT. The trainer runs it in the same loop, tells the
objective which stage is running (:meth:`Objective.set_stage`) and records the stage of every
epoch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

__all__ = ["StepOutput", "Objective", "PreliminaryStage", "STAGES", "call_builder",
           "check_options"]

#: Stage names, as written in every record of ``metrics.jsonl``.
STAGES = ("init", "main")


@dataclass
class StepOutput:
    logits: Tensor              # (B, C) predictions of the model being trained
    losses: dict[str, Tensor]   # named, weighted scalar terms; the total loss is their sum


@dataclass
class PreliminaryStage:
    """A stage of ``epochs`` epochs run *before* the main schedule (which then runs in full).

    The trainer optimises the parameters of ``modules`` (and nothing else) with a fresh SGD
    optimiser at the constant learning rate ``lr`` (momentum, Nesterov and weight decay of the
    main run); the model is in eval mode except ``modules``, which are in train mode. ``frozen``
    are the objective's modules the main stage keeps fixed afterwards: they are left out of the
    main optimiser and kept in eval mode. The main stage starts with a fresh optimiser and the
    full schedule.
    """

    epochs: int
    lr: float
    modules: list[nn.Module]
    frozen: list[nn.Module] = field(default_factory=list)


class Objective(nn.Module):
    """Base class: override ``forward``; ``set_epoch`` is called before every epoch.

    ``stage`` is ``"main"`` unless the objective asked for a preliminary stage
    (:meth:`preliminary_stage`) and the trainer is running it (``"init"``).
    """

    epoch: int = 1
    num_epochs: int = 1
    stage: str = "main"

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        """Tell the objective which 1-based epoch of ``num_epochs`` (of the current stage) is
        starting."""
        self.epoch, self.num_epochs = epoch, num_epochs

    def set_stage(self, stage: str) -> None:
        """Tell the objective which stage (``"init"`` or ``"main"``) the next epochs belong to."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        self.stage = stage

    def preliminary_stage(self, model: nn.Module, lr: float) -> PreliminaryStage | None:
        """The stage to run before the main schedule for ``model`` when the main run starts at
        learning rate ``lr``; ``None`` (the default): the run is the main schedule alone."""
        return None

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor) -> StepOutput:
        raise NotImplementedError


def check_options(fn: Callable, options: dict[str, Any], what: str,
                  context: tuple[str, ...] = ()) -> None:
    """Raise a ``ValueError`` listing the valid options if ``options`` holds a name ``fn`` lacks.

    ``context`` names are supplied by the library, not the user, and are not valid options.
    """
    params = inspect.signature(fn).parameters
    valid = [n for n, p in params.items()
             if n not in context and n != "self"
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for {what}; "
                         f"valid options: {', '.join(valid) or '(none)'}")


def call_builder(fn: Callable, options: dict[str, Any], what: str, **context: Any) -> Any:
    """Call a registered builder with user ``options`` plus whichever ``context`` values it declares."""
    check_options(fn, options, what, tuple(context))
    params = inspect.signature(fn).parameters
    given = {k: v for k, v in context.items() if k in params}
    return fn(**given, **options)
