"""soteacher: student-oriented teacher training (SoTeacher, ICLR 2024) and knowledge distillation.

The public API::

    lipschitz_bound, ConsistencyRegularizer      # SoTeacher's regularisers, for your own loop
    train_teacher, distill, evaluate             # one call each
    create_model, build_dataset, build_distiller, build_teacher_objective
    list_models, list_datasets, list_distillers, list_teachers
"""

__version__ = "0.1.0"

# Before torch is imported: OpenMP reads its wait policy once, at start (engine/threads.py).
from .engine.threads import prefer_passive_wait as _prefer_passive_wait

_prefer_passive_wait()

from .api import TrainResult, distill, evaluate, train_teacher
from .data import ArrayDataset, IndexedDataset, OracleTeacher, build_dataset, list_datasets
from .distillers import Distiller, build_distiller, kd_loss, list_distillers
from .engine.optim import TrainSettings
from .engine.trainer import NonFiniteLossError, Trainer
from .models import create_model, list_models
from .objective import Objective, StepOutput
from .pipeline import load_model
from .regularizers import (ConsistencyBank, ConsistencyRegularizer, consistency_loss,
                           lipschitz_bound, schedule_weight)
from .teachers import TeacherObjective, build_teacher_objective, list_teachers

__all__ = [
    "ArrayDataset", "ConsistencyBank", "ConsistencyRegularizer", "Distiller", "IndexedDataset",
    "NonFiniteLossError", "Objective", "OracleTeacher", "StepOutput", "TeacherObjective",
    "TrainResult", "TrainSettings", "Trainer", "build_dataset", "build_distiller",
    "build_teacher_objective", "consistency_loss", "create_model", "distill", "evaluate",
    "kd_loss", "lipschitz_bound", "list_datasets", "list_distillers", "list_models",
    "list_teachers", "load_model", "schedule_weight", "train_teacher",
]
