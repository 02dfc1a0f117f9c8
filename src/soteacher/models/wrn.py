"""Wide ResNets (Zagoruyko & Komodakis, 2016) of the RepDistiller / CRD benchmark:
``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2`` (WRN-depth-widen).

Layout: a 3x3 conv stem with 16 channels (no BN, no ReLU), then three groups of
``n = (depth - 4) / 6`` pre-activation blocks with ``16k``, ``32k``, ``64k`` channels (``k`` the
widen factor; the second and third groups start with stride 2), a final BN + ReLU, global average
pooling and a linear head. A pre-activation block is BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3
plus a shortcut: the identity on the block's *raw* input when the channel count is unchanged,
otherwise a 1x1 conv on the *activated* input.

Feature contract (RepDistiller's WRN, tested position by position): ``stem`` is the stem conv's
output, each stage is one group and reports the group's *raw* output (a residual sum, which no
ReLU follows inside the group); ``pooled`` is the pooled ``ReLU(BN(.))`` of the last group. With
``preact=True`` a stage reports the BN that the next layer applies to it (the next group's first
block's ``bn1``, or the final BN), evaluated once more on the raw output. In training mode that
second evaluation updates that BN's running statistics a second time, exactly as the reference's
``preact`` features do.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from . import MODELS, FeatureNet, Stage, check_num_classes
from .resnet_cifar import CIFAR_SHAPE, conv3x3, global_avg_pool, image_shape, init_weights

__all__ = ["WideResNet", "PreActBlock"]


class PreActBlock(nn.Module):
    """Pre-activation basic block (BN-ReLU-conv-BN-ReLU-[dropout]-conv, plus shortcut)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.equal = c_in == c_out
        if self.equal and stride != 1:
            raise ValueError("a block with an identity shortcut cannot have a stride")
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(c_out, c_out)
        self.dropout = float(dropout)
        self.shortcut = (None if self.equal
                         else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        # Not in place: with an identity shortcut the raw x is still needed.
        a = F.relu(self.bn1(x))
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
            blocks = [PreActBlock(c_in if i == 0 else w, w, stride=2 if (g > 0 and i == 0) else 1,
                                  dropout=dropout) for i in range(n)]
            stages.append(Stage(nn.Sequential(*blocks), act=False))
            c_in = w
        self.stages = nn.ModuleList(stages)
        self.stage_dims = widths
        self.final_bn = nn.BatchNorm2d(widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)
        init_weights(self)
        nn.init.zeros_(self.head.bias)

    def stem(self, x: Tensor) -> Tensor:
        return self.stem_conv(x)

    def pool(self, h: Tensor) -> Tensor:
        return global_avg_pool(F.relu(self.final_bn(h)))

    def next_bns(self) -> list[nn.BatchNorm2d]:
        """The BN applied next to each stage's output (RepDistiller's ``get_bn_before_relu``)."""
        return [s.body[0].bn1 for s in list(self.stages)[1:]] + [self.final_bn]

    def forward_features(self, x: Tensor, preact: bool = False) -> tuple[Tensor, dict[str, Any]]:
        logits, feats = super().forward_features(x)
        if preact:
            feats["stages"] = [bn(f) for bn, f in zip(self.next_bns(), feats["stages"])]
        return logits, feats


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
