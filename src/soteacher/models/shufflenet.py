"""ShuffleNet V1 and V2 for CIFAR as in the RepDistiller / CRD benchmark: ``shufflev1``,
``shufflev2``.

Both start with a 1x1 conv (3 -> 24) + BN + ReLU at full resolution and have three groups, each
halving the resolution in its first block, then global average pooling and a linear head.

* V1 (Zhang et al., 2018), 3 groups of convolution, output channels (240, 480, 960) with
  (4, 8, 4) bottlenecks. Bottleneck: grouped 1x1 (groups 1 when the input has 24 channels) to
  ``out / 4`` -> BN -> ReLU -> channel shuffle -> depthwise 3x3 -> BN -> ReLU -> grouped 1x1 -> BN;
  added to the input, or for stride 2 concatenated with a 3x3 average pool of it (the conv then
  produces ``out - in`` channels); then ReLU.
* V2 (Ma et al., 2018), size 1: output channels (116, 232, 464) with (3, 7, 3) basic blocks after a
  down-sampling block, then a 1x1 conv to 1024 channels with BN and ReLU (part of ``pool``). Basic
  block: split the channels in halves, keep the first, send the second through
  1x1 -> BN -> ReLU -> depthwise 3x3 -> BN -> 1x1 -> BN -> ReLU, concatenate, shuffle (2 groups).
  Down-sampling block: both branches see the whole input (left: depthwise 3x3 s2 -> BN -> 1x1 -> BN
  -> ReLU; right: 1x1 -> BN -> ReLU -> depthwise 3x3 s2 -> BN -> 1x1 -> BN -> ReLU), concatenate,
  shuffle.

Feature contract (RepDistiller's ``ShuffleV1`` / ``ShuffleV2``, tested position by position):
``stem`` is the 1x1 conv stem's output; the three groups are the stages, each ending right before
the final ReLU of its last block. For V2 that block's pass-through half is already non-negative,
so applying the ReLU to the whole concatenation is the same computation; the stage's channel
shuffle follows the ReLU, so the post-activation feature is taken after the shuffle and the
pre-activation one before it, both in the reference's channel order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import MODELS, FeatureNet, Stage, check_num_classes
from .resnet_cifar import CIFAR_SHAPE, global_avg_pool, image_shape, init_weights

__all__ = ["ShuffleNetV1", "ShuffleNetV2", "channel_shuffle"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """(B, g * k, H, W) -> channels reordered as k x g instead of g x k."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _stem(c_in: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, 24, 1, bias=False), nn.BatchNorm2d(24),
                         nn.ReLU(inplace=True))


# ---- V1 ------------------------------------------------------------------------------------------
class V1Bottleneck(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int,
                 final_relu: bool = True) -> None:
        super().__init__()
        mid = c_out // 4
        g1 = 1 if c_in == 24 else groups
        self.g1, self.stride, self.final_relu = g1, stride, final_relu
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x)), inplace=True), self.g1)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(out) if self.final_relu else out


class ShuffleNetV1(FeatureNet):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...],
                 widths: tuple[int, ...] = (240, 480, 960), blocks: tuple[int, ...] = (4, 8, 4),
                 groups: int = 3) -> None:
        super().__init__(num_classes, input_shape)
        self.stem_layers = _stem(input_shape[0])
        c, stages = 24, []
        for w, n in zip(widths, blocks):
            layers = []
            for i in range(n):
                # The first block concatenates its pooled input: its convs make the rest.
                layers.append(V1Bottleneck(c, w - c if i == 0 else w, stride=2 if i == 0 else 1,
                                           groups=groups, final_relu=i < n - 1))
                c = w
            stages.append(Stage(nn.Sequential(*layers)))
        self.stages = nn.ModuleList(stages)
        self.stage_dims = list(widths)
        self.head = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def stem(self, x: Tensor) -> Tensor:
        return self.stem_layers(x)

    def pool(self, h: Tensor) -> Tensor:
        return global_avg_pool(h)


# ---- V2 ------------------------------------------------------------------------------------------
def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out)]


class V2Block(nn.Module):
    """Basic block (half the channels pass through); no final ReLU when ``final_relu`` is False."""

    def __init__(self, channels: int, final_relu: bool = True) -> None:
        super().__init__()
        self.keep = channels // 2
        c = channels - self.keep
        self.final_relu = final_relu
        self.branch = nn.Sequential(*_conv_bn(c, c, 1), nn.ReLU(inplace=True),
                                    *_conv_bn(c, c, 3, groups=c), *_conv_bn(c, c, 1))

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x[:, self.keep:])
        if not self.final_relu:
            # The last block of a stage: the stage's ReLU (which leaves the kept, already
            # non-negative half unchanged) and then its ChannelShuffle follow.
            return torch.cat([x[:, :self.keep], out], 1)
        out = F.relu(out, inplace=True)
        return channel_shuffle(torch.cat([x[:, :self.keep], out], 1), 2)


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(x, self.groups)


class V2Down(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_out // 2
        self.left = nn.Sequential(*_conv_bn(c_in, c_in, 3, stride=2, groups=c_in),
                                  *_conv_bn(c_in, mid, 1), nn.ReLU(inplace=True))
        self.right = nn.Sequential(*_conv_bn(c_in, mid, 1), nn.ReLU(inplace=True),
                                   *_conv_bn(mid, mid, 3, stride=2, groups=mid),
                                   *_conv_bn(mid, mid, 1), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(FeatureNet):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...],
                 widths: tuple[int, ...] = (116, 232, 464), blocks: tuple[int, ...] = (3, 7, 3),
                 last: int = 1024) -> None:
        super().__init__(num_classes, input_shape)
        self.stem_layers = _stem(input_shape[0])
        c, stages = 24, []
        for w, n in zip(widths, blocks):
            layers: list[nn.Module] = [V2Down(c, w)]
            layers += [V2Block(w, final_relu=i < n - 1) for i in range(n)]
            stages.append(Stage(nn.Sequential(*layers), post=ChannelShuffle(2)))
            c = w
        self.stages = nn.ModuleList(stages)
        self.stage_dims = list(widths)
        self.last_conv = nn.Sequential(*_conv_bn(c, last, 1), nn.ReLU(inplace=True))
        self.head = nn.Linear(last, num_classes)
        init_weights(self)

    def stem(self, x: Tensor) -> Tensor:
        return self.stem_layers(x)

    def pool(self, h: Tensor) -> Tensor:
        return global_avg_pool(self.last_conv(h))

    def forward_features(self, x: Tensor, preact: bool = False) -> tuple[Tensor, dict[str, Any]]:
        # A stage's post-activation feature is taken after its channel shuffle, the
        # pre-activation one before it (both as RepDistiller reports them).
        h = stem = self.stem(x)
        feats: list[Tensor] = []
        for stage in self.stages:
            pre = stage.body(h)
            h = stage.post(stage.act(pre))
            feats.append(pre if preact else h)
        pooled = self.pool(h)
        return self.head(pooled), {"stem": stem, "stages": feats, "pooled": pooled}


@MODELS.register("shufflev1")
def shufflev1(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> ShuffleNetV1:
    """ShuffleNet V1, 3 groups, widths (240, 480, 960): 949,258 parameters at 100 classes."""
    return ShuffleNetV1(check_num_classes(num_classes), image_shape("shufflev1", input_shape))


@MODELS.register("shufflev2")
def shufflev2(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> ShuffleNetV2:
    """ShuffleNet V2 size 1, widths (116, 232, 464) + 1024: 1,355,528 parameters at 100 classes."""
    return ShuffleNetV2(check_num_classes(num_classes), image_shape("shufflev2", input_shape))
