"""``known_truth_net``: inputs first, then labels drawn from a fixed random network's softmax."""

import math

import pytest
import torch

from soteacher.config import (ConfigError, apply_overrides, default_config_path, load_config,
                              validate)
from soteacher.data import (NetOracleTeacher, NetTruthTask, RandomFlip, RandomRoll,
                            build_dataset, oracle_teacher)
from soteacher.data.known_truth_net import _circular_conv, known_truth_net, net_log_prob
from soteacher.models import create_model

SMALL = {"num_classes": 4, "num_train": 300, "num_test": 200}


@pytest.fixture(scope="module")
def bundle():
    return known_truth_net(**SMALL)


def test_circular_convolution_and_the_network_against_hand_computed_values():
    x = torch.tensor([[[1.0, -2.0, 3.0, 0.5]]], dtype=torch.float64)
    # taps (1, 0, 0) read position p - 1 with wrap-around: a shift by one
    shift = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=torch.float64)
    assert torch.equal(_circular_conv(x, shift, torch.zeros(1, dtype=torch.float64)),
                       torch.roll(x, 1, dims=2))
    # taps (1, 1, 1): the circular moving sum, here [-0.5, 2, 1.5, 4.5], plus a bias of 1
    box = torch.ones(1, 1, 3, dtype=torch.float64)
    out = _circular_conv(x, box, torch.ones(1, dtype=torch.float64))
    assert out.flatten().tolist() == [0.5, 3.0, 2.5, 5.5]

    # one channel, identity convolutions: features = [mean(relu(x)), max(relu(x))]
    one = torch.ones(1, 1, 1, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    params = {"w1": one, "b1": zero, "w2": one, "b2": zero,
              "w3": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64),
              "b3": torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)}
    # relu(x) = [1, 0, 3, 0.5]: mean 1.125, max 3; logits (1.125, 3, 1)
    logits = torch.tensor([1.125, 3.0, 1.0], dtype=torch.float64)
    expected = logits - torch.log(torch.exp(logits).sum())
    got = net_log_prob(x, params)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-12)


def test_p_star_rows_sum_to_one_and_the_oracle_returns_log_p_star(bundle):
    task = bundle.truth
    assert isinstance(task, NetTruthTask)
    x = bundle.train.x
    p = task.prob(x.double())
    assert p.shape == (len(x), 4) and (p > 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(len(x), dtype=torch.float64),
                               rtol=0, atol=1e-12)
    oracle = oracle_teacher(task)
    assert isinstance(oracle, NetOracleTeacher) and not list(oracle.parameters())
    logits = oracle(x)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, task.log_prob(x))
    assert task.bayes_accuracy(x) == pytest.approx(float(p.max(1).values.mean()), abs=1e-12)


def test_labels_are_draws_from_p_star():
    task = NetTruthTask.random(num_classes=5, hidden=8, temperature=0.4,
                               generator=torch.Generator().manual_seed(3))
    n = 30_000
    x, y = task.sample(n, torch.Generator().manual_seed(4))
    p = task.prob(x.double())
    onehot = torch.nn.functional.one_hot(y, 5).double()
    # every class: how often it is the label, against its mean probability (binomial bounds)
    freq, mean_p = onehot.mean(0), p.mean(0)
    bound = 4 * torch.sqrt(mean_p * (1 - mean_p) / n)
    assert ((freq - mean_p).abs() < bound).all(), (freq, mean_p)
    # reliability of p* itself: in every bin of p*_c(x), the label is c as often as p* says
    pv, hit = p.flatten(), onehot.flatten()
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    checked = 0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (pv >= lo) & (pv < hi)
        k = int(m.sum())
        if k < 500:
            continue
        checked += 1
        mean_bin = pv[m].mean()
        sd = math.sqrt(float((pv[m] * (1 - pv[m])).sum())) / k
        assert abs(float(hit[m].mean() - mean_bin)) < 4 * sd + 1e-3, (float(lo), k)
    assert checked >= 6
    # the labels are noisy: the Bayes classifier is right about as often as p* predicts
    acc = float((p.argmax(1) == y).double().mean())
    assert acc == pytest.approx(task.bayes_accuracy(x), abs=0.015)
    assert acc < 0.9


def test_p_star_is_invariant_under_circular_shifts_and_not_under_flips(bundle):
    task = bundle.truth
    x = bundle.test.x[:200].double()
    ref = task.log_prob(x)
    for s in (1, 7, 31):
        assert (task.log_prob(torch.roll(x, s, dims=2)) - ref).abs().max() < 1e-10
    torch.manual_seed(0)
    rolled = bundle.augment(bundle.test.x[:200])
    assert isinstance(bundle.augment, RandomRoll) and not torch.equal(rolled, bundle.test.x[:200])
    assert (task.log_prob(rolled) - task.log_prob(bundle.test.x[:200])).abs().max() < 1e-5
    flipped = RandomFlip(p=1.0)(x)
    assert (task.log_prob(flipped) - ref).abs().max() > 0.1     # the check can fail


def test_bayes_accuracy_falls_as_the_temperature_rises():
    accs = []
    for t in (0.05, 0.15, 0.5, 2.0):
        d = known_truth_net(num_train=2000, num_test=1, temperature=t)
        accs.append(d.truth.bayes_accuracy(d.train.x))
    assert all(a > b for a, b in zip(accs, accs[1:])), accs
    # the documented values (200k samples) within the spread of 2000
    for got, documented in zip(accs, (0.911, 0.748, 0.429, 0.181)):
        assert got == pytest.approx(documented, abs=0.03)


def test_classes_are_close_to_balanced():
    d = known_truth_net(num_train=4000, num_test=1)
    freq = d.truth.prob(d.train.x).mean(0)
    assert ((freq - 0.1).abs() < 0.02).all(), freq


def test_same_seed_same_data_other_seed_other_data(bundle):
    again = known_truth_net(**SMALL)
    assert torch.equal(again.train.x, bundle.train.x) and torch.equal(again.train.y,
                                                                      bundle.train.y)
    assert torch.equal(again.test.y, bundle.test.y)
    for k, v in bundle.truth.params.items():
        assert torch.equal(again.truth.params[k], v)
    other = known_truth_net(**SMALL, seed=1)
    assert not torch.equal(other.train.x, bundle.train.x)
    assert not torch.equal(other.truth.params["w1"], bundle.truth.params["w1"])
    # train and test come from independent streams
    assert not torch.equal(bundle.train.x[:10], bundle.test.x[:10])


def test_registered_with_shape_for_the_1d_models():
    d = build_dataset("known_truth_net", num_classes=3, input_shape=[2, 20], num_train=50,
                      num_test=10, seed=2)
    assert d.name == "known_truth_net" and d.input_shape == (2, 20) and d.num_classes == 3
    assert d.train.x.shape == (50, 2, 20) and d.train.x.dtype == torch.float32
    assert d.train.y.min() >= 0 and d.train.y.max() < 3
    model = create_model("cnn1d_small", num_classes=3, input_shape=(2, 20))
    assert model(d.train.x[:4]).shape == (4, 3)


@pytest.mark.parametrize("options,message", [
    ({"temperature": 0}, "temperature must be a number > 0"),
    ({"temperature": float("nan")}, "temperature must be a number > 0"),
    ({"input_shape": [1, 8, 8]}, "input_shape must be (C, L)"),
    ({"input_shape": [1, 0]}, "input_shape must be (C, L)"),
    ({"kernel_size": 40}, "kernel_size must be a whole number in [1, 32]"),
    ({"num_classes": 1}, "num_classes must be a whole number >= 2"),
    ({"hidden": True}, "hidden must be a whole number >= 1"),
    ({"noise_std": -0.1}, "noise_std must be a number >= 0"),
    ({"num_train": 0}, "num_train must be a whole number >= 1"),
    ({"seed": -1}, "seed must be a whole number >= 0"),
])
def test_bad_options_say_what_is_wrong(options, message):
    with pytest.raises(ValueError) as err:
        build_dataset("known_truth_net", **options)
    assert str(err.value).startswith("known_truth_net: ")
    assert message in str(err.value)


def test_unknown_option_in_a_config_lists_the_valid_ones():
    cfg = apply_overrides(load_config(default_config_path()),
                          ["data.name=known_truth_net", "data.options={temp: 0.2}"])
    with pytest.raises(ConfigError, match="temperature"):
        validate(cfg)
