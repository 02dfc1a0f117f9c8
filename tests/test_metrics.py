"""Metrics against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from soteacher.metrics import (accuracy, agreement, bayes_accuracy, classification_metrics, ece,
                               kl_divergence, nll, reliability, truth_metrics, tv_distance)


def logp(rows: list[list[float]]) -> torch.Tensor:
    """Log of a probability matrix; log 0 = -inf."""
    return torch.tensor(rows, dtype=torch.float64).log()


# ---- classification ----------------------------------------------------------------------------
def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    # predictions 0, 1, 0 -> two of three right
    assert accuracy(logits, y) == pytest.approx(2 / 3)


def test_nll():
    # Log-probabilities are valid logits: softmax(log p) = p.
    logits = logp([[0.8, 0.2], [0.25, 0.75]])
    y = torch.tensor([0, 1])
    expected = (-math.log(0.8) - math.log(0.75)) / 2   # = (0.22314 + 0.28768) / 2
    assert nll(logits, y) == pytest.approx(expected)
    assert nll(logits.float(), y) == pytest.approx(expected, rel=1e-6)


# Four rows, four classes, two bins (0, .5] and (.5, 1]:
#   row 0: conf .40, pred 0, y 0 -> right, bin 0
#   row 1: conf .45, pred 1, y 2 -> wrong, bin 0
#   row 2: conf .90, pred 0, y 0 -> right, bin 1
#   row 3: conf .70, pred 0, y 1 -> wrong, bin 1
ECE_PROBS = [[0.40, 0.30, 0.20, 0.10],
             [0.10, 0.45, 0.25, 0.20],
             [0.90, 0.05, 0.03, 0.02],
             [0.70, 0.10, 0.10, 0.10]]
ECE_Y = torch.tensor([0, 2, 0, 1])


def test_ece_two_bins_by_hand():
    # bin 0: 2 rows, acc 1/2, mean conf (.40 + .45) / 2 = .425 -> 2/4 * |.5 - .425| = .0375
    # bin 1: 2 rows, acc 1/2, mean conf (.90 + .70) / 2 = .800 -> 2/4 * |.5 - .800| = .1500
    assert ece(logp(ECE_PROBS), ECE_Y, n_bins=2) == pytest.approx(0.0375 + 0.15)


def test_ece_single_bin_and_single_row():
    # One bin: |overall acc - overall mean conf| = |.5 - (.4 + .45 + .9 + .7) / 4| = |.5 - .6125|
    assert ece(logp(ECE_PROBS), ECE_Y, n_bins=1) == pytest.approx(0.1125)
    # One confident correct prediction: |1 - .8|.
    assert ece(logp([[0.8, 0.2]]), torch.tensor([0])) == pytest.approx(0.2)


def test_ece_upper_edge_is_inclusive():
    # Confidence exactly .5 belongs to (0, .5], not (.5, 1].
    rel = reliability(torch.zeros(1, 2), torch.tensor([0]), n_bins=2)
    assert rel["counts"] == [1, 0]


def test_reliability_by_hand():
    rel = reliability(logp(ECE_PROBS), ECE_Y, n_bins=2)
    assert rel["edges"] == pytest.approx([0.0, 0.5, 1.0])
    assert rel["counts"] == [2, 2]
    assert rel["accuracies"] == pytest.approx([0.5, 0.5])
    assert rel["confidences"] == pytest.approx([0.425, 0.8])
    # Empty bins are nan, not zero, so diagrams skip them.
    rel = reliability(logp(ECE_PROBS), ECE_Y, n_bins=4)
    assert rel["counts"] == [0, 2, 1, 1]
    assert math.isnan(rel["accuracies"][0]) and math.isnan(rel["confidences"][0])
    assert len(rel["edges"]) == 5


def test_ece_consistent_with_reliability():
    torch.manual_seed(0)
    logits, y = 3 * torch.randn(200, 5), torch.randint(0, 5, (200,))
    rel = reliability(logits, y)
    n = sum(rel["counts"])
    expected = sum(c / n * abs(a - f) for c, a, f in
                   zip(rel["counts"], rel["accuracies"], rel["confidences"]) if c)
    assert n == 200
    assert ece(logits, y) == pytest.approx(expected)
    assert 0.0 <= ece(logits, y) <= 1.0


def test_agreement():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0]])   # argmax 0, 1, 1
    b = torch.tensor([[3.0, 1.0], [2.0, 1.0], [0.0, 1.0]])   # argmax 0, 0, 1
    assert agreement(a, b) == pytest.approx(2 / 3)
    assert agreement(a, a) == 1.0


def test_classification_metrics_keys_and_values():
    logits, y = logp(ECE_PROBS), ECE_Y
    out = classification_metrics(logits, y, n_bins=2)
    assert set(out) == {"acc", "nll", "ece"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["acc"] == pytest.approx(0.5)
    # y's probabilities: .40, .25, .90, .10
    assert out["nll"] == pytest.approx(-(math.log(.4) + math.log(.25) + math.log(.9)
                                          + math.log(.1)) / 4)
    assert out["ece"] == pytest.approx(0.1875)


# ---- distances between distributions -----------------------------------------------------------
def test_tv_by_hand():
    p = logp([[0.5, 0.5], [1.0, 0.0]])
    q = logp([[0.2, 0.8], [0.0, 1.0]])
    # row 0: .5 * (.3 + .3) = .3; row 1: disjoint one-hots -> 1
    per_row = tv_distance(p, q, reduction="none")
    assert isinstance(per_row, torch.Tensor) and per_row.shape == (2,)
    assert per_row.tolist() == pytest.approx([0.3, 1.0])
    assert tv_distance(p, q) == pytest.approx(0.65)
    assert tv_distance(p, p) == 0.0


def test_tv_in_unit_interval():
    torch.manual_seed(0)
    p = torch.randn(50, 6).log_softmax(1)
    q = (4 * torch.randn(50, 6)).log_softmax(1)
    d = tv_distance(p, q, reduction="none")
    assert (d >= 0).all() and (d <= 1).all()
    torch.testing.assert_close(d, tv_distance(q, p, reduction="none"))   # symmetric


def test_kl_by_hand():
    p = logp([[0.5, 0.5], [1.0, 0.0]])
    q = logp([[0.25, 0.75], [0.5, 0.5]])
    # row 0: .5 ln(.5/.25) + .5 ln(.5/.75) = .5 (0.693147) + .5 (-0.405465) = 0.143841
    # row 1: 1 ln(1/.5) + 0 (0 log 0 = 0) = ln 2
    row0 = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)
    per_row = kl_divergence(p, q, reduction="none")
    assert per_row.tolist() == pytest.approx([row0, math.log(2)])
    assert kl_divergence(p, q) == pytest.approx((row0 + math.log(2)) / 2)


def test_kl_zero_when_equal_and_positive_otherwise():
    torch.manual_seed(0)
    p = torch.randn(20, 5).log_softmax(1)
    q = torch.randn(20, 5).log_softmax(1)
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert (kl_divergence(p, q, reduction="none") > 0).all()


def test_kl_zeros_in_p():
    # p_c = 0 contributes nothing, even where q_c = 0 too (log 0 - log 0 would be nan).
    p = logp([[1.0, 0.0], [0.0, 1.0]])
    assert kl_divergence(p, p) == 0.0
    assert math.isfinite(kl_divergence(p, logp([[0.5, 0.5], [0.5, 0.5]])))
    # Mass of p where q has none: infinite divergence.
    assert kl_divergence(logp([[0.5, 0.5]]), logp([[1.0, 0.0]])) == math.inf


def test_bayes_accuracy():
    assert bayes_accuracy(logp([[0.7, 0.3], [0.4, 0.6]])) == pytest.approx((0.7 + 0.6) / 2)
    assert bayes_accuracy(logp([[1.0, 0.0]])) == pytest.approx(1.0)


def test_truth_metrics():
    logits = torch.tensor([[0.0, 0.0]])        # model predicts (.5, .5)
    truth = logp([[0.25, 0.75]])
    out = truth_metrics(logits, truth)
    assert set(out) == {"tv_true", "kl_true"}
    assert out["tv_true"] == pytest.approx(0.25)
    # KL(p* || model) = .25 ln(.25/.5) + .75 ln(.75/.5) = -0.173287 + 0.304099
    assert out["kl_true"] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))


# ---- argument checks ---------------------------------------------------------------------------
def test_shape_errors():
    with pytest.raises(ValueError):
        accuracy(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        tv_distance(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError):
        agreement(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError):
        ece(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError):
        ece(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), n_bins=0)
    with pytest.raises(ValueError):
        kl_divergence(torch.zeros(1, 2), torch.zeros(1, 2), reduction="sum")


def test_inputs_with_grad_and_float32():
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    assert isinstance(classification_metrics(logits, y)["nll"], float)
    assert isinstance(truth_metrics(logits, logits.log_softmax(1))["kl_true"], float)
