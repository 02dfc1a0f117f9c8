"""Feature access for registered models and for arbitrary user modules (forward hooks)."""

import pytest
import torch
from torch import nn

from soteacher.models import create_model
from soteacher.models.features import FeatureExtractor, get_features, layer_spec


pytestmark = pytest.mark.usefixtures("one_thread")


def user_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(inplace=True),
        nn.Conv1d(4, 6, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(6, 3))


def test_registered_model_uses_forward_features():
    torch.manual_seed(0)
    model = create_model("cnn1d_small", 3, (1, 16)).eval()
    x = torch.randn(2, 1, 16)
    logits, feats = get_features(model, x)
    ref_logits, ref = model.forward_features(x)
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(a, b) for a, b in zip(feats["stages"], ref["stages"]))
    _, pre = get_features(model, x, preact=True)
    assert (pre["stages"][0] < 0).any() and (feats["stages"][0] >= 0).all()


def test_user_sequential_by_module_name():
    model = user_net().eval()
    x = torch.randn(3, 1, 8)
    logits, feats = get_features(model, x, layers=["1", "4"])
    # independent forward, step by step
    with torch.no_grad():
        h1 = model[1](model[0](x))                    # pre-activation after BN
        h4 = torch.relu(model[3](torch.relu(h1)))
        pooled = h4.mean(dim=2)
        ref_logits = model[7](pooled)
    assert torch.allclose(feats["stages"][0], h1, atol=1e-6)
    # the in-place ReLU that follows module "1" did not alter the captured feature
    assert (feats["stages"][0] < 0).any()
    assert torch.allclose(feats["stages"][1], h4, atol=1e-6)
    assert torch.allclose(feats["pooled"], pooled, atol=1e-6)       # input of the last Linear
    assert torch.allclose(logits, ref_logits, atol=1e-6)
    # the model is unchanged: no hooks left behind, same output as a plain call
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert torch.allclose(model(x), ref_logits, atol=1e-6)


def test_gradients_flow_through_hooked_features():
    model = user_net().train()
    _, feats = get_features(model, torch.randn(4, 1, 8), layers=["3"])
    feats["stages"][0].sum().backward()
    assert model[0].weight.grad is not None and model[3].weight.grad.abs().sum() > 0
    assert model[7].weight.grad is None


def test_named_pooled_layer_and_mapping_spec():
    model = user_net().eval()
    x = torch.randn(2, 1, 8)
    spec = layer_spec({"stages": ["4"], "pooled": "6"})
    assert spec == {"layers": ["4"], "pooled": "6"}
    _, feats = FeatureExtractor(model, **spec)(x)
    assert feats["pooled"].shape == (2, 6) and len(feats["stages"]) == 1
    # the input of Flatten ("6") is (B, 6, 1), flattened to (B, 6)
    with torch.no_grad():
        before_flatten = model[:6](x)
    assert before_flatten.shape == (2, 6, 1)
    assert torch.allclose(feats["pooled"], before_flatten.flatten(1))


def test_hooks_on_a_registered_model_and_pooled_default():
    torch.manual_seed(0)
    model = create_model("mlp", 3, (10,), widths=(5, 7)).eval()
    x = torch.randn(2, 10)
    _, feats = get_features(model, x, layers=["stages.0", "stages.1.body"])
    _, ref = model.forward_features(x, preact=True)
    _, post = model.forward_features(x)
    assert torch.allclose(feats["stages"][0], post["stages"][0])
    assert torch.allclose(feats["stages"][1], ref["stages"][1])
    assert torch.allclose(feats["pooled"], post["pooled"])


def test_errors_name_the_fix():
    model = user_net()
    with pytest.raises(KeyError, match="valid names: 0, 1, 2"):
        FeatureExtractor(model, ["layer9"])
    with pytest.raises(ValueError, match="list of module names"):
        layer_spec("1")
    with pytest.raises(ValueError, match="unknown key"):
        layer_spec({"stage": ["1"]})
    # without layers and without forward_features: only the pooled feature is available
    _, feats = get_features(model.eval(), torch.randn(2, 1, 8))
    assert feats["stages"] == [] and feats["pooled"].shape == (2, 6)
    no_linear = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten())
    _, feats = get_features(no_linear, torch.randn(2, 1, 8))
    assert feats["pooled"] is None
