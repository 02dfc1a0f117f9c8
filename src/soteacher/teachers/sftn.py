"""Student-friendly teacher networks (SFTN; Park et al., NeurIPS 2021, "Learning Student-Friendly
Teacher Networks for Knowledge Distillation", arXiv 2102.07650).

Not checked against code: no official implementation was found, so this module follows the
paper's description alone, and no test compares it with a reference.

While the teacher trains, student branches hang off its intermediate features: branch ``i``
takes the teacher's feature after teacher stage ``t_i``, maps it to the shape the student's stage
``s_i + 1`` expects (a teacher-to-student transform: adaptive average pooling to the student's
resolution if it differs, 1x1 convolution, batch norm, ReLU; linear, batch norm, ReLU for vector
features) and runs it through fresh copies of the student's remaining stages and head. With
``q_T`` the teacher's softmax, ``q_R^i`` branch ``i``'s, and ``~`` the softmax at temperature
``tau``, the loss is

    L_SFTN = lambda_T * L_T + lambda_R^CE * L_R^CE + lambda_R^KL * L_R^KL
    L_T    = CE(q_T, y)
    L_R^CE = sum_i CE(q_R^i, y)
    L_R^KL = sum_i tau^2 KL(~q_R^i || ~q_T)

(``teacher_weight``, ``branch_ce_weight``, ``branch_kl_weight``, ``kl_temperature``; defaults
1, 1, 3 and ``tau = 1``), averaged over the batch and optimised jointly over teacher and
branches; the branches belong to the objective and are discarded after training (``model.pt``
holds the teacher only). The KL term puts the student branch first, ``sum_c ~q_R,c log(~q_R,c /
~q_T,c)``, the reverse of the usual KD direction; its gradient reaches both the branch and the
teacher.

Unverified: the paper's method section was not available to us (PAPER.md names SFTN only as a
comparison reviewers asked for; the seed summary does not mention it), so no equation number of
the paper is quoted here, and the following are this implementation's reading of the paper that
no source at hand confirms: the weights 1 / 1 / 3 and ``tau = 1``, the KL direction
``KL(q_R || q_T)``, the ``tau^2`` factor, sums (not means) over branches, and the transform's
layers. The branch-point rule below for unequal stage counts is ours.

Branch points: with ``K_T`` teacher and ``K_S`` student stages there are
``n = min(K_T, K_S) - 1`` branches; branch ``b = 1..n`` leaves after teacher stage
``round(b K_T / (n + 1))`` and enters the student after its stage ``round(b K_S / (n + 1))``
(equal stage counts: after stage ``b`` of both). Teacher and student must both be registered
models honouring the feature contract (``stages``, ``head``, ``forward_features``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..objective import Objective, StepOutput

__all__ = ["SFTNObjective", "StudentBranch", "branch_points"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}


def _is_feature_net(model: Any) -> bool:
    return (isinstance(getattr(model, "stages", None), nn.ModuleList)
            and isinstance(getattr(model, "head", None), nn.Module)
            and callable(getattr(model, "forward_features", None))
            and callable(getattr(model, "pool", None)))


def branch_points(num_teacher_stages: int, num_student_stages: int) -> list[tuple[int, int]]:
    """``[(t_b, s_b), ...]``: after teacher stage ``t_b`` into the student after its stage
    ``s_b`` (1-based), as in the module docstring."""
    kt, ks = num_teacher_stages, num_student_stages
    n = min(kt, ks) - 1
    if n < 1:
        raise ValueError(f"SFTN needs at least 2 stages in both the teacher ({kt}) and the "
                         f"student ({ks}) to attach a student branch")
    out = []
    for b in range(1, n + 1):
        t = min(max(round(b * kt / (n + 1)), 1), kt - 1)
        s = min(max(round(b * ks / (n + 1)), 1), ks - 1)
        if (t, s) not in out:
            out.append((t, s))
    return out


def _adapter(t_shape: Sequence[int], s_shape: Sequence[int]) -> nn.Module:
    """Teacher feature (C_t, *spatial_t) -> student feature (C_s, *spatial_s)."""
    t_rank, s_rank = len(t_shape) - 1, len(s_shape) - 1       # spatial dims
    ct, cs = t_shape[0], s_shape[0]
    if s_rank == 0:
        layers: list[nn.Module] = []
        if t_rank > 0:
            layers.append(nn.Flatten(2))
            layers.append(_Mean(2))
        layers += [nn.Linear(ct, cs), nn.BatchNorm1d(cs), nn.ReLU()]
        return nn.Sequential(*layers)
    if t_rank != s_rank or s_rank not in _CONV:
        raise ValueError(f"SFTN cannot feed a teacher feature of shape {tuple(t_shape)} into a "
                         f"student stage expecting {tuple(s_shape)}")
    layers = []
    if tuple(t_shape[1:]) != tuple(s_shape[1:]):
        layers.append(_POOL[s_rank](tuple(s_shape[1:])))
    layers += [_CONV[s_rank](ct, cs, 1, bias=False), _BN[s_rank](cs), nn.ReLU()]
    return nn.Sequential(*layers)


class _Mean(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=self.dim)


class StudentBranch(nn.Module):
    """``adapter`` -> the student's stages after ``skip`` -> its pooling and head."""

    def __init__(self, student: nn.Module, skip: int, adapter: nn.Module) -> None:
        super().__init__()
        self.adapter = adapter
        self.net = student
        # Only the later stages run; the earlier ones are dropped from this copy.
        self.net.stages = nn.ModuleList(list(student.stages)[skip:])

    def forward(self, feature: Tensor) -> Tensor:
        h = self.adapter(feature)
        for stage in self.net.stages:
            h = stage(h)
        return self.net.head(self.net.pool(h))


@torch.no_grad()
def _stage_shapes(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        _, feats = model.forward_features(torch.zeros(2, *input_shape, device=device))
    finally:
        model.train(was_training)
    return [tuple(f.shape[1:]) for f in feats["stages"]]


class SFTNObjective(Objective):
    """The SFTN teacher loss (see the module docstring) with the student branches it trains.

    ``teacher``: the model being trained (used at construction for its stage shapes);
    ``make_student``: a function returning a fresh student model.
    """

    def __init__(self, teacher: nn.Module, make_student, input_shape: Sequence[int],
                 teacher_weight: float = 1.0, branch_ce_weight: float = 1.0,
                 branch_kl_weight: float = 3.0, kl_temperature: float = 1.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        for name, v in (("teacher_weight", teacher_weight), ("branch_ce_weight", branch_ce_weight),
                        ("branch_kl_weight", branch_kl_weight),
                        ("label_smoothing", label_smoothing)):
            if not v >= 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if not kl_temperature > 0:
            raise ValueError(f"kl_temperature must be > 0, got {kl_temperature}")
        if not _is_feature_net(teacher):
            raise ValueError(f"SFTN needs a teacher with the feature contract (stages, head, "
                             f"forward_features: a registered model); {type(teacher).__name__} "
                             f"has not")
        probe = make_student()
        if not _is_feature_net(probe):
            raise ValueError(f"SFTN needs a student with the feature contract (stages, head, "
                             f"forward_features: a registered model); {type(probe).__name__} "
                             f"has not")
        t_shapes = _stage_shapes(teacher, input_shape)
        s_shapes = _stage_shapes(probe, input_shape)
        self.points = branch_points(len(t_shapes), len(s_shapes))
        branches = []
        for i, (t, s) in enumerate(self.points):
            student = probe if i == 0 else make_student()
            branches.append(StudentBranch(student, s, _adapter(t_shapes[t - 1], s_shapes[s - 1])))
        self.branches = nn.ModuleList(branches)
        self.teacher_weight = teacher_weight
        self.branch_ce_weight = branch_ce_weight
        self.branch_kl_weight = branch_kl_weight
        self.kl_temperature = kl_temperature
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor) -> StepOutput:
        logits, feats = model.forward_features(x)
        stages = feats["stages"]
        tau = self.kl_temperature
        log_t = F.log_softmax(logits.float() / tau, dim=1)
        ce_r = logits.new_zeros((), dtype=torch.float32)
        kl_r = logits.new_zeros((), dtype=torch.float32)
        for (t, _), branch in zip(self.points, self.branches):
            q = branch(stages[t - 1]).float()
            ce_r = ce_r + F.cross_entropy(q, y)
            log_r = F.log_softmax(q / tau, dim=1)
            # KL(q_R || q_T): kl_div(input=log q_T, target=log q_R)
            kl_r = kl_r + F.kl_div(log_t, log_r, log_target=True, reduction="batchmean") * tau ** 2
        losses = {"ce": self.teacher_weight * F.cross_entropy(
            logits, y, label_smoothing=self.label_smoothing)}
        if self.branch_ce_weight > 0:
            losses["branch_ce"] = self.branch_ce_weight * ce_r
        if self.branch_kl_weight > 0:
            losses["branch_kl"] = self.branch_kl_weight * kl_r
        return StepOutput(logits, losses)
