"""The CIFAR / ImageNet model zoo: parameter counts of the RepDistiller / CRD benchmark models and
the feature contract on 32x32 images (generic contract checks live in test_models.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import soteacher
from soteacher.models import create_model
from soteacher.models.shufflenet import channel_shuffle


pytestmark = pytest.mark.usefixtures("one_thread")


# Parameter counts at 100 classes, as published for the RepDistiller / CRD CIFAR-100 zoo.
CIFAR100_PARAMS = {
    "resnet8": 83_892, "resnet20": 278_324, "resnet56": 861_620, "resnet110": 1_736_564,
    "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg13": 9_462_180,
    "mobilenetv2": 812_836, "shufflev1": 949_258, "shufflev2": 1_355_528,
    "resnet50_cifar": 23_705_252,
}
# torchvision's ImageNet counts at 1000 classes.
IMAGENET1000_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}

# (C, H, W) of each stage output and the pooled width for a 3x32x32 input.
STAGES_32 = {
    **{f"resnet{d}": [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": [(64, 32, 32), (128, 16, 16), (256, 8, 8)],
    "resnet32x4": [(64, 32, 32), (128, 16, 16), (256, 8, 8)],
    "wrn_16_1": [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
    "wrn_40_1": [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
    "wrn_16_2": [(32, 32, 32), (64, 16, 16), (128, 8, 8)],
    "wrn_40_2": [(32, 32, 32), (64, 16, 16), (128, 8, 8)],
    **{f"vgg{d}": [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]
       for d in (8, 11, 13, 16, 19)},
    "mobilenetv2": [(12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)],
    "shufflev1": [(240, 16, 16), (480, 8, 8), (960, 4, 4)],
    "shufflev2": [(116, 16, 16), (232, 8, 8), (464, 4, 4)],
    "resnet18": [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)],
    "resnet34": [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)],
    "resnet50": [(256, 8, 8), (512, 4, 4), (1024, 2, 2), (2048, 1, 1)],
    "resnet50_cifar": [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
}
POOLED = {"mobilenetv2": 1280, "shufflev2": 1024}
ZOO = sorted(STAGES_32)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_zoo_is_registered():
    assert set(ZOO) <= set(soteacher.list_models())
    assert set(CIFAR100_PARAMS) | set(IMAGENET1000_PARAMS) <= set(ZOO)


@pytest.mark.parametrize("name", sorted(CIFAR100_PARAMS))
def test_cifar100_parameter_counts(name):
    assert _count(create_model(name, 100)) == CIFAR100_PARAMS[name]


@pytest.mark.parametrize("name", sorted(IMAGENET1000_PARAMS))
def test_imagenet_parameter_counts(name):
    assert _count(create_model(name, 1000)) == IMAGENET1000_PARAMS[name]


@pytest.mark.parametrize("name", ZOO)
def test_features_on_cifar_images(name):
    torch.manual_seed(0)
    model = create_model(name, 100, (3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        logits_post, post = model.forward_features(x)
        logits_pre, pre = model.forward_features(x, preact=True)
    assert logits.shape == (2, 100)
    torch.testing.assert_close(logits_post, logits)
    torch.testing.assert_close(logits_pre, logits)
    shapes = [tuple(f.shape[1:]) for f in post["stages"]]
    assert shapes == STAGES_32[name]
    assert [tuple(f.shape[1:]) for f in pre["stages"]] == shapes
    assert model.stage_dims == [s[0] for s in shapes]
    feature_dim = POOLED.get(name, shapes[-1][0])
    assert post["pooled"].shape == (2, feature_dim) and model.feature_dim == feature_dim
    torch.testing.assert_close(model.head(post["pooled"]), logits)
    assert_preact_relation(model, pre["stages"], post["stages"])
    assert model.input_shape == (3, 32, 32)


def assert_preact_relation(model: nn.Module, pre: list, post: list) -> None:
    """How each family's pre-activation features relate to its post-activation ones (eval mode):
    ReLU for most; WRN's are the next BN of its raw outputs; MobileNetV2's linear outputs are
    reported as they are; ShuffleNetV2 shuffles its channels after the ReLU."""
    name = type(model).__name__
    for i, (a, b) in enumerate(zip(pre, post)):
        if name == "WideResNet":
            torch.testing.assert_close(a, model.next_bns()[i](b))
            assert (b < 0).any()              # raw residual sums, not activated
        elif name == "MobileNetV2":
            torch.testing.assert_close(a, b)
        elif name == "ShuffleNetV2":
            torch.testing.assert_close(channel_shuffle(F.relu(a), 2), b)
        else:
            torch.testing.assert_close(F.relu(a), b)


def test_default_input_shapes():
    model = soteacher.create_model("resnet8x4", num_classes=100)
    assert model.input_shape == (3, 32, 32)
    assert create_model("resnet18", 10).input_shape == (3, 224, 224)
    with pytest.raises(ValueError, match="input_shape"):
        create_model("mlp", 3)


def test_image_models_reject_other_ranks():
    for name in ("resnet8", "wrn_16_1", "vgg8", "mobilenetv2", "shufflev1", "resnet18"):
        with pytest.raises(ValueError, match=r"\(C, H, W\)"):
            create_model(name, 10, (1, 32))


def test_tiny_imagenet_sizes():
    # 64x64 inputs: the ImageNet ResNet reaches its last stage at 2x2, and VGG pools once more
    # before its last block (as RepDistiller does for 64x64 inputs).
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, feats = create_model("resnet18", 200, (3, 64, 64)).eval().forward_features(x)
        assert tuple(feats["stages"][-1].shape) == (2, 512, 2, 2)
        _, feats = create_model("vgg8", 200, (3, 64, 64)).eval().forward_features(x)
        assert [tuple(f.shape[2:]) for f in feats["stages"]] == [(32, 32), (16, 16), (8, 8),
                                                                (4, 4)]


def test_mobilenetv2_preact_features_are_the_linear_bottlenecks():
    # Stage outputs are linear; the next stage consumes them unchanged.
    torch.manual_seed(0)
    model = create_model("mobilenetv2", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, pre = model.forward_features(x, preact=True)
        h = model.stem(x)
        for stage, f in zip(model.stages, pre["stages"]):
            h = stage(h)
            torch.testing.assert_close(h, f)
        torch.testing.assert_close(model.head(model.pool(h)), logits)
    assert any((f < 0).any() for f in pre["stages"])


def test_wrn_dropout_option():
    model = create_model("wrn_16_2", 10, dropout=0.3)
    assert _count(model) == _count(create_model("wrn_16_2", 10))
    model.train()
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    b, _ = model.forward_features(x)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        create_model("wrn_16_2", 10, dropout=1.0)


def test_mobilenetv2_width_option():
    model = create_model("mobilenetv2", 100, width=1.0)
    assert model.stage_dims == [24, 32, 96, 320] and model.feature_dim == 1280
