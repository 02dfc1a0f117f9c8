"""CIFAR ResNets of the RepDistiller / CRD benchmark (Tian et al., 2020): ``resnet8``,
``resnet14``, ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``, ``resnet110``, ``resnet8x4``
and ``resnet32x4``.

Layout (He et al., 2016, CIFAR variant): a 3x3 conv stem (``widths[0]`` channels) with BN and
ReLU, then three groups of ``n = (depth - 2) / 6`` basic blocks with ``widths[1:]`` channels, the
second and third starting with stride 2; global average pooling; a linear head. A block whose
input and output differ in shape gets a 1x1 conv + BN projection shortcut. The plain models use
widths (16, 16, 32, 64); the ``x4`` models (32, 64, 128, 256).

Feature contract: the three groups are the stages. Each group's last block stops right after the
residual sum, so its ReLU is the stage's final ReLU (RepDistiller's ``preact`` features).

This module also holds the small helpers shared by the other image models of the zoo.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from . import MODELS, FeatureNet, Stage, as_shape, check_num_classes

__all__ = ["CifarResNet", "BasicBlock", "image_shape", "init_weights", "global_avg_pool"]

CIFAR_SHAPE = (3, 32, 32)


# ---- helpers shared by the image models ----------------------------------------------------------
def image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Check ``input_shape`` is ``(C, H, W)``; any channel count and size is accepted."""
    shape = as_shape(input_shape)
    if len(shape) != 3:
        raise ValueError(f"model {name!r} needs image inputs (C, H, W), got input_shape {shape}; "
                         f"use 'mlp' or 'cnn1d' for other inputs")
    return shape


def init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """He (fan-out) normal init for convs, BN to identity; linear layers keep PyTorch's default
    init unless ``linear_std`` is given (then N(0, linear_std^2) weights and zero bias)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def global_avg_pool(h: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C)."""
    return h.mean(dim=(2, 3))


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


# ---- the CIFAR ResNet ----------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU unless ``final_relu`` is False."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, final_relu: bool = True) -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        self.final_relu = final_relu

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out = out + self.shortcut(x)
        return self.relu(out) if self.final_relu else out


class CifarResNet(FeatureNet):
    """ResNet of depth ``6n + 2`` for small images; see the module docstring."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], depth: int,
                 widths: Sequence[int]) -> None:
        super().__init__(num_classes, input_shape)
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths must have 4 entries (stem + 3 groups), got {widths}")
        n = (depth - 2) // 6
        self.stem_layers = nn.Sequential(conv3x3(input_shape[0], widths[0]),
                                         nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        c_in, stages = widths[0], []
        for g, w in enumerate(widths[1:]):
            blocks = [BasicBlock(c_in if i == 0 else w, w, stride=2 if (g > 0 and i == 0) else 1,
                                 final_relu=i < n - 1) for i in range(n)]
            stages.append(Stage(nn.Sequential(*blocks)))
            c_in = w
        self.stages = nn.ModuleList(stages)
        self.stage_dims = list(widths[1:])
        self.head = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def stem(self, x: Tensor) -> Tensor:
        return self.stem_layers(x)

    def pool(self, h: Tensor) -> Tensor:
        return global_avg_pool(h)


def _resnet(name: str, num_classes: int, input_shape: Sequence[int], depth: int,
            widths: Sequence[int]) -> CifarResNet:
    return CifarResNet(check_num_classes(num_classes), image_shape(name, input_shape), depth,
                       tuple(widths))


_PLAIN, _X4 = (16, 16, 32, 64), (32, 64, 128, 256)


@MODELS.register("resnet8")
def resnet8(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> CifarResNet:
    """CIFAR ResNet-8, widths (16, 16, 32, 64): 83,892 parameters at 100 classes."""
    return _resnet("resnet8", num_classes, input_shape, 8, _PLAIN)


@MODELS.register("resnet14")
def resnet14(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> CifarResNet:
    """CIFAR ResNet-14, widths (16, 16, 32, 64)."""
    return _resnet("resnet14", num_classes, input_shape, 14, _PLAIN)


@MODELS.register("resnet20")
def resnet20(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> CifarResNet:
    """CIFAR ResNet-20, widths (16, 16, 32, 64): 278,324 parameters at 100 classes."""
    return _resnet("resnet20", num_classes, input_shape, 20, _PLAIN)


@MODELS.register("resnet32")
def resnet32(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> CifarResNet:
    """CIFAR ResNet-32, widths (16, 16, 32, 64)."""
    return _resnet("resnet32", num_classes, input_shape, 32, _PLAIN)


@MODELS.register("resnet44")
def resnet44(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> CifarResNet:
    """CIFAR ResNet-44, widths (16, 16, 32, 64)."""
    return _resnet("resnet44", num_classes, input_shape, 44, _PLAIN)


@MODELS.register("resnet56")
def resnet56(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> CifarResNet:
    """CIFAR ResNet-56, widths (16, 16, 32, 64): 861,620 parameters at 100 classes."""
    return _resnet("resnet56", num_classes, input_shape, 56, _PLAIN)


@MODELS.register("resnet110")
def resnet110(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> CifarResNet:
    """CIFAR ResNet-110, widths (16, 16, 32, 64): 1,736,564 parameters at 100 classes."""
    return _resnet("resnet110", num_classes, input_shape, 110, _PLAIN)


@MODELS.register("resnet8x4")
def resnet8x4(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> CifarResNet:
    """CIFAR ResNet-8 with 4x widths (32, 64, 128, 256): 1,233,540 parameters at 100 classes."""
    return _resnet("resnet8x4", num_classes, input_shape, 8, _X4)


@MODELS.register("resnet32x4")
def resnet32x4(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> CifarResNet:
    """CIFAR ResNet-32 with 4x widths (32, 64, 128, 256): 7,433,860 parameters at 100 classes."""
    return _resnet("resnet32x4", num_classes, input_shape, 32, _X4)
