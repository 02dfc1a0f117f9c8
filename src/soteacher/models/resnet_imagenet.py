"""ImageNet-style ResNets (He et al., 2016): ``resnet18``, ``resnet34`` (basic blocks) and
``resnet50`` (bottlenecks, stride on the 3x3 conv as in torchvision's "v1.5").

Layout: 7x7 stride-2 conv (64) + BN + ReLU + 3x3 stride-2 max-pool, four groups with 64, 128, 256,
512 base channels (bottlenecks output 4x that; groups 2-4 start with stride 2; projection shortcut
1x1 conv + BN where the shape changes), global average pooling, linear head. Built for 224x224
inputs but any size works (64x64 Tiny-ImageNet images reach the last group at 2x2). Parameter
counts at 1000 classes: resnet18 11,689,512, resnet34 21,797,672, resnet50 25,557,032.

``resnet50_cifar`` is the same network with a 3x3 stride-1 conv (64) + BN + ReLU stem and no
max-pool, for 32x32 inputs: RepDistiller's ``ResNet50`` (a CIFAR-100 teacher of its benchmark),
23,705,252 parameters at 100 classes.

Feature contract: the stem's output (after its ReLU, before the max-pool) is ``stem``; the four
groups are the stages; each group's last block stops after the residual sum, whose ReLU is the
stage's final ReLU. For ``resnet50_cifar``, ``[stem, *stages, pooled]`` is position by position
RepDistiller's feature list.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import MODELS, FeatureNet, Stage, check_num_classes
from .resnet_cifar import BasicBlock, global_avg_pool, image_shape, init_weights

__all__ = ["ImageNetResNet", "Bottleneck"]

IMAGENET_SHAPE = (3, 224, 224)


class Bottleneck(nn.Module):
    """1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1 (x4) -> BN, plus shortcut, ReLU."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, final_relu: bool = True) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(c_in, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU(inplace=True)
        self.final_relu = final_relu

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x) + self.shortcut(x)
        return self.relu(out) if self.final_relu else out


class ImageNetResNet(FeatureNet):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], layers: tuple[int, ...],
                 bottleneck: bool, cifar_stem: bool = False) -> None:
        super().__init__(num_classes, input_shape)
        if cifar_stem:
            self.stem_layers = nn.Sequential(
                nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(64), nn.ReLU(inplace=True))
            self.stem_pool: nn.Module = nn.Identity()
        else:
            self.stem_layers = nn.Sequential(
                nn.Conv2d(input_shape[0], 64, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(64), nn.ReLU(inplace=True))
            self.stem_pool = nn.MaxPool2d(3, stride=2, padding=1)
        expansion = Bottleneck.expansion if bottleneck else 1
        c, stages = 64, []
        for g, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks: list[nn.Module] = []
            for i in range(n):
                stride = 2 if (g > 0 and i == 0) else 1
                if bottleneck:
                    blocks.append(Bottleneck(c, planes, stride, final_relu=i < n - 1))
                else:
                    blocks.append(BasicBlock(c, planes, stride, final_relu=i < n - 1))
                c = planes * expansion
            stages.append(Stage(nn.Sequential(*blocks)))
        self.stages = nn.ModuleList(stages)
        self.stage_dims = [p * expansion for p in (64, 128, 256, 512)]
        self.head = nn.Linear(c, num_classes)
        init_weights(self)

    def stem(self, x: Tensor) -> Tensor:
        return self.stem_layers(x)

    def pool(self, h: Tensor) -> Tensor:
        return global_avg_pool(h)

    def after_stem(self, h: Tensor) -> Tensor:
        return self.stem_pool(h)


def _resnet(name: str, num_classes: int, input_shape: tuple[int, ...], layers: tuple[int, ...],
            bottleneck: bool, cifar_stem: bool = False) -> ImageNetResNet:
    return ImageNetResNet(check_num_classes(num_classes), image_shape(name, input_shape), layers,
                          bottleneck, cifar_stem)


@MODELS.register("resnet18")
def resnet18(num_classes: int, input_shape: tuple[int, ...] = IMAGENET_SHAPE) -> ImageNetResNet:
    """ImageNet ResNet-18 (basic blocks 2-2-2-2)."""
    return _resnet("resnet18", num_classes, input_shape, (2, 2, 2, 2), False)


@MODELS.register("resnet34")
def resnet34(num_classes: int, input_shape: tuple[int, ...] = IMAGENET_SHAPE) -> ImageNetResNet:
    """ImageNet ResNet-34 (basic blocks 3-4-6-3)."""
    return _resnet("resnet34", num_classes, input_shape, (3, 4, 6, 3), False)


@MODELS.register("resnet50")
def resnet50(num_classes: int, input_shape: tuple[int, ...] = IMAGENET_SHAPE) -> ImageNetResNet:
    """ImageNet ResNet-50 (bottlenecks 3-4-6-3)."""
    return _resnet("resnet50", num_classes, input_shape, (3, 4, 6, 3), True)


@MODELS.register("resnet50_cifar")
def resnet50_cifar(num_classes: int,
                   input_shape: tuple[int, ...] = (3, 32, 32)) -> ImageNetResNet:
    """ResNet-50 (bottlenecks 3-4-6-3) with a 3x3 stride-1 stem and no max-pool, for 32x32
    images (RepDistiller's ``ResNet50``): 23,705,252 parameters at 100 classes."""
    return _resnet("resnet50_cifar", num_classes, input_shape, (3, 4, 6, 3), True, cifar_stem=True)
