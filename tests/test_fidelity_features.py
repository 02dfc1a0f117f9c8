"""Feature positions and auxiliary-module sizes equal to RepDistiller's, pair by pair.

Every constant below was obtained by instantiating RepDistiller's own models and modules (its
``model_dict`` models with ``is_feat=True``, ``ConvReg``, ``Connector`` and CRD's ``Embed``) at 100
classes on a 3x32x32 input, outside this project; the tests build ours and compare.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from soteacher.distillers import build_distiller
from soteacher.distillers.common import hint_list
from soteacher.models import create_model


pytestmark = pytest.mark.usefixtures("one_thread")


#: RepDistiller's ``feat`` list (per-sample shapes) of each model: [f0 (stem), ..., pooled].
REFERENCE_FEATURES = {
    "resnet56": [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)],
    "resnet20": [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)],
    "resnet110": [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)],
    "resnet32": [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)],
    "resnet32x4": [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)],
    "resnet8x4": [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)],
    "wrn_40_2": [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)],
    "wrn_16_2": [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)],
    "wrn_40_1": [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)],
    "vgg13": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512,)],
    "vgg8": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512,)],
    "mobilenetv2": [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2), (1280,)],
    "shufflev1": [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4), (960,)],
    "shufflev2": [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4), (1024,)],
    "resnet50_cifar": [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4), (2048,)],
}

#: Parameter counts of the auxiliary modules the reference builds for each pair:
#: FitNet's ConvReg at hint_layer 2, AB's connectors (on the preact feat[1:-1]; 0 = identity),
#: CRD's student and teacher embeddings (feat_dim 128).
REFERENCE_MODULES = {
    "resnet56->resnet20": {"fitnet": 1120, "ab": [0, 0, 0], "crd": (8320, 8320)},
    "resnet110->resnet32": {"fitnet": 1120, "ab": [0, 0, 0], "crd": (8320, 8320)},
    "resnet32x4->resnet8x4": {"fitnet": 16768, "ab": [0, 0, 0], "crd": (32896, 32896)},
    "wrn_40_2->wrn_16_2": {"fitnet": 4288, "ab": [0, 0, 0], "crd": (16512, 16512)},
    "wrn_40_2->wrn_40_1": {"fitnet": 2240, "ab": [608, 2240, 8576], "crd": (8320, 16512)},
    "vgg13->vgg8": {"fitnet": 66304, "ab": [0, 0, 0, 0], "crd": (65664, 65664)},
    "vgg13->mobilenetv2": {"fitnet": 4864, "ab": [1920, 4864, 26112, 1312256], "crd": (163968, 65664)},
    "resnet32x4->shufflev1": {"fitnet": 983424, "ab": [245952, 983424, 3932928], "crd": (123008, 32896)},
    "resnet32x4->shufflev2": {"fitnet": 475520, "ab": [118976, 475520, 1901312], "crd": (131200, 32896)},
    "wrn_40_2->shufflev1": {"fitnet": 491712, "ab": [122976, 491712, 1966464], "crd": (123008, 16512)},
    "resnet50_cifar->mobilenetv2": {"fitnet": 132608, "ab": [49920, 132608, 789504, 5249024], "crd": (163968, 262272)},
}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _feature_list(model: nn.Module) -> list[tuple[int, ...]]:
    model.eval()
    with torch.no_grad():
        _, f = model.forward_features(torch.zeros(2, 3, 32, 32))
    return [tuple(t.shape[1:]) for t in [f["stem"], *f["stages"], f["pooled"]]]


@pytest.mark.parametrize("name", sorted(REFERENCE_FEATURES))
def test_feature_list_equals_reference(name):
    assert _feature_list(create_model(name, 100)) == REFERENCE_FEATURES[name]


def _pair(key: str) -> tuple[nn.Module, nn.Module]:
    t, s = key.split("->")
    torch.manual_seed(0)
    return create_model(t, 100), create_model(s, 100)


@pytest.mark.parametrize("key", sorted(REFERENCE_MODULES))
def test_fitnet_hint_and_regressor_equal_reference(key):
    teacher, student = _pair(key)
    d = build_distiller("fitnet", teacher, student=student)
    t, s = key.split("->")
    assert d.hint_layer == 2
    assert d.t_shapes.hint_list[2] == REFERENCE_FEATURES[t][2]
    assert d.s_shapes.hint_list[2] == REFERENCE_FEATURES[s][2]
    assert _count(d.regressor) == REFERENCE_MODULES[key]["fitnet"]
    # The regressor brings the student hint to the teacher hint's shape, with no pooling.
    x = torch.randn(2, 3, 32, 32)
    _, sf = student.eval().forward_features(x)
    assert tuple(d.regressor.eval()(hint_list(sf)[2]).shape[1:]) == REFERENCE_FEATURES[t][2]


@pytest.mark.parametrize("key", sorted(REFERENCE_MODULES))
def test_ab_connectors_equal_reference(key):
    teacher, student = _pair(key)
    d = build_distiller("ab", teacher, student=student)
    assert [_count(c) for c in d.connectors] == REFERENCE_MODULES[key]["ab"]
    for c, n in zip(d.connectors, REFERENCE_MODULES[key]["ab"]):
        assert isinstance(c, nn.Identity) == (n == 0)
        if n:
            assert not any(isinstance(m, nn.ReLU) for m in c.modules())   # no ReLU in AB's


@pytest.mark.parametrize("key", sorted(REFERENCE_MODULES))
def test_crd_embeddings_equal_reference(key):
    teacher, student = _pair(key)
    d = build_distiller("crd", teacher, {"nce_k": 16}, student=student, num_samples=64)
    assert (_count(d.embed_s), _count(d.embed_t)) == REFERENCE_MODULES[key]["crd"]


@pytest.mark.parametrize("key", sorted(REFERENCE_MODULES))
@pytest.mark.parametrize("method", ["at", "nst", "vid", "sp"])
def test_stage_methods_read_reference_positions(key, method):
    """AT, NST and VID pair feat[1:-1] from the shallowest (the reference's zip); SP reads
    feat[-2]."""
    teacher, student = _pair(key)
    d = build_distiller(method, teacher, student=student)
    t, s = key.split("->")
    n = min(len(REFERENCE_FEATURES[t]), len(REFERENCE_FEATURES[s])) - 2
    if method == "sp":
        assert d.t_shapes.stages[-1] == REFERENCE_FEATURES[t][-2]
        assert d.s_shapes.stages[-1] == REFERENCE_FEATURES[s][-2]
    else:
        assert d.pairs == [(j, j) for j in range(n)]
        assert [d.t_shapes.stages[i] for i, _ in d.pairs] == REFERENCE_FEATURES[t][1:1 + n]


def test_fsp_pairs_the_stem_with_the_first_stage():
    teacher, student = _pair("resnet110->resnet32")
    d = build_distiller("fsp", teacher, student=student)
    assert d.positions == [0, 1, 2, 3]        # feat[:-1] = [stem, stage1, stage2, stage3]
    x = torch.randn(3, 3, 32, 32)
    teacher.eval(); student.eval()
    from soteacher.distillers.fsp import fsp_loss, fsp_matrix
    with torch.no_grad():
        _, tf = teacher.forward_features(x)
        _, sf = student.forward_features(x)
        got = d.fsp_total(sf, tf)
        s_list, t_list = [sf["stem"], *sf["stages"]], [tf["stem"], *tf["stages"]]
        expected = sum(fsp_loss(fsp_matrix(s_list[i], s_list[i + 1]),
                                fsp_matrix(t_list[i], t_list[i + 1])) for i in range(3))
    torch.testing.assert_close(got, expected)
