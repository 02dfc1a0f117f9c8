"""VGG with batch norm for small images, as in the RepDistiller / CRD benchmark: ``vgg8``,
``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``.

Five blocks of 3x3 conv (with bias) -> BN -> ReLU; blocks 0-3 are followed by 2x2 max-pooling,
except that the pool between blocks 3 and 4 is only used for inputs of at least 64x64 (RepDistiller
applies it to 64x64 inputs only, so a 32x32 input reaches block 4 at 4x4). Global average pooling
feeds a single ``512 -> num_classes`` linear layer (no fully connected hidden layers).

Feature contract: block 0 and its ReLU are the stem; blocks 1-4 (each preceded by the max-pool
that follows the previous block) are the four stages, ending at their last BN, whose ReLU is the
stage's final ReLU (RepDistiller's ``f1``-``f4`` / ``f1_pre``-``f4_pre``).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from . import MODELS, FeatureNet, Stage, check_num_classes
from .resnet_cifar import CIFAR_SHAPE, global_avg_pool, image_shape, init_weights

__all__ = ["VGG", "VGG_CONFIGS"]

#: Channels of the convs of each of the five blocks.
VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512),
              (512, 512, 512, 512)),
}


def _block(c_in: int, widths: Sequence[int]) -> list[nn.Module]:
    """conv-BN-ReLU for each width, without the last ReLU."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c_in = w
    return layers[:-1]


class VGG(FeatureNet):
    """VGG-BN from a five-block config; see the module docstring."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...],
                 config: Sequence[Sequence[int]]) -> None:
        super().__init__(num_classes, input_shape)
        if len(config) != 5 or not all(config):
            raise ValueError(f"a VGG config needs 5 non-empty blocks, got {config}")
        self.stem_layers = nn.Sequential(*_block(input_shape[0], config[0]), nn.ReLU(inplace=True))
        pool_before_last = min(input_shape[1:]) >= 64
        stages = []
        for i in range(1, 5):
            layers: list[nn.Module] = []
            if i < 4 or pool_before_last:
                layers.append(nn.MaxPool2d(2, 2))
            layers += _block(config[i - 1][-1], config[i])
            stages.append(Stage(nn.Sequential(*layers)))
        self.stages = nn.ModuleList(stages)
        self.stage_dims = [c[-1] for c in config[1:]]
        self.head = nn.Linear(config[4][-1], num_classes)
        init_weights(self, linear_std=0.01)

    def stem(self, x: Tensor) -> Tensor:
        return self.stem_layers(x)

    def pool(self, h: Tensor) -> Tensor:
        return global_avg_pool(h)


def _vgg(name: str, num_classes: int, input_shape: tuple[int, ...]) -> VGG:
    return VGG(check_num_classes(num_classes), image_shape(name, input_shape), VGG_CONFIGS[name])


@MODELS.register("vgg8")
def vgg8(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> VGG:
    """VGG-8 with BN (one conv per block): 3,965,028 parameters at 100 classes."""
    return _vgg("vgg8", num_classes, input_shape)


@MODELS.register("vgg11")
def vgg11(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> VGG:
    """VGG-11 with BN (config A)."""
    return _vgg("vgg11", num_classes, input_shape)


@MODELS.register("vgg13")
def vgg13(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> VGG:
    """VGG-13 with BN (config B): 9,462,180 parameters at 100 classes."""
    return _vgg("vgg13", num_classes, input_shape)


@MODELS.register("vgg16")
def vgg16(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> VGG:
    """VGG-16 with BN (config D)."""
    return _vgg("vgg16", num_classes, input_shape)


@MODELS.register("vgg19")
def vgg19(num_classes: int, input_shape: tuple[int, ...] = CIFAR_SHAPE) -> VGG:
    """VGG-19 with BN (config E)."""
    return _vgg("vgg19", num_classes, input_shape)
