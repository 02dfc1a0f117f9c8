"""Wide ResNets (Zagoruyko & Komodakis, 2016) as in the RepDistiller / CRD benchmark:
``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2`` (WRN-depth-widen).

Layout: a 3x3 conv stem with 16 channels (no BN, no ReLU), then three groups of
``n = (depth - 4) / 6`` pre-activation blocks with ``16k``, ``32k``, ``64k`` channels (``k`` the
widen factor; the second and third groups start with stride 2), a final BN + ReLU, global average
pooling and a linear head. A pre-activation block is BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3
plus a shortcut: the identity on the block's *raw* input when the channel count is unchanged,
otherwise a 1x1 conv on the *activated* input.

Feature contract. In a pre-activation network the ReLU that ends a group is the first
BN-ReLU of the next group's first block (and, for the last group, the final BN-ReLU). So each
stage is one group followed by the next group's first BN; that first block of the next group
(whose channel count always changes, so its shortcut reads the activated input) then starts at
its first conv. The computation is exactly the usual WRN; parameter counts are unchanged. The
pre-activation features equal RepDistiller's ``preact=True`` features (``block2.layer[0].bn1(f1)``,
``block3.layer[0].bn1(f2)``, ``bn1(f3)``); the post-activation features are their ReLU (RepDistiller
reports the raw group outputs there instead, which are not followed by a ReLU).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import MODELS, FeatureNet, Stage, check_num_classes
from .resnet_cifar import CIFAR_SHAPE, conv3x3, global_avg_pool, image_shape, init_weights

__all__ = ["WideResNet", "PreActBlock"]


class PreActBlock(nn.Module):
    """Pre-activation basic block; with ``preactivate=False`` the input is taken as already
    activated (its BN-ReLU lives at the end of the previous stage)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float = 0.0,
                 preactivate: bool = True) -> None:
        super().__init__()
        self.equal = c_in == c_out and stride == 1
        if not preactivate and self.equal:
            raise ValueError("a block without its own pre-activation needs a projection shortcut")
        self.bn1 = nn.BatchNorm2d(c_in) if preactivate else None
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(c_out, c_out)
        self.dropout = float(dropout)
        self.shortcut = (None if self.equal
                         else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        # Not in place: with an identity shortcut the raw x is still needed.
        a = F.relu(self.bn1(x)) if self.bn1 is not None else x
        out = self.relu(self.bn2(self.conv1(a)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(FeatureNet):
    """WRN-``depth``-``widen``; see the module docstring."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], depth: int, widen: int,
                 dropout: float = 0.0) -> None:
        super().__init__(num_classes, input_shape)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
        if widen < 1:
            raise ValueError(f"widen factor must be >= 1, got {widen}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.stem_conv = conv3x3(input_shape[0], 16)
        c_in, stages = 16, []
        for g, w in enumerate(widths):
            blocks: list[nn.Module] = []
            for i in range(n):
                blocks.append(PreActBlock(c_in if i == 0 else w, w,
                                          stride=2 if (g > 0 and i == 0) else 1, dropout=dropout,
                                          preactivate=not (g > 0 and i == 0)))
            # The BN before the ReLU that ends this group: the next group's first pre-activation,
            # or the network's final BN.
            blocks.append(nn.BatchNorm2d(w))
            stages.append(Stage(nn.Sequential(*blocks)))
            c_in = w
        self.stages = nn.ModuleList(stages)
        self.stage_dims = widths
        self.head = nn.Linear(widths[-1], num_classes)
        init_weights(self)
        nn.init.zeros_(self.head.bias)

    def stem(self, x: Tensor) -> Tensor:
        return self.stem_conv(x)

    def pool(self, h: Tensor) -> Tensor:
        return global_avg_pool(h)


def _wrn(name: str, num_classes: int, input_shape: tuple[int, ...], depth: int, widen: int,
         dropout: float) -> WideResNet:
    return WideResNet(check_num_classes(num_classes), image_shape(name, input_shape), depth,
                      widen, float(dropout))


@MODELS.register("wrn_16_1")
def wrn_16_1(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE,
             dropout: float = 0.0) -> WideResNet:
    """WRN-16-1: 180,916 parameters at 100 classes."""
    return _wrn("wrn_16_1", num_classes, input_shape, 16, 1, dropout)


@MODELS.register("wrn_16_2")
def wrn_16_2(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE,
             dropout: float = 0.0) -> WideResNet:
    """WRN-16-2: 703,284 parameters at 100 classes."""
    return _wrn("wrn_16_2", num_classes, input_shape, 16, 2, dropout)


@MODELS.register("wrn_40_1")
def wrn_40_1(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE,
             dropout: float = 0.0) -> WideResNet:
    """WRN-40-1: 569,780 parameters at 100 classes."""
    return _wrn("wrn_40_1", num_classes, input_shape, 40, 1, dropout)


@MODELS.register("wrn_40_2")
def wrn_40_2(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE,
             dropout: float = 0.0) -> WideResNet:
    """WRN-40-2: 2,255,156 parameters at 100 classes."""
    return _wrn("wrn_40_2", num_classes, input_shape, 40, 2, dropout)
