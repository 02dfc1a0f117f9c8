"""Plain VGG-style CNNs for 1-D signals ``(C, L)`` and images ``(C, H, W)``, plus presets.

Stage ``i`` = [max-pool 2 if ``i > 0``] + ``convs_per_stage`` x (conv -> BN -> ReLU), with zero
'same' padding so only the pools change the resolution. Global average pooling feeds a linear
head. Putting the pool at the start of the next stage (rather than at the end of the previous)
keeps each reported stage feature at its own full resolution.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from . import MODELS, FeatureNet, Stage, as_shape, as_widths, check_num_classes

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_LAYOUT = {1: "(C, L)", 2: "(C, H, W)"}


class ConvNet(FeatureNet):
    """CNN over ``dim`` spatial dimensions (1 or 2); see the module docstring for the layout."""

    has_stem = False

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], dim: int,
                 widths: Sequence[int] = (32, 64, 128), kernel_size: int = 3,
                 batch_norm: bool = True, convs_per_stage: int = 2) -> None:
        super().__init__(num_classes, input_shape)
        if dim not in _CONV:
            raise ValueError(f"dim must be 1 or 2, got {dim!r}")
        if len(input_shape) != dim + 1:
            raise ValueError(f"ConvNet(dim={dim}) needs input_shape {_LAYOUT[dim]}, "
                             f"got {input_shape}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size!r}")
        if convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be >= 1, got {convs_per_stage!r}")
        self.dim = dim
        conv, bn, pool = _CONV[dim], _BN[dim], _POOL[dim]
        # 'Same' zero padding done by hand: PyTorch's padding="same" is much slower on CPU and
        # warns for even kernels. Odd kernels pad symmetrically inside the conv; even kernels get
        # an explicit asymmetric pad in front (left (k-1)//2, right k//2, as "same" does).
        padding = kernel_size // 2 if kernel_size % 2 == 1 else 0
        left, right = (kernel_size - 1) // 2, kernel_size // 2
        c_in = input_shape[0]
        stages = []
        for i, w in enumerate(widths):
            layers: list[nn.Module] = []
            if i > 0:
                # ceil_mode keeps a size-1 axis at size 1, so short inputs never pool to nothing.
                layers.append(pool(2, ceil_mode=True))
            for j in range(convs_per_stage):
                if kernel_size % 2 == 0:
                    layers.append(nn.ConstantPad1d((left, right), 0.0) if dim == 1
                                  else nn.ZeroPad2d((left, right, left, right)))
                # No conv bias before batch norm: BN's shift makes it redundant.
                layers.append(conv(c_in, w, kernel_size, padding=padding, bias=not batch_norm))
                if batch_norm:
                    layers.append(bn(w))
                if j < convs_per_stage - 1:
                    # In place is safe here: only the stage's last activation is reported.
                    layers.append(nn.ReLU(inplace=True))
                c_in = w
            stages.append(Stage(nn.Sequential(*layers)))
        self.stages = nn.ModuleList(stages)
        self.stage_dims = list(widths)
        self.head = nn.Linear(c_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.stages.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def pool(self, h: Tensor) -> Tensor:
        # Global average over all spatial axes: (B, C, *spatial) -> (B, C).
        return h.flatten(2).mean(dim=2)


def _check_rank(name: str, input_shape: tuple[int, ...], dim: int) -> None:
    """Raise a ValueError naming the given shape and a model family that fits it."""
    if len(input_shape) == dim + 1:
        return
    rank = len(input_shape)
    base = f"model {name!r} needs input_shape {_LAYOUT[dim]} ({dim + 1} dims), got {input_shape}"
    if rank == 1:
        hint = (f"use 'mlp' for flat feature vectors, or pass (1, {input_shape[0]}) "
                f"for a single-channel 1-D signal")
    elif rank in (2, 3):
        other = rank - 1
        hint = f"use {name.replace(f'cnn{dim}d', f'cnn{other}d')!r} for {_LAYOUT[other]} inputs"
    else:
        hint = "use 'mlp', which flattens inputs of any shape"
    raise ValueError(f"{base}; {hint}")


def _build(name: str, dim: int, num_classes: int, input_shape: Sequence[int],
           widths: Sequence[int], kernel_size: int, batch_norm: bool,
           convs_per_stage: int) -> ConvNet:
    shape = as_shape(input_shape)
    _check_rank(name, shape, dim)
    return ConvNet(check_num_classes(num_classes), shape, dim, as_widths(widths),
                   int(kernel_size), bool(batch_norm), int(convs_per_stage))


@MODELS.register("cnn1d")
def cnn1d(num_classes: int, input_shape: tuple[int, ...], widths: Sequence[int] = (32, 64, 128),
          kernel_size: int = 3, batch_norm: bool = True, convs_per_stage: int = 2) -> ConvNet:
    """1-D CNN for ``(C, L)`` inputs; one stage per entry of ``widths``."""
    return _build("cnn1d", 1, num_classes, input_shape, widths, kernel_size, batch_norm,
                  convs_per_stage)


@MODELS.register("cnn1d_small")
def cnn1d_small(num_classes: int, input_shape: tuple[int, ...], kernel_size: int = 3,
                batch_norm: bool = True) -> ConvNet:
    """``cnn1d`` with widths (8, 16) and one conv per stage."""
    return _build("cnn1d_small", 1, num_classes, input_shape, (8, 16), kernel_size, batch_norm, 1)


@MODELS.register("cnn1d_large")
def cnn1d_large(num_classes: int, input_shape: tuple[int, ...], kernel_size: int = 3,
                batch_norm: bool = True, convs_per_stage: int = 2) -> ConvNet:
    """``cnn1d`` with widths (64, 128, 256)."""
    return _build("cnn1d_large", 1, num_classes, input_shape, (64, 128, 256), kernel_size,
                  batch_norm, convs_per_stage)


@MODELS.register("cnn2d")
def cnn2d(num_classes: int, input_shape: tuple[int, ...], widths: Sequence[int] = (32, 64, 128),
          kernel_size: int = 3, batch_norm: bool = True, convs_per_stage: int = 2) -> ConvNet:
    """2-D CNN for ``(C, H, W)`` inputs; one stage per entry of ``widths``."""
    return _build("cnn2d", 2, num_classes, input_shape, widths, kernel_size, batch_norm,
                  convs_per_stage)


@MODELS.register("cnn2d_small")
def cnn2d_small(num_classes: int, input_shape: tuple[int, ...], kernel_size: int = 3,
                batch_norm: bool = True) -> ConvNet:
    """``cnn2d`` with widths (8, 16) and one conv per stage."""
    return _build("cnn2d_small", 2, num_classes, input_shape, (8, 16), kernel_size, batch_norm, 1)


@MODELS.register("cnn2d_large")
def cnn2d_large(num_classes: int, input_shape: tuple[int, ...], kernel_size: int = 3,
                batch_norm: bool = True, convs_per_stage: int = 2) -> ConvNet:
    """``cnn2d`` with widths (64, 128, 256)."""
    return _build("cnn2d_large", 2, num_classes, input_shape, (64, 128, 256), kernel_size,
                  batch_norm, convs_per_stage)
