"""Variational information distillation (Ahn, Hu, Damianou, Lawrence & Dai, CVPR 2019,
"Variational Information Distillation for Knowledge Transfer")."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import FeatureDistiller, channel_view, check_positive, check_reduction, check_weight


def vid_loss(mean: Tensor, target: Tensor, variance: Tensor, reduction: str = "mean") -> Tensor:
    """Gaussian negative log-likelihood of ``target`` under N(``mean``, ``variance``), up to
    the constant ``0.5 log 2 pi``: ``0.5 * ((mean - target)^2 / var + log var)``.

    ``mean`` and ``target`` are (B, C, *spatial); ``variance`` (C,) is per channel and > 0.
    Per sample the mean over elements, so ``"mean"`` is the mean over everything (RepDistiller).
    """
    var = channel_view(variance, mean)
    nll = 0.5 * ((mean - target).pow(2) / var + torch.log(var))
    return check_reduction(nll.flatten(1).mean(dim=1), reduction)


def _conv1(rank: int, c_in: int, c_out: int) -> nn.Module:
    """A 1-wide convolution without bias over ``rank`` spatial axes (``nn.Linear`` for 0)."""
    if rank == 0:
        return nn.Linear(c_in, c_out, bias=False)
    if rank not in (1, 2, 3):
        raise ValueError(f"features with {rank} spatial axes are not supported")
    return getattr(nn, f"Conv{rank}d")(c_in, c_out, 1, bias=False)


def vid_regressor(rank: int, c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """VID's mean regressor (B, c_in, *spatial) -> (B, c_out, *spatial): three 1-wide
    convolutions without bias, ``c_in -> c_mid -> c_mid -> c_out``, with a ReLU after the first
    two, as RepDistiller's ``VIDLoss`` (which uses ``c_mid = c_out`` = teacher channels)."""
    return nn.Sequential(_conv1(rank, c_in, c_mid), nn.ReLU(),
                         _conv1(rank, c_mid, c_mid), nn.ReLU(),
                         _conv1(rank, c_mid, c_out))


class VID(FeatureDistiller):
    """VID: ``ce + vid_weight * sum over stage pairs of vid_loss(r(f_s), f_t, sigma^2)``.

    For each stage pair (the pairs of :mod:`.common`) a learnable regressor ``r``
    (:func:`vid_regressor`: student channels -> teacher channels -> teacher channels -> teacher
    channels, no bias) predicts the mean of the teacher feature; the per-channel variance
    ``softplus(alpha) + eps`` (C_t,) is learnable too, ``alpha`` initialised so that it starts at
    ``init_variance``. Both are trained with the student. Different spatial sizes are matched by
    average pooling the larger map before the regressor (RepDistiller pools by height only, to a
    square: the same for the square maps of its models); a map paired with a vector (CNN
    teacher, MLP student) is globally average pooled first (an extension).

    Defaults (RepDistiller): ``vid_weight`` 1, ``init_variance`` 5, ``eps`` 1e-5, ``ce_weight``
    1, ``kd_weight`` 0 (T = 4).
    """

    name = "vid"

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 vid_weight: float = 1.0, init_variance: float = 5.0, eps: float = 1e-5,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature, teacher_layers=teacher_layers,
                         student_layers=student_layers, input_shape=input_shape)
        self.vid_weight = check_weight("vid_weight", vid_weight)
        self.eps = check_positive("eps", eps)
        init_variance = check_positive("init_variance", init_variance)
        if init_variance <= eps:
            raise ValueError(f"init_variance must exceed eps ({eps}), got {init_variance}")
        self.need_stages()
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()
        # softplus^-1(init_variance - eps)
        start = math.log(math.expm1(init_variance - eps))
        for ti, si in self.pairs:
            t_shape, s_shape = self.t_shapes.stages[ti], self.s_shapes.stages[si]
            rank, _ = self.pair_layout(t_shape, s_shape, allow_global_pool=True)
            c_s, c_t = s_shape[0], t_shape[0]
            self.regressors.append(vid_regressor(rank, c_s, c_t, c_t))
            self.log_scales.append(nn.Parameter(torch.full((c_t,), start)))

    def variances(self) -> list[Tensor]:
        """The current per-channel variances, one (C_t,) tensor per stage pair."""
        return [F.softplus(a) + self.eps for a in self.log_scales]

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        total = 0.0
        for (ti, si), reg, var in zip(self.pairs, self.regressors, self.variances()):
            t, s = self.align(t_feats["stages"][ti], s_feats["stages"][si])
            total = total + vid_loss(reg(s), t, var)
        return {"vid": self.vid_weight * total}
