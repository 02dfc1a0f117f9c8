"""Batch augmentations as plain tensor code.

Each module takes a float batch ``(B, C, *spatial)`` (one or two spatial axes, or more) on any
device and returns a batch of the same shape, with independent randomness per sample. They always
augment: the trainer only calls them on training batches. Randomness comes from the global torch
RNG of the batch's device (so ``torch.manual_seed`` makes them reproducible) or from an explicit
``generator`` passed to ``forward``. Compose them with ``nn.Sequential``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RandomRoll", "RandomCropPad", "RandomFlip", "roll_per_sample", "translate_per_sample"]


def _randint(low: int, high: int, size: tuple[int, ...], device: torch.device,
             generator: torch.Generator | None) -> Tensor:
    """Integers uniform in ``[low, high)``, drawn on the generator's device, put on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(low, high, size, device=gen_device, generator=generator).to(device)


def _check_batch(x: Tensor) -> None:
    if x.dim() < 3:
        raise ValueError(f"expected a batch (B, C, *spatial) with at least one spatial axis; "
                         f"got shape {tuple(x.shape)}")


def _gather_axis(x: Tensor, axis: int, src: Tensor) -> Tensor:
    """``out[b, ..., p, ...] = x[b, ..., src[b, p], ...]`` along ``axis``; ``src`` is (B, n)."""
    shape = [1] * x.dim()
    shape[0], shape[axis] = x.shape[0], x.shape[axis]
    return torch.gather(x, axis, src.view(shape).expand_as(x))


def roll_per_sample(x: Tensor, shifts: Tensor) -> Tensor:
    """Circularly shift each sample of ``x`` (B, C, *spatial) by its own amount.

    ``shifts`` is (B, n_spatial) integer; sample ``b`` becomes
    ``torch.roll(x[b], tuple(shifts[b]), dims=spatial axes)``.
    """
    _check_batch(x)
    spatial = x.dim() - 2
    if shifts.shape != (x.shape[0], spatial):
        raise ValueError(f"shifts must have shape {(x.shape[0], spatial)}; "
                         f"got {tuple(shifts.shape)}")
    shifts = shifts.to(x.device, torch.long)
    for a in range(spatial):
        n = x.shape[2 + a]
        # torch.roll semantics: out[p] = in[(p - s) mod n].
        src = (torch.arange(n, device=x.device)[None, :] - shifts[:, a:a + 1]) % n
        x = _gather_axis(x, 2 + a, src)
    return x


def translate_per_sample(x: Tensor, shifts: Tensor) -> Tensor:
    """Translate each sample of ``x`` (B, C, *spatial) by its own amount, filling with zeros.

    ``shifts`` is (B, n_spatial) integer; ``out[b, :, p] = x[b, :, p - shifts[b]]`` where that index
    is inside the signal and 0 elsewhere (per spatial axis).
    """
    _check_batch(x)
    spatial = x.dim() - 2
    if shifts.shape != (x.shape[0], spatial):
        raise ValueError(f"shifts must have shape {(x.shape[0], spatial)}; "
                         f"got {tuple(shifts.shape)}")
    shifts = shifts.to(x.device, torch.long)
    for a in range(spatial):
        n = x.shape[2 + a]
        src = torch.arange(n, device=x.device)[None, :] - shifts[:, a:a + 1]
        inside = (src >= 0) & (src < n)
        x = _gather_axis(x, 2 + a, src.clamp(0, n - 1))
        mask_shape = [1] * x.dim()
        mask_shape[0], mask_shape[2 + a] = x.shape[0], n
        x = x * inside.view(mask_shape).to(x.dtype)
    return x


class RandomRoll(nn.Module):
    """Per-sample uniform circular shift over all spatial axes (dims 2.. of the batch).

    Every shift of every axis is equally likely, independently per sample and axis.
    """

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        cols = [_randint(0, n, (x.shape[0], 1), x.device, generator) for n in x.shape[2:]]
        return roll_per_sample(x, torch.cat(cols, dim=1))


class RandomCropPad(nn.Module):
    """Per-sample random translation by up to ``padding`` positions per spatial axis, zero fill.

    Equivalent to zero-padding each spatial axis by ``padding`` on both sides and cropping a
    window of the original size at a uniformly random offset.
    """

    def __init__(self, padding: int) -> None:
        super().__init__()
        if padding < 0:
            raise ValueError(f"padding must be >= 0; got {padding}")
        self.padding = int(padding)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        p = self.padding
        shifts = _randint(-p, p + 1, (x.shape[0], x.dim() - 2), x.device, generator)
        return translate_per_sample(x, shifts)

    def extra_repr(self) -> str:
        return f"padding={self.padding}"


class RandomFlip(nn.Module):
    """Per-sample flip along ``dim`` (default the last axis) with probability ``p``."""

    def __init__(self, dim: int = -1, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1]; got {p}")
        self.dim, self.p = int(dim), float(p)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        gen_device = generator.device if generator is not None else x.device
        u = torch.rand(x.shape[0], device=gen_device, generator=generator).to(x.device)
        flip = (u < self.p).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(flip, x.flip(self.dim), x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, p={self.p}"
