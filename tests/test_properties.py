"""Property-based tests of the bank, the Lipschitz bound and the losses."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from soteacher import ConsistencyBank, consistency_loss, kd_loss, lipschitz_bound
from soteacher.metrics import kl_divergence, tv_distance
from soteacher.regularizers import layer_bound

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def bank_updates(draw):
    n, c = draw(st.integers(1, 6)), draw(st.integers(2, 5))
    rule = draw(st.sampled_from(["reference", "mean", "ema"]))
    steps = []
    for epoch in range(1, draw(st.integers(1, 4)) + 1):
        for _ in range(draw(st.integers(1, 3))):
            idx = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
            scale = draw(st.floats(0.1, 30.0))
            steps.append((epoch, idx, scale))
    return n, c, rule, steps, draw(st.integers(0, 2**31 - 1))


@SETTINGS
@given(bank_updates())
def test_bank_rows_stay_probability_vectors(case):
    n, c, rule, steps, seed = case
    g = torch.Generator().manual_seed(seed)
    bank = ConsistencyBank(n, c, update=rule, ema_decay=0.7)
    touched = torch.zeros(n, dtype=torch.bool)
    for epoch, idx, scale in steps:
        idx = torch.tensor(idx)
        probs = F.softmax(scale * torch.randn(len(idx), c, generator=g), dim=1)
        bank.update(idx, probs, epoch)
        touched[idx] = True
    b = bank.bank
    assert torch.all(b >= 0) and torch.all(b <= 1 + 1e-6)
    assert torch.allclose(b[touched].sum(1), torch.ones(int(touched.sum())), atol=1e-5)
    assert torch.all(b[~touched] == 0)


def _net(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(6, 4))
    with torch.no_grad():
        net[1].weight.uniform_(-2, 2)
        net[1].running_var.uniform_(0.1, 3)
    return net


@SETTINGS
@given(st.integers(0, 10_000), st.floats(-5, 5).filter(lambda a: abs(a) > 1e-3),
       st.sampled_from([0, 1, 4]))
def test_lipschitz_bound_scales_as_the_formula_says(seed, a, layer):
    net = _net(seed)
    before = lipschitz_bound(net).item()
    term = layer_bound(net[layer]).item()
    assert before >= 0 and term >= 0
    with torch.no_grad():
        net[layer].weight.mul_(a)
    after = lipschitz_bound(net).item()
    # only the scaled layer's term changes, and it scales by |a|
    assert after == pytest.approx(before + (abs(a) - 1) * term, rel=1e-5, abs=1e-6)


logit_rows = st.integers(1, 5).flatmap(lambda b: st.integers(2, 6).map(lambda c: (b, c)))


@SETTINGS
@given(logit_rows, st.integers(0, 10_000), st.floats(0.5, 8.0), st.floats(0.1, 50.0))
def test_losses_are_finite_nonnegative_and_zero_at_equality(shape, seed, temperature, scale):
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(*shape, generator=g)
    t = scale * torch.randn(*shape, generator=g)
    kd = kd_loss(s, t, temperature, reduction="none")
    assert torch.isfinite(kd).all() and (kd >= -1e-5).all()
    assert kd_loss(s, s, temperature).item() == pytest.approx(0.0, abs=1e-4)
    p, q = F.softmax(s, 1), F.softmax(t, 1)
    cons = consistency_loss(p, q, reduction="none")
    assert torch.isfinite(cons).all() and (cons >= 0).all() and (cons <= 2 + 1e-6).all()
    assert consistency_loss(p, p).item() == 0.0
    tv = tv_distance(F.log_softmax(s, 1), F.log_softmax(t, 1))
    kl = kl_divergence(F.log_softmax(s, 1), F.log_softmax(t, 1))
    assert 0 <= tv <= 1 and kl >= 0 and math.isfinite(kl)
    assert tv_distance(F.log_softmax(s, 1), F.log_softmax(s, 1)) == pytest.approx(0, abs=1e-7)
