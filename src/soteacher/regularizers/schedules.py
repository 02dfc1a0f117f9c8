"""Weight schedules of the teacher regularisers (SoTeacher, ICLR 2024, and its reference code).

A schedule maps the 1-based epoch ``k`` of ``E`` to the weight used during that epoch:

========  =============================================================
constant  ``lam``  (the reference's default: no scheduler)
linear    ``lam * k / E``  (the paper's main setting)
step      ``0`` for ``k <= start``, then ``lam`` (from ``k = start + 1``)
cosine    ``lam * cos((1 - k/E) * pi / 2)``
cycle     ``lam * sqrt(1 - (1 - k/E)^2)``
========  =============================================================

The reference code counts epochs from 0 (``e = k - 1``) and its formulas use ``e + 1``; its step
schedule gives 0 while ``e < start_at``, which is ``k <= start`` here, and its ``start_at``
defaults to 50 (``STEP_START``) for both the consistency weight and CRL's. The reference sets
the scheduled weight at the end of each epoch, so its first epoch runs at the unscheduled weight
``lam``; both terms are exactly zero in epoch 1 (an empty consistency bank; no CRL sample has a
count yet, each epoch being a permutation), so this is not observable and not reproduced.
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "STEP_START", "schedule_weight"]

SCHEDULES = ("constant", "linear", "step", "cosine", "cycle")

#: Epochs trained at weight 0 by the ``step`` schedule unless told otherwise (the reference's
#: ``--consist_start_at`` and ``--crl_start_at``).
STEP_START = 50


def schedule_weight(name: str, weight: float, epoch: int, num_epochs: int,
                    start_epoch: int = STEP_START) -> float:
    """Weight of a regulariser during 1-based ``epoch`` of ``num_epochs``.

    ``start_epoch`` is only used by the ``step`` schedule: the number of epochs at weight 0
    (the weight switches on in epoch ``start_epoch + 1``; 0 means from the first epoch).
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
        if isinstance(start_epoch, bool) or int(start_epoch) != start_epoch or start_epoch < 0:
            raise ValueError(f"the step schedule's start_epoch is the number of epochs at weight "
                             f"0 and must be an integer >= 0, got {start_epoch!r}")
        return weight if epoch > start_epoch else 0.0
    if name == "cosine":
        return weight * math.cos((1.0 - frac) * math.pi / 2)
    if name == "cycle":
        return weight * math.sqrt(1.0 - (1.0 - frac) ** 2)
    raise ValueError(f"unknown schedule {name!r}; available: {', '.join(SCHEDULES)}")
