"""Batch augmentations as plain tensor code.

Each random module takes a batch ``(B, C, *spatial)`` (one or two spatial axes, or more; float, or
uint8 images) on any device and returns a batch of the same dtype, with independent randomness per
sample; all but ``RandomResizedCrop`` keep the shape. They always augment: the trainer only calls
them on training batches. Randomness comes from the global torch RNG of the batch's device (so
``torch.manual_seed`` makes them reproducible) or from an explicit ``generator`` passed to
``forward``. Compose them with ``nn.Sequential``.

``ToFloat`` and ``Normalize`` are deterministic conversions of uint8 images (0..255) to float;
image datasets use ``Normalize`` as their ``DataBundle.preprocess``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RandomRoll", "RandomCropPad", "RandomFlip", "RandomResizedCrop", "ToFloat", "Normalize",
           "resized_crop", "roll_per_sample", "translate_per_sample"]


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


def _rand(size: tuple[int, ...], device: torch.device,
          generator: torch.Generator | None) -> Tensor:
    """Uniform [0, 1) float64 numbers, drawn on the generator's device, put on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(size, device=gen_device, generator=generator,
                      dtype=torch.float64).to(device)


def resized_crop(x: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop box ``b`` of each image ``x[b]`` (B, C, H, W) and resize it to ``size`` (bilinear).

    ``boxes`` is (B, 4) ``(top, left, height, width)`` in pixels. Resampling is bilinear without
    anti-aliasing, with pixel centres at half-integers (``align_corners=False``) and edge pixels
    repeated outside the image: a box covering the whole image gives exactly
    ``F.interpolate(x, size, mode="bilinear", align_corners=False)``. uint8 input is rounded back
    to uint8; float input keeps its dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W); got shape {tuple(x.shape)}")
    if boxes.shape != (x.shape[0], 4):
        raise ValueError(f"boxes must have shape {(x.shape[0], 4)}; got {tuple(boxes.shape)}")
    h_in, w_in = x.shape[2], x.shape[3]
    compute = x.dtype if x.is_floating_point() else torch.float32
    b = boxes.to(x.device, torch.float64)
    top, left, h, w = b.unbind(1)
    # Output pixel centre u in [-1, 1] (normalised) maps to input x0 + (u + 1) / 2 * w pixels, i.e.
    # normalised input coordinate (w / W) u + (2 x0 + w) / W - 1.
    theta = torch.zeros(x.shape[0], 2, 3, dtype=torch.float64, device=x.device)
    theta[:, 0, 0] = w / w_in
    theta[:, 0, 2] = (2 * left + w) / w_in - 1
    theta[:, 1, 1] = h / h_in
    theta[:, 1, 2] = (2 * top + h) / h_in - 1
    grid = F.affine_grid(theta.to(compute), [x.shape[0], x.shape[1], *size], align_corners=False)
    out = F.grid_sample(x.to(compute), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    if x.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(x.dtype)


class RandomResizedCrop(nn.Module):
    """Per-sample random crop of random area and aspect ratio, resized to ``size`` (H, W).

    Images (B, C, H, W) only. As torchvision's ``RandomResizedCrop``: the crop covers a fraction of
    the image area uniform in ``scale`` and has an aspect ratio (width / height) log-uniform in
    ``ratio``; its integer height and width are rounded from those, and its position is uniform
    over the positions that keep it inside the image. Up to 10 draws per sample; a sample whose
    10 draws all fall outside the image gets the central crop with the aspect ratio clamped to
    ``ratio``. Resampling as in :func:`resized_crop` (bilinear, no anti-aliasing).
    """

    attempts = 10

    def __init__(self, size: int | tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        super().__init__()
        if isinstance(size, int):
            size = (size, size)
        self.size = (int(size[0]), int(size[1]))
        if min(self.size) < 1:
            raise ValueError(f"size must be positive; got {size}")
        lo, hi = float(scale[0]), float(scale[1])
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1; got {scale}")
        rlo, rhi = float(ratio[0]), float(ratio[1])
        if not 0.0 < rlo <= rhi:
            raise ValueError(f"ratio must satisfy 0 < min <= max; got {ratio}")
        self.scale, self.ratio = (lo, hi), (rlo, rhi)

    def sample_boxes(self, batch: int, height: int, width: int, device: torch.device,
                     generator: torch.Generator | None = None) -> Tensor:
        """(batch, 4) integer boxes ``(top, left, height, width)`` drawn as described above."""
        n = self.attempts
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0])
                                 * _rand((batch, n), device, generator))
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * _rand((batch, n), device, generator))
        w = torch.sqrt(area * aspect).round()
        h = torch.sqrt(area / aspect).round()
        ok = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
        # Fallback: the central crop with the aspect ratio clamped into ``ratio``.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fw, fh = int(round(height * self.ratio[1])), height
        else:
            fw, fh = width, height
        found = ok.any(1)
        pick = ok.to(torch.uint8).argmax(1, keepdim=True)     # the first successful draw
        w = torch.where(found, w.gather(1, pick)[:, 0], torch.full_like(w[:, 0], fw))
        h = torch.where(found, h.gather(1, pick)[:, 0], torch.full_like(h[:, 0], fh))
        u = _rand((batch, 2), device, generator)
        top = torch.where(found, torch.floor(u[:, 0] * (height - h + 1)),
                          torch.full_like(h, (height - fh) // 2))
        left = torch.where(found, torch.floor(u[:, 1] * (width - w + 1)),
                           torch.full_like(w, (width - fw) // 2))
        return torch.stack([top, left, h, w], dim=1).to(torch.long)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"RandomResizedCrop needs images (B, C, H, W); got shape "
                             f"{tuple(x.shape)}")
        boxes = self.sample_boxes(x.shape[0], x.shape[2], x.shape[3], x.device, generator)
        return resized_crop(x, boxes, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}"


class ToFloat(nn.Module):
    """uint8 images (0..255) -> float32 in [0, 1]; a float batch is returned unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            return x
        return x.to(torch.float32).div_(255.0)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` after :class:`ToFloat`: uint8 input is first scaled to
    [0, 1] (float input is taken to be in [0, 1] already), so ``mean`` and ``std`` are given on
    the [0, 1] scale (e.g. CIFAR-100's (0.5071, 0.4865, 0.4409)). Channels are dim 1."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(s) for s in std], dtype=torch.float32)
        if mean_t.dim() != 1 or mean_t.shape != std_t.shape or len(mean_t) == 0:
            raise ValueError(f"mean and std must be equal-length sequences; got {mean}, {std}")
        if (std_t <= 0).any():
            raise ValueError(f"std must be positive; got {std}")
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != len(self.mean):
            raise ValueError(f"expected a batch (B, {len(self.mean)}, ...); got shape "
                             f"{tuple(x.shape)}")
        x = ToFloat()(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = self.mean.to(x.device, x.dtype).view(shape)
        std = self.std.to(x.device, x.dtype).view(shape)
        return (x - mean) / std

    def extra_repr(self) -> str:
        return (f"mean={[round(v, 4) for v in self.mean.tolist()]}, "
                f"std={[round(v, 4) for v in self.std.tolist()]}")
