"""Factor transfer (Kim, Park & Kwak, NeurIPS 2018, "Paraphrasing Complex Network: Network
Compression via Factor Transfer")."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.resnet_cifar import CifarResNet
from ..models.wrn import WideResNet
from ..objective import StepOutput
from .common import (FeatureDistiller, adaptive_pool, batch_norm, check_positive,
                     check_reduction, check_weight, match_spatial)


#: RepDistiller's preliminary-stage learning rate for FT with a CIFAR ResNet or WRN student.
REFERENCE_SMALL_LR = 0.01


def ft_factor(factor: Tensor, p1: float = 2.0) -> Tensor:
    """The compared form of a factor map (B, K, *spatial): ``mean_k F^p1`` over the factor
    channels, flattened to (B, positions) and L2-normalised per sample."""
    return F.normalize(factor.pow(p1).mean(dim=1).flatten(1), dim=1)


def ft_loss(student_factor: Tensor, teacher_factor: Tensor, p1: float = 2.0, p2: float = 1.0,
            reduction: str = "mean") -> Tensor:
    """Factor-transfer distance between two factor maps (B, K_s, *spatial), (B, K_t, *spatial).

    The larger map is first average pooled to the common spatial size; then, per sample, the
    mean over positions of ``|u_s - u_t|^p2`` with ``u = ft_factor(F, p1)``, so ``"mean"`` is
    the mean over the batch and positions. With the defaults ``p1 = 2, p2 = 1`` this is
    RepDistiller's ``FactorTransfer`` (the paper writes the p-norm of the difference of
    normalised factors; this is its customary form). For other ``p2`` the reference raises the
    *signed* difference to the power ``p2``; this takes its absolute value first, which is the
    same for even ``p2``.
    """
    if (student_factor.shape[0] != teacher_factor.shape[0]
            or student_factor.dim() != teacher_factor.dim()):
        raise ValueError(f"factor maps must have the same batch size and number of spatial axes, "
                         f"got student {tuple(student_factor.shape)} and teacher "
                         f"{tuple(teacher_factor.shape)}")
    if student_factor.dim() < 3:
        raise ValueError(f"ft_loss compares factor maps (B, K, *spatial) position by position, "
                         f"got vectors of shape {tuple(student_factor.shape)}")
    s, t = match_spatial(student_factor, teacher_factor)
    diff = (ft_factor(s, p1) - ft_factor(t, p1)).abs()
    return check_reduction(diff.pow(p2).mean(dim=1), reduction)


def _conv3(rank: int, c_in: int, c_out: int, transposed: bool = False) -> nn.Module:
    """3-wide, stride-1, padding-1 (transposed) convolution with bias over ``rank`` axes."""
    if rank not in (1, 2, 3):
        raise ValueError(f"factor transfer needs feature maps with 1 to 3 spatial axes, got {rank}")
    name = ("ConvTranspose" if transposed else "Conv") + f"{rank}d"
    return getattr(nn, name)(c_in, c_out, 3, stride=1, padding=1)


def _layers(rank: int, channels: Sequence[int], bn: bool,
            transposed: bool = False) -> nn.Sequential:
    """Consecutive ``conv -> [batch norm] -> LeakyReLU(0.1)`` blocks through ``channels``."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [_conv3(rank, c_in, c_out, transposed),
                   batch_norm(rank, c_out) if bn else nn.Identity(), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Convolutional autoencoder on a teacher feature (B, C, *spatial); ``encode`` gives the
    factor (B, K, *spatial).

    Encoder: three 3x3 convolutions ``C -> C -> K -> K``; decoder: three 3x3 transposed
    convolutions ``K -> K -> C -> C``; every one with bias, followed by LeakyReLU(0.1) (the last
    included), with batch norm before it only when ``bn`` (off by default), as RepDistiller.
    """

    def __init__(self, rank: int, channels: int, factor_channels: int, bn: bool = False) -> None:
        super().__init__()
        c, k = channels, factor_channels
        self.encoder = _layers(rank, (c, c, k, k), bn)
        self.decoder = _layers(rank, (k, k, c, c), bn, transposed=True)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(factor, reconstruction)``."""
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class Translator(nn.Sequential):
    """Student feature (B, C_s, *spatial) -> factor (B, K, *spatial): three 3x3 convolutions
    ``C_s -> C_s -> K -> K`` with bias, each followed by batch norm (when ``bn``, the default)
    and LeakyReLU(0.1), as RepDistiller."""

    def __init__(self, rank: int, channels: int, factor_channels: int, bn: bool = True) -> None:
        super().__init__(*_layers(rank, (channels, channels, factor_channels, factor_channels), bn))


class FT(FeatureDistiller):
    """Factor transfer on the last stage pair (RepDistiller's ``feat[-2]``).

    A *paraphraser* (:class:`Paraphraser`, teacher channels ``C_t`` -> ``K = int(rate * C_t)``
    factor channels) is fitted to the teacher's last-stage feature; a *translator*
    (:class:`Translator`, student channels -> ``K``) is trained with the student so that its
    output matches the teacher's factor: ``ce + ft_weight * ft_loss(translator(f_s),
    encode(f_t), p1, p2)``. Both run at their own model's spatial size; :func:`ft_loss` pools
    the larger factor map. Factors are compared position by position, so both models need
    feature maps: a CNN/MLP pair or two MLPs raise a ``ValueError`` (a vector has a single
    position, whose normalised factor is always 1, so the loss would be identically 0).

    Preliminary stage: the paraphraser is first trained alone as an autoencoder of the
    teacher's feature, the step returning only ``{"ft_rec": init_weight * MSE(paraphraser(f_t),
    f_t)}`` on the teacher's own feature map; the student is run in eval mode without gradients,
    so it is untouched (its logits are still returned). By default (``init_stage="separate"``,
    RepDistiller's ``init``) this takes ``init_epochs`` (default 30) extra epochs before the main
    schedule, with its own SGD optimiser over the paraphraser alone at the constant learning
    rate ``init_lr``: by default 0.01 for a CIFAR ResNet or WRN student (the reference's rule
    for ``resnet8..110``, ``resnet8x4``, ``resnet32x4``, ``wrn_*``), else the main run's
    initial rate. ``init_stage="in_run"`` uses the first ``init_epochs`` epochs of the run
    (default: an eighth of it, see :mod:`.common`). Afterwards the paraphraser is frozen (eval
    mode, left out of the main optimiser), as in the reference. ``init_epochs=0`` skips the
    pretraining (the paraphraser then stays at its random initialisation).

    Defaults (RepDistiller): ``ft_weight`` 200, ``rate`` 0.5, ``p1`` 2, ``p2`` 1,
    ``paraphraser_bn`` False, ``translator_bn`` True, ``init_weight`` 1, ``ce_weight`` 1,
    ``kd_weight`` 0 (T = 4), ``init_epochs`` None (30), ``init_stage`` "separate",
    ``init_lr`` None (the rule above).
    """

    name = "ft"
    has_init_stage = True

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 ft_weight: float = 200.0, rate: float = 0.5, p1: float = 2.0, p2: float = 1.0,
                 paraphraser_bn: bool = False, translator_bn: bool = True,
                 init_epochs: int | None = None, init_weight: float = 1.0,
                 init_stage: str = "separate", init_lr: float | None = None,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature, teacher_layers=teacher_layers,
                         student_layers=student_layers, input_shape=input_shape,
                         init_epochs=init_epochs, init_stage=init_stage, init_lr=init_lr)
        self.ft_weight = check_weight("ft_weight", ft_weight)
        self.init_weight = check_weight("init_weight", init_weight)
        self.p1 = check_positive("p1", p1)
        self.p2 = check_positive("p2", p2)
        rate = check_positive("rate", rate)
        self.need_stages()
        t_shape, s_shape = self.t_shapes.stages[-1], self.s_shapes.stages[-1]
        rank, self.common_size = self.pair_layout(t_shape, s_shape, min_rank=1)
        k = int(rate * t_shape[0])                       # truncated, as the reference
        if k < 1:
            raise ValueError(f"rate={rate} leaves no factor channel for a teacher feature with "
                             f"{t_shape[0]} channels (int(rate * C) = 0); raise rate")
        self.paraphraser = Paraphraser(rank, t_shape[0], k, bn=bool(paraphraser_bn))
        self.translator = Translator(rank, s_shape[0], k, bn=bool(translator_bn))

    def init_step(self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor) -> StepOutput:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                s_logits = model(x)
        finally:
            model.train(was_training)
        _, t_feats = self.teacher_features(x)
        self.paraphraser.train(self.training)
        t = t_feats["stages"][-1]        # at the teacher's own size, as the main stage encodes it
        _, rec = self.paraphraser(t)
        return StepOutput(s_logits, {"ft_rec": self.init_weight * F.mse_loss(rec, t)})

    def init_modules(self, model: nn.Module) -> list[nn.Module]:
        return [self.paraphraser]

    def frozen_after_init(self) -> list[nn.Module]:
        return [self.paraphraser]

    def init_stage_lr(self, model: nn.Module, lr: float) -> float:
        """``init_lr`` if given; else 0.01 for a CIFAR ResNet or WRN student, the main ``lr``
        otherwise (RepDistiller's ``init`` for FT)."""
        if self.init_lr is not None:
            return self.init_lr
        return REFERENCE_SMALL_LR if isinstance(model, (CifarResNet, WideResNet)) else lr

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        self.paraphraser.eval()          # frozen after its pretraining
        with torch.no_grad():
            factor_t = self.paraphraser.encode(t_feats["stages"][-1])
        factor_s = self.translator(s_feats["stages"][-1])
        return {"ft": self.ft_weight * ft_loss(factor_s, factor_t, self.p1, self.p2)}
