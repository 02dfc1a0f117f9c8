"""The one training-objective contract shared by teacher training and distillation.

An objective is an ``nn.Module`` called once per step with the model being trained and a batch.
It returns the model's logits and a dict of *named, already weighted* scalar loss terms; the
trainer sums the terms, back-propagates, and logs each one by name. Any state the objective keeps
(a consistency bank, learnable connectors, a memory) lives in its ``state_dict`` and so goes into
every checkpoint. Its trainable parameters are optimised together with the model's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

__all__ = ["StepOutput", "Objective", "call_builder", "check_options"]


@dataclass
class StepOutput:
    logits: Tensor              # (B, C) predictions of the model being trained
    losses: dict[str, Tensor]   # named, weighted scalar terms; the total loss is their sum


class Objective(nn.Module):
    """Base class: override ``forward``; ``set_epoch`` is called before every epoch."""

    epoch: int = 1
    num_epochs: int = 1

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        """Tell the objective which 1-based epoch of ``num_epochs`` is starting."""
        self.epoch, self.num_epochs = epoch, num_epochs

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
