"""CC, FT and VID against RepDistiller (the CRD benchmark's code, HobbitLong/RepDistiller).

Three kinds of check:

* each loss against an independent float64 expression of its formula written here;
* values equal to constants obtained by running RepDistiller's own modules
  (``distiller_zoo/CC.py``, ``FT.py``, ``VID.py`` and ``models/util.py``: ``LinearEmbed``,
  ``Paraphraser``, ``Translator``) on the same deterministic float64 tensors, with their
  parameters filled by the same deterministic rule (:func:`fill`, in parameter order). The
  reference was run once, outside this project, on a scratch export of its files (torch 2.13,
  CPU); the constants are its printed results;
* the parameter count of every auxiliary module for eight teacher -> student pairs of the CRD
  benchmark, equal to the counts of the reference modules instantiated on RepDistiller's own
  feature shapes (``LinearEmbed(feat[-1])`` x 2, ``Paraphraser(feat_t[-2])``,
  ``Translator(feat_s[-2], feat_t[-2])``, ``VIDLoss(s, t, t)`` over
  ``zip(feat_s[1:-1], feat_t[1:-1])``).

Inputs are built from sines (:func:`det`), not from a random generator, so the constants do
not depend on a library's random stream.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from soteacher.distillers.cc import (CC, LinearEmbed, cc_loss, cc_taylor_gaussian_loss)
from soteacher.distillers.ft import FT, Paraphraser, Translator, ft_factor, ft_loss
from soteacher.distillers.vid import VID, vid_loss, vid_regressor
from soteacher.models import create_model

F64 = torch.float64


def det(shape, a, c=0.0):
    """A deterministic float64 tensor: ``sin(a * k + c)`` over the flat index k."""
    return torch.sin(torch.arange(math.prod(shape), dtype=F64) * a + c).reshape(shape)


@torch.no_grad()
def fill(params, base=0.0):
    """Overwrite parameters, in order, with ``0.3 * det(shape, 0.61 + 0.07 j, base + j)``."""
    for j, p in enumerate(params):
        p.copy_(0.3 * det(tuple(p.shape), 0.61 + 0.07 * j, base + j))


def proj(x):
    """A scalar that depends on every element: a fixed projection of ``x``."""
    return (x * det(tuple(x.shape), 0.91, 0.5)).sum().item()


def count(module):
    return sum(p.numel() for p in module.parameters())


def meta_pair(teacher, student):
    """Teacher and student on the meta device: shapes without memory or compute."""
    with torch.device("meta"):
        return create_model(teacher, 100), create_model(student, 100)


# ==== CC =========================================================================================
def test_cc_loss_against_float64_loops():
    s, t = det((5, 4), 0.37).numpy(), 2 * det((5, 4), 0.53, 1.0).numpy()
    per = [sum(abs(s[i, d] - t[i, d]) * abs(s[i + 1, d] - t[i + 1, d]) for d in range(4))
           for i in range(4)]                                      # consecutive pairs, no wrap
    got = cc_loss(torch.from_numpy(s), torch.from_numpy(t), reduction="none")
    assert got.shape == (4,) and np.allclose(got.numpy(), per, rtol=1e-12)
    assert cc_loss(torch.from_numpy(s), torch.from_numpy(t)).item() == pytest.approx(
        np.mean(per), rel=1e-12)
    # embeddings are used as they are: scaling both scales the loss quadratically
    assert cc_loss(3 * torch.from_numpy(s), 3 * torch.from_numpy(t)).item() == pytest.approx(
        9 * np.mean(per), rel=1e-12)


def test_cc_loss_equals_repdistiller_constant():
    # RepDistiller's Correlation()(s, t) on these tensors printed 13.687484718352332
    s, t = det((6, 5), 0.37), 2 * det((6, 5), 0.53, 1.0)
    assert cc_loss(s, t).item() == pytest.approx(13.687484718352332, rel=1e-12)


def test_cc_loss_edge_cases_and_gradcheck():
    one = torch.ones(1, 3, dtype=F64, requires_grad=True)
    loss = cc_loss(one, torch.zeros(1, 3, dtype=F64))
    assert loss.item() == 0.0 and loss.requires_grad               # no pair: 0, not NaN
    with pytest.raises(ValueError, match="same shape"):
        cc_loss(torch.zeros(4, 3), torch.zeros(4, 5))
    s, t = det((4, 3), 0.7).requires_grad_(), det((4, 3), 0.3, 1.0).requires_grad_()
    assert torch.autograd.gradcheck(cc_loss, (s, t))


def test_cc_linear_embedding_equals_repdistiller_constant():
    # RepDistiller's LinearEmbed(7, 4), filled, on det((3, 7), 0.13): proj printed 0.3713884595300242
    e = LinearEmbed(7, 4).double()
    fill(e.parameters())
    x = det((3, 7), 0.13)
    out = e(x)
    assert proj(out) == pytest.approx(0.3713884595300242, rel=1e-12)
    assert torch.allclose(out, x @ e.linear.weight.t() + e.linear.bias)   # not normalised


def test_cc_distiller_equals_repdistiller_constant():
    # resnet20 -> resnet8: embed_s, embed_t = LinearEmbed(64, 128) filled with bases 1 and 2;
    # 0.02 * Correlation()(embed_s(f_s), embed_t(f_t)) printed 0.2806834135540697
    d = CC(*meta_pair("resnet20", "resnet8")).double()
    assert (d.variant, d.cc_weight, d.ce_weight, d.kd_weight) == ("repdistiller", 0.02, 1.0, 0.0)
    fill(d.embed_s.parameters(), 1.0)
    fill(d.embed_t.parameters(), 2.0)
    f_s, f_t = det((4, 64), 0.11), det((4, 64), 0.07, 0.3)
    got = d.distill_terms({"pooled": f_s}, {"pooled": f_t}, None, None)
    assert set(got) == {"cc"}
    assert got["cc"].item() == pytest.approx(0.2806834135540697, rel=1e-12)


def test_cc_taylor_gaussian_variant_is_an_option():
    d = CC(*meta_pair("resnet20", "resnet8"), variant="taylor_gaussian", gamma=0.3,
           order=3).double()
    f_s, f_t = det((4, 64), 0.11), det((4, 64), 0.07, 0.3)
    got = d.distill_terms({"pooled": f_s}, {"pooled": f_t}, None, None)["cc"]
    expected = 0.02 * cc_taylor_gaussian_loss(d.embed_s(f_s), d.embed_t(f_t), 0.3, 3)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match="unknown CC variant 'rbf'; use one of repdistiller"):
        CC(*meta_pair("resnet20", "resnet8"), variant="rbf")


# ==== FT =========================================================================================
def np_pool2(a):
    """2x2 average pooling of (B, C, 2H, 2W) to (B, C, H, W)."""
    b, c, h, w = a.shape
    return a.reshape(b, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def np_ft(fs, ft, p1=2.0, p2=1.0):
    per = []
    for b in range(len(fs)):
        u = (fs[b] ** p1).mean(axis=0).ravel()
        v = (ft[b] ** p1).mean(axis=0).ravel()
        per.append(np.mean(np.abs(u / np.linalg.norm(u) - v / np.linalg.norm(v)) ** p2))
    return np.array(per)


def test_ft_loss_against_float64_loops():
    fs, ft = det((2, 3, 4, 4), 0.29).numpy(), det((2, 5, 2, 2), 0.41, 2.0).numpy()
    expected = np_ft(np_pool2(fs), ft)                   # the larger map is pooled first
    got = ft_loss(torch.from_numpy(fs), torch.from_numpy(ft), reduction="none")
    assert np.allclose(got.numpy(), expected, rtol=1e-12)
    assert ft_loss(torch.from_numpy(ft), torch.from_numpy(fs)).item() == pytest.approx(
        expected.mean(), rel=1e-12)
    fs2 = det((2, 3, 2, 2), 0.17).numpy()
    assert ft_loss(torch.from_numpy(fs2), torch.from_numpy(ft), p1=3.0, p2=2.0).item() == \
        pytest.approx(np_ft(fs2, ft, 3.0, 2.0).mean(), rel=1e-12)
    u = ft_factor(torch.from_numpy(ft))
    assert u.shape == (2, 4) and torch.allclose(u.norm(dim=1), torch.ones(2, dtype=F64))


def test_ft_loss_equals_repdistiller_constants():
    # RepDistiller's FactorTransfer() (p1=2, p2=1), and FactorTransfer(2, 2), printed these
    fs, ft = det((2, 3, 4, 4), 0.29), det((2, 3, 4, 4), 0.41, 2.0)
    assert ft_loss(fs, ft).item() == pytest.approx(0.1090334711664682, rel=1e-12)
    small = det((2, 3, 2, 2), 0.29)                     # pooled to 2x2: student or teacher side
    assert ft_loss(small, ft).item() == pytest.approx(0.171226797409807, rel=1e-12)
    assert ft_loss(ft, small).item() == pytest.approx(0.171226797409807, rel=1e-12)
    assert ft_loss(fs, ft, p2=2.0).item() == pytest.approx(0.01637382927309305, rel=1e-12)


def test_ft_loss_gradcheck_and_errors():
    s = det((2, 3, 4, 4), 0.29).requires_grad_()
    t = det((2, 2, 2, 2), 0.41, 2.0).requires_grad_()
    assert torch.autograd.gradcheck(ft_loss, (s, t))
    with pytest.raises(ValueError, match="position by position"):
        ft_loss(torch.ones(2, 3), torch.ones(2, 3))


def test_ft_paraphraser_and_translator_equal_repdistiller_constants():
    # RepDistiller's Paraphraser(t_shape=(2, 4, 3, 3)) (k=0.5, no batch norm) and
    # Translator((2, 3, 3, 3), (2, 4, 3, 3)) (batch norm), filled, printed these projections
    para = Paraphraser(2, 4, 2).double()
    fill(para.parameters())
    factor, rec = para(det((2, 4, 3, 3), 0.17))
    assert proj(factor) == pytest.approx(1.4007148097982411, rel=1e-12)
    assert proj(rec) == pytest.approx(-0.2068813625327362, rel=1e-12)
    assert torch.equal(para.encode(det((2, 4, 3, 3), 0.17)), factor)
    trans = Translator(2, 3, 2).double()
    fill(trans.parameters())
    x = det((2, 3, 3, 3), 0.19)
    assert proj(trans.train()(x)) == pytest.approx(0.4138726343350712, rel=1e-12)
    assert proj(trans.eval()(x)) == pytest.approx(-0.014707491754188857, rel=1e-12)
    # the layers: 3x3 stride-1 padded convolutions with bias, LeakyReLU(0.1)
    convs = [m for m in list(para.modules()) + list(trans.modules())
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 9 and all(c.bias is not None and c.kernel_size == (3, 3)
                                   and c.padding == (1, 1) for c in convs)
    assert [type(c).__name__ for c in convs[3:6]] == ["ConvTranspose2d"] * 3
    assert all(m.negative_slope == 0.1 for m in para.modules() if isinstance(m, nn.LeakyReLU))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in para.modules())


def test_ft_distiller_equals_repdistiller_constant():
    # resnet20 -> resnet8: Paraphraser((2, 64, 2, 2)) filled with base 3 (eval, encoder only),
    # Translator((2, 64, 4, 4), (2, 64, 2, 2)) filled with base 4 (train mode), student map 4x4,
    # teacher map 2x2; 200 * FactorTransfer()(translator(f_s), paraphraser(f_t, is_factor=True))
    # printed 12.053128008324625
    d = FT(*meta_pair("resnet20", "resnet8")).double().train()
    assert (d.ft_weight, d.p1, d.p2) == (200.0, 2.0, 1.0)
    fill(d.paraphraser.parameters(), 3.0)
    fill(d.translator.parameters(), 4.0)
    f_s, f_t = det((2, 64, 4, 4), 0.05), det((2, 64, 2, 2), 0.09, 0.7)
    got = d.distill_terms({"stages": [f_s]}, {"stages": [f_t]}, None, None)
    assert set(got) == {"ft"}
    assert got["ft"].item() == pytest.approx(12.053128008324625, rel=1e-12)


def test_ft_factor_channels_are_truncated_as_the_reference():
    # int(rate * C), not round: 7 teacher channels at rate 0.5 give 3 factor channels
    teacher = create_model("cnn2d", 3, (1, 8, 8), widths=(4, 7))
    student = create_model("cnn2d", 3, (1, 8, 8), widths=(4, 5))
    d = FT(teacher, student)
    assert d.paraphraser.encoder[3].out_channels == 3 and d.translator[3].out_channels == 3
    with pytest.raises(ValueError, match="raise rate"):
        FT(teacher, student, rate=0.1)


# ==== VID ========================================================================================
def test_vid_loss_at_initial_variance_equals_repdistiller_constant():
    # RepDistiller's VIDLoss(5, 5, 5) with identity 1x1 convolutions (its regressor then passes a
    # non-negative input through) at its initial variance printed 0.90376877189848
    a = 4.9932291827136215                  # the reference's log_scale: log(exp(5 - 1e-5) - 1)
    d = VID(*meta_pair("resnet20", "resnet8"))
    assert all(torch.allclose(s, torch.full_like(s, a), rtol=1e-7) for s in d.log_scales)
    var = F.softplus(torch.full((5,), a, dtype=F64)) + 1e-5
    m, t = det((2, 5, 3, 3), 0.23).abs(), det((2, 5, 3, 3), 0.31, 1.5)
    assert vid_loss(m, t, var).item() == pytest.approx(0.90376877189848, rel=1e-12)
    # against the formula: mean over every element of 0.5 ((m - t)^2 / var + log var)
    v = 5.0
    expected = np.mean(0.5 * ((m.numpy() - t.numpy()) ** 2 / v + math.log(v)))
    assert vid_loss(m, t, var).item() == pytest.approx(expected, rel=1e-9)


def test_vid_regressor_equals_repdistiller_constant():
    # RepDistiller's VIDLoss(3, 5, 5).regressor, filled, printed -0.03539871982129009
    reg = vid_regressor(2, 3, 5, 5).double()
    assert [n for n, _ in reg.named_parameters()] == ["0.weight", "2.weight", "4.weight"]
    fill(reg.parameters())
    assert proj(reg(det((2, 3, 3, 3), 0.19))) == pytest.approx(-0.03539871982129009, rel=1e-12)


def test_vid_distiller_equals_repdistiller_constant():
    # resnet20 -> resnet8, stage i: VIDLoss(C_s, C_t, C_t) with the regressor filled with base
    # 5 + i and log_scale = det((C_t,), 0.3, i); student maps 4x4, teacher maps 2x2 (pooled);
    # the sum over the three stages printed 3.9803811951242976
    d = VID(*meta_pair("resnet20", "resnet8")).double()
    assert d.pairs == [(0, 0), (1, 1), (2, 2)] and d.vid_weight == 1.0
    f_s, f_t = [], []
    for i, c in enumerate((16, 32, 64)):
        f_s.append(det((2, c, 4, 4), 0.03 + 0.01 * i, i))
        f_t.append(det((2, c, 2, 2), 0.05 + 0.01 * i, 2 * i))
        fill(d.regressors[i].parameters(), 5.0 + i)
        with torch.no_grad():
            d.log_scales[i].copy_(det((c,), 0.3, i))
    got = d.distill_terms({"stages": f_s}, {"stages": f_t}, None, None)
    assert set(got) == {"vid"}
    assert got["vid"].item() == pytest.approx(3.9803811951242976, rel=1e-12)


# ==== parameter counts of the auxiliary modules ==================================================
#: RepDistiller's modules on its models' feature shapes (100 classes): CC embed_s, embed_t;
#: FT paraphraser, translator; VID (regressor + log_scale) per stage pair
REFERENCE_COUNTS = {
    ("resnet32x4", "resnet8x4"): (32896, 32896, 2065536, 1033728, [12352, 49280, 196864]),
    ("wrn_40_2", "wrn_16_2"): (16512, 16512, 516672, 258816, [3104, 12352, 49280]),
    ("resnet56", "resnet20"): (8320, 8320, 129312, 64896, [784, 3104, 12352]),
    ("vgg13", "vgg8"): (65664, 65664, 8259840, 4131840, [49280, 196864, 786944, 786944]),
    ("vgg13", "mobilenetv2"): (163968, 65664, 8259840, 1190880,
                               [34432, 135424, 549376, 606720]),
    ("resnet32x4", "shufflev1"): (123008, 32896, 2065536, 9551424, [23616, 94336, 377088]),
    ("resnet32x4", "shufflev2"): (131200, 32896, 2065536, 2621808, [15680, 62592, 250112]),
    ("wrn_40_2", "shufflev1"): (123008, 16512, 516672, 8887488, [9760, 38976, 155776]),
    ("wrn_40_2", "wrn_40_1"): (8320, 16512, 516672, 111168, [2592, 10304, 41088]),
    ("resnet110", "resnet32"): (8320, 8320, 129312, 64896, [784, 3104, 12352]),
    # RepDistiller's ResNet50 is our resnet50_cifar
    ("resnet50_cifar", "mobilenetv2"): (163968, 262272, 132129792, 11148768,
                                        [134400, 532992, 2147328, 8718336]),
}


@pytest.mark.parametrize("pair", sorted(REFERENCE_COUNTS), ids="->".join)
def test_auxiliary_parameter_counts_equal_repdistiller(pair):
    embed_s, embed_t, para, trans, vid = REFERENCE_COUNTS[pair]
    teacher, student = meta_pair(*pair)
    cc = CC(teacher, student)
    assert (count(cc.embed_s), count(cc.embed_t)) == (embed_s, embed_t)
    ft = FT(teacher, student)
    assert (count(ft.paraphraser), count(ft.translator)) == (para, trans)
    d = VID(teacher, student)
    assert [count(r) + a.numel() for r, a in zip(d.regressors, d.log_scales)] == vid
