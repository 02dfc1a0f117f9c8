"""The distiller contract: an ``Objective`` for the student that holds a frozen teacher, and
:func:`standardize_logits` (Sun et al., CVPR 2024, "Logit Standardization in Knowledge
Distillation"), the ``logit_standardize`` option of every logit-based distiller."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..objective import Objective


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each row of ``logits`` (B, C): ``(z - mean(z)) / (std(z) + eps)`` -> (B, C).

    Sun et al. (CVPR 2024, "Logit Standardization in Knowledge Distillation") apply this to
    teacher and student logits before the temperature softmax, so the student matches the
    teacher's logit *relations* rather than their range. As in the authors' code (``normalize``
    in their ``mdistiller/distillers/KD.py``; ``tests/test_fidelity_logits.py``): ``std`` is the
    unbiased (n - 1) standard deviation over classes, ``eps`` = 1e-7 is added to it (not to
    the variance), the temperature then divides the z-scored logits, and the KD term keeps its
    ``T^2`` factor; the cross-entropy term uses the raw logits.
    """
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


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

    def logits(self, model: nn.Module, x: Tensor,
               standardize: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The student's logits (B, C), and the student and teacher logits the loss compares,
        z-scored per sample when ``standardize`` (logit standardisation, Sun et al. 2024)."""
        logits = model(x)
        with torch.no_grad():
            t = self.teacher(x)
        if not standardize:
            return logits, logits, t
        return logits, standardize_logits(logits), standardize_logits(t)
