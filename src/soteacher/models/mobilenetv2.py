"""MobileNetV2 (Sandler et al., 2018), CIFAR variant of the RepDistiller / CRD benchmark
(``mobile_half``: expansion 6, width 0.5): ``mobilenetv2``.

Layout: a 3x3 stride-2 conv stem (``int(32 * width)`` channels) with BN and ReLU; seven groups of
inverted residual blocks (expansion ``t``, channels ``int(c * width)``, ``n`` blocks, first stride
``s``) with ``(t, c, n, s)`` = (1, 16, 1, 1), (T, 24, 2, 1), (T, 32, 3, 2), (T, 64, 4, 2),
(T, 96, 3, 1), (T, 160, 3, 2), (T, 320, 1, 1); a 1x1 conv to 1280 channels with BN and ReLU;
global average pooling; a linear head. Each inverted residual is pointwise expand (always present,
also for t = 1) -> BN -> ReLU -> depthwise 3x3 -> BN -> ReLU -> pointwise project -> BN, with an
identity shortcut when stride is 1 and the channel count is unchanged.

Feature contract (RepDistiller's ``mobile_half``, tested position by position): ``stem`` is the
stem's output; the four stages are groups (0, 1), (2), (3, 4), (5, 6), and each reports its
*linear* bottleneck output, with or without ``preact`` (no ReLU follows it: the next stage
consumes it as it is). The final 1x1 conv to 1280 channels is part of ``pool``.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import MODELS, FeatureNet, Stage, check_num_classes
from .resnet_cifar import CIFAR_SHAPE, global_avg_pool, image_shape, init_weights

__all__ = ["MobileNetV2", "InvertedResidual"]

#: (expansion, channels, blocks, first stride); ``None`` stands for the expansion option.
_SETTINGS: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
    (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1),
)
#: Which groups form each stage.
_STAGE_GROUPS = ((0, 1), (2,), (3, 4), (5, 6))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(FeatureNet):
    """MobileNetV2 with expansion ``expansion`` and width multiplier ``width``."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], expansion: int = 6,
                 width: float = 0.5) -> None:
        super().__init__(num_classes, input_shape)
        if expansion < 1:
            raise ValueError(f"expansion must be >= 1, got {expansion}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        c = int(32 * width)
        if c < 1 or int(16 * width) < 1:
            raise ValueError(f"width {width} leaves layers without channels")
        self.stem_layers = nn.Sequential(nn.Conv2d(input_shape[0], c, 3, stride=2, padding=1,
                                                   bias=False),
                                         nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        groups: list[list[nn.Module]] = []
        for t, ch, n, s in _SETTINGS:
            out = int(ch * width)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(c, out, s if i == 0 else 1,
                                               expansion if t is None else t))
                c = out
            groups.append(blocks)
        self.stages = nn.ModuleList(
            Stage(nn.Sequential(*[b for g in idx for b in groups[g]]), act=False)
            for idx in _STAGE_GROUPS)
        self.stage_dims = [int(_SETTINGS[idx[-1]][1] * width) for idx in _STAGE_GROUPS]
        last = int(1280 * width) if width > 1.0 else 1280
        self.last_conv = nn.Sequential(nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last),
                                       nn.ReLU(inplace=True))
        self.head = nn.Linear(last, num_classes)
        init_weights(self, linear_std=0.01)

    def stem(self, x: Tensor) -> Tensor:
        return self.stem_layers(x)

    def pool(self, h: Tensor) -> Tensor:
        return global_avg_pool(self.last_conv(h))


@MODELS.register("mobilenetv2")
def mobilenetv2(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE,
                width: float = 0.5, expansion: int = 6) -> MobileNetV2:
    """MobileNetV2 as RepDistiller's ``mobile_half`` by default (width 0.5, expansion 6):
    812,836 parameters at 100 classes."""
    return MobileNetV2(check_num_classes(num_classes), image_shape("mobilenetv2", input_shape),
                       int(expansion), float(width))
