"""Teacher regularisers of SoTeacher: Lipschitz bound, consistency bank, weight schedules."""

from .consistency import (BANK_UPDATES, ConsistencyBank, ConsistencyRegularizer,
                          consistency_loss)
from .lipschitz import layer_bound, lipschitz_bound
from .schedules import SCHEDULES, schedule_weight

__all__ = ["BANK_UPDATES", "SCHEDULES", "ConsistencyBank", "ConsistencyRegularizer",
           "consistency_loss", "layer_bound", "lipschitz_bound", "schedule_weight"]
