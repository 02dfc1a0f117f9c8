"""The distiller contract: an ``Objective`` for the student that holds a frozen teacher."""

from __future__ import annotations

from torch import nn

from ..objective import Objective


class Distiller(Objective):
    """Base class of every distillation algorithm.

    The teacher is frozen (no gradients) and stays in eval mode whenever ``train()`` is called
    on the distiller, so its batch-norm statistics and dropout never change. Learnable parts of
    a method (connectors, embeddings) are submodules and are trained with the student.
    """

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        return self
