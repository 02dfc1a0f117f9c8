import math

import pytest
import torch
from torch import nn

from soteacher import lipschitz_bound
from soteacher.regularizers import layer_bound


def test_linear_is_largest_absolute_column_sum():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]]))
    # column sums of |W|: 5, 7, 9
    assert lipschitz_bound(lin).item() == pytest.approx(9.0)


@pytest.mark.parametrize("conv", [nn.Conv1d(2, 3, 3), nn.Conv2d(2, 3, 3), nn.Conv3d(1, 2, 2),
                                  nn.ConvTranspose2d(2, 3, 3)])
def test_conv_is_entrywise_l1_norm(conv):
    with torch.no_grad():
        w = torch.arange(conv.weight.numel(), dtype=torch.float32) - 5.0
        conv.weight.copy_(w.view_as(conv.weight))
    expected = float(sum(abs(v) for v in w.tolist()))
    assert lipschitz_bound(conv).item() == pytest.approx(expected)


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d])
def test_batchnorm_is_max_gamma_over_running_std(bn_cls):
    bn = bn_cls(3, eps=1.0)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -3.0, 0.5]))
        bn.running_var.copy_(torch.tensor([3.0, 0.0, 0.0]))
    # |gamma| / sqrt(var + eps) = 2/2, 3/1, 0.5/1
    assert lipschitz_bound(bn).item() == pytest.approx(3.0)


def test_batchnorm_without_affine_or_running_stats():
    bn = nn.BatchNorm1d(2, affine=False, eps=0.0)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    assert layer_bound(bn).item() == pytest.approx(2.0)
    bn2 = nn.BatchNorm1d(2, track_running_stats=False, eps=0.0)
    with torch.no_grad():
        bn2.weight.copy_(torch.tensor([0.5, -1.5]))
    assert layer_bound(bn2).item() == pytest.approx(1.5)


def test_sum_over_layers_and_other_modules_add_nothing():
    lin = nn.Linear(2, 2)
    conv = nn.Conv1d(1, 1, 2)
    bn = nn.BatchNorm1d(1, eps=0.0)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -4.0]]))   # max col sum 6
        conv.weight.copy_(torch.tensor([[[0.5, -1.5]]]))              # l1 2
        bn.weight.fill_(-2.0)
        bn.running_var.fill_(4.0)                                      # 2 / 2 = 1
    net = nn.Sequential(conv, nn.ReLU(), bn, nn.MaxPool1d(1), nn.Flatten(), nn.Dropout(),
                        nn.LayerNorm(1), nn.Sequential(lin))
    # the LayerNorm is "every other module": it adds nothing
    assert lipschitz_bound(net).item() == pytest.approx(6.0 + 2.0 + 1.0)
    assert lipschitz_bound(nn.Sequential(nn.ReLU(), nn.Tanh())).item() == 0.0


def test_gradients_flow_to_weights_and_gamma_not_running_stats():
    torch.manual_seed(0)
    lin, conv, bn = nn.Linear(3, 2), nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([1.0, 4.0]))
        bn.weight.copy_(torch.tensor([1.5, 1.0]))
    net = nn.Sequential(conv, bn, nn.Flatten(), lin)
    lipschitz_bound(net).backward()
    assert torch.equal(conv.weight.grad, conv.weight.sign())
    col = lin.weight.abs().sum(0).argmax()
    expected = torch.zeros_like(lin.weight)
    expected[:, col] = lin.weight[:, col].sign()
    assert torch.equal(lin.weight.grad, expected)
    # channel 0 wins: 1.5 / sqrt(1 + eps) > 1 / sqrt(4 + eps)
    g = bn.weight.grad
    assert g[0].item() == pytest.approx(1 / math.sqrt(1 + bn.eps)) and g[1].item() == 0.0
    assert bn.running_var.grad is None and not bn.running_var.requires_grad
    assert lin.bias.grad is None and conv.bias.grad is None


def test_gradcheck_float64():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2), nn.Flatten(),
                        nn.Linear(4, 3)).double()
    params = [net[0].weight, net[1].weight, net[3].weight]

    def f(w0, g1, w3):
        with torch.no_grad():
            pass
        total = w0.abs().sum()
        total = total + (g1.abs() * torch.rsqrt(net[1].running_var + net[1].eps)).max()
        return total + w3.abs().sum(0).max()

    # the library's value equals the reference expression, and its gradient is right
    assert torch.allclose(lipschitz_bound(net), f(*params))
    inputs = [p.detach().clone().requires_grad_(True) for p in params]
    assert torch.autograd.gradcheck(f, inputs)
    lipschitz_bound(net).backward()
    ref = torch.autograd.grad(f(*inputs), inputs)
    for p, r in zip(params, ref):
        assert torch.allclose(p.grad, r)


def test_bound_is_on_the_module_device_and_differentiable_scalar():
    net = nn.Sequential(nn.Linear(4, 4))
    b = lipschitz_bound(net)
    assert b.dim() == 0 and b.requires_grad
