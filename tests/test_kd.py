import math

import pytest
import torch
from torch import nn

from soteacher import build_distiller, kd_loss, list_distillers


def test_kd_loss_by_hand():
    T = 2.0
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])   # softmax(t / T) = (3/4, 1/4)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(student, teacher, T).item() == pytest.approx(T**2 * kl, rel=1e-6)


def test_kd_loss_zero_when_equal_and_reductions():
    z = torch.randn(5, 4)
    assert kd_loss(z, z, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(5, 4)
    per = kd_loss(z, t, 3.0, reduction="none")
    assert per.shape == (5,) and torch.all(per > 0)
    assert torch.allclose(per.mean(), kd_loss(z, t, 3.0))


def test_kd_gradcheck():
    torch.manual_seed(0)
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, 4.0), (s,))


def test_kd_distiller_terms_and_frozen_teacher():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    student = nn.Linear(3, 2)
    kd = build_distiller("kd", teacher, {"temperature": 4.0, "ce_weight": 0.3, "kl_weight": 0.7})
    kd.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    stats = teacher[1].running_mean.clone()
    out = kd(student, x, y, torch.arange(6))
    assert set(out.losses) == {"ce", "kd"}
    with torch.no_grad():
        t = teacher(x)
    s = student(x)
    assert out.losses["ce"].item() == pytest.approx(0.3 * nn.functional.cross_entropy(s, y).item(), rel=1e-5)
    assert out.losses["kd"].item() == pytest.approx(0.7 * kd_loss(s, t, 4.0).item(), rel=1e-5)
    assert torch.equal(teacher[1].running_mean, stats)   # eval mode: statistics untouched


def test_unknown_distiller_and_option():
    assert "kd" in list_distillers()
    with pytest.raises(KeyError, match="available: .*kd"):
        build_distiller("dk", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="valid options: temperature, ce_weight, kl_weight"):
        build_distiller("kd", nn.Linear(2, 2), {"temp": 3})
    with pytest.raises(ValueError, match="temperature"):
        build_distiller("kd", nn.Linear(2, 2), {"temperature": 0})


def test_kd_defaults_are_the_soteacher_scripts():
    # shwinshaker/SoTeacher: run_student.sh passes -r 0.5 (CE) -a 0.5 (KL); config_student.py
    # has kd_T 4
    kd = build_distiller("kd", nn.Linear(2, 2))
    assert (kd.temperature, kd.ce_weight, kd.kl_weight) == (4.0, 0.5, 0.5)
    assert not kd.logit_standardize
