"""Factor transfer (Kim, Park & Kwak, NeurIPS 2018, "Paraphrasing Complex Network: Network
Compression via Factor Transfer")."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..objective import StepOutput
from .common import (FeatureDistiller, adaptive_pool, batch_norm, check_positive,
                     check_reduction, check_weight, conv, match_spatial)


def ft_loss(student_factor: Tensor, teacher_factor: Tensor, p: float = 1.0,
            reduction: str = "mean") -> Tensor:
    """Distance between L2-normalised, flattened factors: per sample ``mean |u_s - u_t|^p``.

    ``u = F / ||F||_2`` over all elements of a sample's factor. With ``p = 1`` and ``"mean"``
    this is RepDistiller's ``F.l1_loss`` of the normalised factors (the paper writes the
    p-norm of the difference; the mean differs from it by the constant number of elements).
    """
    if student_factor.shape != teacher_factor.shape:
        raise ValueError(f"factor shapes differ: student {tuple(student_factor.shape)}, "
                         f"teacher {tuple(teacher_factor.shape)}")
    u_s = F.normalize(student_factor.flatten(1), dim=1)
    u_t = F.normalize(teacher_factor.flatten(1), dim=1)
    return check_reduction((u_s - u_t).abs().pow(p).mean(dim=1), reduction)


def _block(rank: int, c_in: int, c_out: int) -> list[nn.Module]:
    return [conv(rank, c_in, c_out, 3 if rank else 1), batch_norm(rank, c_out), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """Convolutional autoencoder on a teacher feature: ``encode`` gives the factor."""

    def __init__(self, rank: int, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*_block(rank, channels, channels),
                                     *_block(rank, channels, factor_channels))
        self.decoder = nn.Sequential(*_block(rank, factor_channels, channels),
                                     conv(rank, channels, channels, 3 if rank else 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class FT(FeatureDistiller):
    """Factor transfer on the last stage pair.

    A *paraphraser* (autoencoder, teacher channels -> ``round(rate * C_t)`` factor channels)
    is fitted to the teacher's last-stage feature; a *translator* (student channels -> factor
    channels) is trained with the student so that its normalised output matches the teacher
    factor: ``ce + ft_weight * ft_loss(translator(f_s), encoder(f_t))``. Different spatial sizes
    are matched by average pooling the larger map; factors are compared element by element, so
    a CNN/MLP pair raises a ``ValueError`` (two MLPs work, with linear layers).

    Preliminary stage: the reference pretrains the paraphraser as an autoencoder (reconstruction
    loss on teacher features) before distillation. Here it happens inside the same run: during
    epochs ``1..init_epochs`` (default: an eighth of the run, at least 1) the step returns
    only ``{"ft_rec": init_weight * MSE(paraphraser(f_t), f_t)}``; the student is run in eval
    mode without gradients, so it is untouched (its logits are still returned). After that the
    paraphraser is frozen (eval mode, no gradient), as in the reference. ``init_epochs=0`` skips
    the pretraining (the paraphraser then stays at its random initialisation).

    Defaults (RepDistiller): ``ft_weight`` 200, ``rate`` 0.5, ``p`` 1, ``init_weight`` 1,
    ``ce_weight`` 1, ``kd_weight`` 0 (T = 4), ``init_epochs`` None (see :mod:`.common`).
    """

    name = "ft"
    has_init_stage = True

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 ft_weight: float = 200.0, rate: float = 0.5, p: float = 1.0,
                 init_epochs: int | None = None, init_weight: float = 1.0,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature, teacher_layers=teacher_layers,
                         student_layers=student_layers, input_shape=input_shape,
                         init_epochs=init_epochs)
        self.ft_weight = check_weight("ft_weight", ft_weight)
        self.init_weight = check_weight("init_weight", init_weight)
        self.p = check_positive("p", p)
        rate = check_positive("rate", rate)
        self.need_stages()
        t_shape, s_shape = self.t_shapes.stages[-1], self.s_shapes.stages[-1]
        rank, self.common_size = self.pair_layout(t_shape, s_shape)
        k = max(1, round(rate * t_shape[0]))
        self.paraphraser = Paraphraser(rank, t_shape[0], k)
        self.translator = nn.Sequential(*_block(rank, s_shape[0], s_shape[0]),
                                        *_block(rank, s_shape[0], k))

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
        t = t_feats["stages"][-1]
        if t.dim() > 2:
            t = adaptive_pool(t, self.common_size)
        _, rec = self.paraphraser(t)
        return StepOutput(s_logits, {"ft_rec": self.init_weight * F.mse_loss(rec, t)})

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        t, s = match_spatial(t_feats["stages"][-1], s_feats["stages"][-1])
        self.paraphraser.eval()          # frozen after its pretraining
        with torch.no_grad():
            factor_t, _ = self.paraphraser(t)
        return {"ft": self.ft_weight * ft_loss(self.translator(s), factor_t, self.p)}
