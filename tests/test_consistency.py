import pytest
import torch
import torch.nn.functional as F

from soteacher import ConsistencyBank, ConsistencyRegularizer, consistency_loss

N, C = 5, 3


def epoch_logits(seed):
    return torch.randn(N, C, generator=torch.Generator().manual_seed(seed))


def run_epochs(reg, epochs, batches=((0, 1, 2), (3, 4))):
    """Feed fixed logits per epoch in two batches; return per-epoch losses and probabilities."""
    losses, probs = [], []
    for k in range(1, epochs + 1):
        logits = epoch_logits(k)
        probs.append(F.softmax(logits, 1))
        ep = []
        for b in batches:
            idx = torch.tensor(b)
            ep.append(reg(logits[idx], idx, k))
        losses.append(ep)
    return losses, probs


def test_reference_bank_over_three_epochs():
    reg = ConsistencyRegularizer(N, C, weight=1.0, num_epochs=3, schedule="linear")
    losses, (p1, p2, p3) = run_epochs(reg, 3)
    bank = reg.bank.bank
    # epoch 1: tau = 1; epoch 2: tau = 1/3; epoch 3: tau = 1/4 (epoch 1 counts twice)
    assert torch.allclose(bank, (2 * p1 + p2 + p3) / 4, atol=1e-6)
    # the losses read the bank before the update
    assert all(l.item() == 0.0 for l in losses[0])
    idx = torch.tensor([0, 1, 2])
    expected2 = (2 / 3) * ((p2[idx] - p1[idx]) ** 2).sum(1).mean()
    assert losses[1][0].item() == pytest.approx(expected2.item(), rel=1e-5)
    before3 = (2 * p1 + p2) / 3
    idx = torch.tensor([3, 4])
    expected3 = 1.0 * ((p3[idx] - before3[idx]) ** 2).sum(1).mean()
    assert losses[2][1].item() == pytest.approx(expected3.item(), rel=1e-5)


def test_mean_and_ema_banks():
    reg = ConsistencyRegularizer(N, C, num_epochs=3, update="mean")
    _, (p1, p2, p3) = run_epochs(reg, 3)
    assert torch.allclose(reg.bank.bank, (p1 + p2 + p3) / 3, atol=1e-6)
    d = 0.8
    reg = ConsistencyRegularizer(N, C, num_epochs=3, update="ema", ema_decay=d)
    _, (p1, p2, p3) = run_epochs(reg, 3)
    expected = d * (d * p1 + (1 - d) * p2) + (1 - d) * p3
    assert torch.allclose(reg.bank.bank, expected, atol=1e-6)


def test_bank_tau_values():
    # one update per epoch: count = k - 1 before epoch k
    assert [ConsistencyBank(1, 1).tau(k, k - 1) for k in (1, 2, 3)] == pytest.approx([1, 1 / 3, 1 / 4])
    assert [ConsistencyBank(1, 1, "mean").tau(k, k - 1) for k in (1, 2, 3)] == pytest.approx([1, 1 / 2, 1 / 3])
    assert ConsistencyBank(1, 1, "ema", ema_decay=0.9).tau(5, 4) == pytest.approx(0.1)
    # a sample's first update takes the prediction whole, whatever the epoch
    assert ConsistencyBank(1, 1).tau(4, 0) == 1.0


def test_sample_first_seen_after_epoch_1():
    reg = ConsistencyRegularizer(N, C, num_epochs=3)
    p = F.softmax(torch.randn(N, C), 1)
    reg(torch.log(p[:4]), torch.arange(4), 1)                 # sample 4 is not visited
    logits = torch.randn(N, C)
    loss = reg(logits, torch.arange(N), 2)
    q = F.softmax(logits, 1)
    # sample 4 has no past prediction: it adds nothing (but still counts in the batch mean)
    expected = (2 / 3) * ((q[:4] - p[:4]) ** 2).sum(1).sum() / N
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(reg.bank.bank[4], q[4], atol=1e-6)  # taken whole
    assert reg.bank.count.tolist() == [2, 2, 2, 2, 1]


def test_only_addressed_rows_change():
    reg = ConsistencyRegularizer(N, C, num_epochs=2)
    reg(torch.randn(2, C), torch.tensor([1, 3]), 1)
    bank = reg.bank.bank
    assert torch.all(bank[[0, 2, 4]] == 0)
    assert torch.allclose(bank[[1, 3]].sum(1), torch.ones(2))


def test_loss_is_differentiable_and_gradient_matches_formula():
    torch.manual_seed(0)
    target = F.softmax(torch.randn(4, C, dtype=torch.float64), 1)
    logits = torch.randn(4, C, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: consistency_loss(F.softmax(z, 1), target), (logits,))
    per = consistency_loss(F.softmax(logits, 1), target, reduction="none")
    assert per.shape == (4,)
    assert torch.allclose(per.mean(), consistency_loss(F.softmax(logits, 1), target))


def test_bank_gets_no_gradient_and_state_dict_round_trip():
    reg = ConsistencyRegularizer(N, C, num_epochs=2)
    logits = torch.randn(N, C, requires_grad=True)
    reg(logits, torch.arange(N), 1)
    loss = reg(logits * 2, torch.arange(N), 2)
    loss.backward()
    assert not reg.bank.bank.requires_grad
    other = ConsistencyRegularizer(N, C, num_epochs=2)
    other.load_state_dict(reg.state_dict())
    assert torch.equal(other.bank.bank, reg.bank.bank)
    assert "bank.bank" in reg.state_dict()


def test_bad_arguments():
    with pytest.raises(ValueError, match="available: reference, mean, ema"):
        ConsistencyBank(2, 2, update="avg")
    with pytest.raises(ValueError, match="available"):
        ConsistencyRegularizer(2, 2, schedule="exp")
    with pytest.raises(ValueError, match="ema_decay"):
        ConsistencyBank(2, 2, update="ema", ema_decay=1.0)


def test_step_schedule_default_start_and_switch_on():
    reg = ConsistencyRegularizer(N, C, weight=2.0, num_epochs=60, schedule="step")
    assert reg.start_epoch == 50
    assert [reg.weight_at(k) for k in (2, 50, 51, 60)] == [0.0, 0.0, 2.0, 2.0]
    reg = ConsistencyRegularizer(N, C, weight=1.0, num_epochs=4, schedule="step", start_epoch=2)
    losses, _ = run_epochs(reg, 4)
    # weight 0 for epochs <= start_epoch, then the full weight; the bank fills all along
    assert all(float(l) == 0.0 for ep in losses[:2] for l in ep)
    assert all(float(l) > 0.0 for ep in losses[2:] for l in ep)
    assert reg.bank.count.tolist() == [4] * N
