"""Weight schedules for the consistency term (SoTeacher, ICLR 2024, and its reference code).

A schedule maps the 1-based epoch ``k`` of ``E`` to the weight used during that epoch:

========  =====================================
constant  ``lam``
linear    ``lam * k / E``  (the paper's main setting)
step      ``0`` for ``k < start``, then ``lam``
cosine    ``lam * cos((1 - k/E) * pi / 2)``
cycle     ``lam * sqrt(1 - (1 - k/E)^2)``
========  =====================================
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "schedule_weight"]

SCHEDULES = ("constant", "linear", "step", "cosine", "cycle")


def schedule_weight(name: str, weight: float, epoch: int, num_epochs: int,
                    start_epoch: int = 1) -> float:
    """Weight of a regulariser during 1-based ``epoch`` of ``num_epochs``.

    ``start_epoch`` is only used by the ``step`` schedule.
    """
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if not 1 <= epoch <= num_epochs:
        raise ValueError(f"epoch must be in 1..{num_epochs}, got {epoch}")
    frac = epoch / num_epochs
    if name == "constant":
        return weight
    if name == "linear":
        return weight * frac
    if name == "step":
        return weight if epoch >= start_epoch else 0.0
    if name == "cosine":
        return weight * math.cos((1.0 - frac) * math.pi / 2)
    if name == "cycle":
        return weight * math.sqrt(1.0 - (1.0 - frac) ** 2)
    raise ValueError(f"unknown schedule {name!r}; available: {', '.join(SCHEDULES)}")
