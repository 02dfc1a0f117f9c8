"""The model zoo: every registered model honours the feature contract.

Cases are generated from ``list_models()``, so a newly registered model is tested as soon as it
is registered. Each model is tried on a 1-D signal shape and an image shape and tested on
every shape it accepts (the MLP accepts both).
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from soteacher.models import MODELS, create_model, list_models

from test_model_zoo import assert_preact_relation

NUM_CLASSES = 3
BATCH = 4
CANDIDATE_SHAPES = [(1, 16), (1, 8, 8)]
CONV_MODELS = [n for n in list_models() if n.startswith("cnn")]


# These models are tiny: a second intra-op thread only adds synchronisation.
pytestmark = pytest.mark.usefixtures("one_thread")


def _accepted_shapes(name: str) -> list[tuple[int, ...]]:
    shapes = []
    for shape in CANDIDATE_SHAPES:
        try:
            create_model(name, NUM_CLASSES, shape)
        except ValueError:
            continue
        shapes.append(shape)
    return shapes


CASES = [(n, s) for n in list_models() for s in _accepted_shapes(n)]
IDS = [f"{n}-{'x'.join(map(str, s))}" for n, s in CASES]


def _build(name: str, shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, shape)
    x = torch.randn(BATCH, *shape)
    return model, x


@pytest.mark.parametrize("name", list_models())
def test_every_model_accepts_a_test_shape(name):
    # Guards the generated CASES: a model that rejects every candidate would go untested.
    assert _accepted_shapes(name), f"{name} accepts none of {CANDIDATE_SHAPES}"


@pytest.mark.parametrize("name", list_models())
def test_factory_signature(name):
    # The config layer validates option names through inspect.signature: no **kwargs allowed,
    # and every option must have a default.
    params = inspect.signature(MODELS.get(name)).parameters
    assert list(params)[:2] == ["num_classes", "input_shape"]
    for p in list(params.values())[2:]:
        assert p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL), name
        assert p.default is not p.empty, f"{name}.{p.name} needs a default"


@pytest.mark.parametrize("name,shape", CASES, ids=IDS)
def test_forward_and_features(name, shape):
    model, x = _build(name, shape)
    model.eval()  # fixed BN statistics so both passes compute the same function
    with torch.no_grad():
        logits = model(x)
        logits_f, feats = model.forward_features(x)
    assert logits.shape == (BATCH, NUM_CLASSES)
    torch.testing.assert_close(logits_f, logits)

    assert isinstance(model.stages, nn.ModuleList) and len(model.stages) >= 1
    assert isinstance(model.head, nn.Linear)
    assert len(feats["stages"]) == len(model.stages)
    pooled = feats["pooled"]
    assert pooled.shape == (BATCH, model.head.in_features)
    torch.testing.assert_close(model.head(pooled), logits)
    for f in feats["stages"]:
        assert f.shape[0] == BATCH


@pytest.mark.parametrize("name,shape", CASES, ids=IDS)
def test_forward_features_train_mode_matches_forward(name, shape):
    model, x = _build(name, shape)
    model.train()
    torch.manual_seed(1)
    logits = model(x)
    torch.manual_seed(1)
    logits_f, _ = model.forward_features(x)
    torch.testing.assert_close(logits_f, logits)


@pytest.mark.parametrize("name,shape", CASES, ids=IDS)
def test_preact_features(name, shape):
    model, x = _build(name, shape)
    model.train()
    with torch.no_grad():
        logits_post, post = model.forward_features(x, preact=False)
        logits_pre, pre = model.forward_features(x, preact=True)
    # Asking for pre-activations must not change the computation itself.
    torch.testing.assert_close(logits_pre, logits_post)
    model.eval()
    with torch.no_grad():
        _, post = model.forward_features(x, preact=False)
        _, pre = model.forward_features(x, preact=True)
    assert_preact_relation(model, pre["stages"], post["stages"])
    for a, b in zip(pre["stages"], post["stages"]):
        assert a.shape == b.shape
        assert (a < 0).any()                  # pre-activation keeps the negative part


@pytest.mark.parametrize("name,shape", CASES, ids=IDS)
def test_backward_reaches_every_parameter(name, shape):
    model, x = _build(name, shape)
    model.train()
    loss = F.cross_entropy(model(x), torch.arange(BATCH) % NUM_CLASSES)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name,shape", CASES, ids=IDS)
def test_eval_mode_batch_of_one(name, shape):
    model, _ = _build(name, shape)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, *shape))
        out_f, feats = model.forward_features(torch.randn(1, *shape))
    assert out.shape == (1, NUM_CLASSES) and out_f.shape == (1, NUM_CLASSES)
    assert feats["pooled"].shape[0] == 1


@pytest.mark.parametrize("name,shape", CASES, ids=IDS)
def test_input_shape_may_be_a_list(name, shape):
    model = create_model(name, NUM_CLASSES, list(shape))
    assert model(torch.randn(2, *shape)).shape == (2, NUM_CLASSES)


def test_unknown_model_lists_names():
    with pytest.raises(KeyError) as err:
        create_model("nope", NUM_CLASSES, (1, 16))
    for name in list_models():
        assert name in str(err.value)


@pytest.mark.parametrize("name", CONV_MODELS)
def test_conv_models_reject_wrong_rank(name):
    ok = _accepted_shapes(name)
    bad = [s for s in [(16,), *CANDIDATE_SHAPES, (1, 4, 4, 4)] if s not in ok]
    for shape in bad:
        with pytest.raises(ValueError) as err:
            create_model(name, NUM_CLASSES, shape)
        msg = str(err.value)
        assert str(shape) in msg                         # says what was given
        assert "use " in msg                             # and what to use instead


def test_rank_error_suggests_the_right_family():
    with pytest.raises(ValueError, match="cnn2d"):
        create_model("cnn1d", 2, (1, 8, 8))
    with pytest.raises(ValueError, match="cnn1d_small"):
        create_model("cnn2d_small", 2, (1, 16))
    with pytest.raises(ValueError, match="mlp"):
        create_model("cnn1d", 2, (16,))


def test_mlp_parameter_count_by_hand():
    model = create_model("mlp", 2, (1, 3), widths=(4,), batch_norm=False)
    # Linear(3 -> 4) with bias + head Linear(4 -> 2) with bias.
    assert sum(p.numel() for p in model.parameters()) == 3 * 4 + 4 + 4 * 2 + 2


def test_options_as_from_yaml():
    # YAML gives lists, not tuples.
    model = create_model("cnn1d", 5, [2, 20], widths=[4, 6], kernel_size=5, convs_per_stage=1)
    _, feats = model.forward_features(torch.randn(3, 2, 20))
    assert [f.shape[1] for f in feats["stages"]] == [4, 6]
    assert [f.shape[2] for f in feats["stages"]] == [20, 10]  # max-pool 2 between stages
    assert feats["pooled"].shape == (3, 6)
    assert model.stage_dims == [4, 6] and model.feature_dim == 6


def test_widths_define_stages():
    model = create_model("mlp", 2, (1, 8, 8), widths=(10, 20, 30), dropout=0.5)
    model.eval()
    _, feats = model.forward_features(torch.randn(2, 1, 8, 8))
    assert [f.shape for f in feats["stages"]] == [(2, 10), (2, 20), (2, 30)]
    model = create_model("cnn2d", 2, (3, 8, 8), widths=(4, 8))
    _, feats = model.forward_features(torch.randn(2, 3, 8, 8))
    assert [tuple(f.shape) for f in feats["stages"]] == [(2, 4, 8, 8), (2, 8, 4, 4)]


def test_presets_fix_their_widths():
    with pytest.raises(TypeError):
        create_model("cnn1d_small", 2, (1, 16), widths=(4,))
    small = create_model("cnn2d_small", 2, (1, 8, 8), batch_norm=False)
    assert small.stage_dims == [8, 16]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    assert create_model("mlp_large", 2, (5,)).stage_dims == [512, 512]
    assert create_model("cnn1d_large", 2, (1, 16)).stage_dims == [64, 128, 256]


def test_small_inputs_survive_pooling():
    # Three stages pool twice; a length-2 signal must still give a finite output.
    model = create_model("cnn1d", 2, (1, 2))
    model.eval()
    assert torch.isfinite(model(torch.randn(1, 1, 2))).all()


@pytest.mark.parametrize("bad", [dict(widths=()), dict(kernel_size=0), dict(convs_per_stage=0)])
def test_bad_conv_options(bad):
    with pytest.raises(ValueError):
        create_model("cnn1d", 2, (1, 16), **bad)


def test_bad_common_arguments():
    with pytest.raises(ValueError):
        create_model("mlp", 0, (4,))
    with pytest.raises(ValueError):
        create_model("mlp", 2, (4, 0))
    with pytest.raises(ValueError):
        create_model("mlp", 2, (4,), dropout=1.0)


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("name,shape", [("cnn1d", (2, 9)), ("cnn2d", (3, 7, 6))])
def test_zero_same_padding(name, shape, kernel_size):
    # The hand-made padding must equal PyTorch's padding="same" (zeros), odd or even kernel.
    torch.manual_seed(0)
    model = create_model(name, 2, shape, widths=(4,), kernel_size=kernel_size,
                         convs_per_stage=1, batch_norm=False)
    x = torch.randn(2, *shape)
    _, feats = model.forward_features(x, preact=True)
    conv = next(m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)))
    fn = F.conv1d if len(shape) == 2 else F.conv2d
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch warns about even kernels with "same"
        ref = fn(x, conv.weight, conv.bias, padding="same")
    torch.testing.assert_close(feats["stages"][0], ref)
