"""Every registered distiller: its pure loss against an independent computation, a float64
gradient check, one training step (same and different architectures), preliminary stages,
CRD's memory, state-dict round trips, a frozen teacher, and a short run of the real trainer."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from soteacher import ArrayDataset, Trainer, TrainSettings, create_model
from soteacher.distillers import (DISTILLERS, ab_loss, at_loss, build_distiller, cc_loss,
                                  crd_loss, dist_terms, dkd_loss, dkd_terms, fitnet_loss,
                                  fsp_loss, fsp_matrix, ft_loss, kd_loss, list_distillers,
                                  nce_loss, nst_loss, pkt_loss, rkd_angle_loss,
                                  rkd_distance_loss, rkd_loss, sp_loss, standardize_logits,
                                  vid_loss)
from soteacher.distillers.cc import cc_taylor_gaussian_loss, correlation_matrix
from soteacher.models.features import get_features

ALL = list_distillers()
#: methods expected to distil a CNN teacher into an MLP student
CROSS_OK = {"kd", "dkd", "dist", "fitnet", "sp", "cc", "vid", "rkd", "pkt", "crd"}
NUM_SAMPLES = 16
SHAPE = (1, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def rng(seed=0):
    return np.random.default_rng(seed)


def t64(a):
    return torch.tensor(np.asarray(a), dtype=torch.float64)


# ==== pure losses against independent float64 computations =====================================
def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_standardize_logits_by_hand():
    z = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 16.0]])
    out = standardize_logits(z)
    assert torch.allclose(out[0], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)
    # row 2: mean 12, unbiased std sqrt((4 + 4 + 16) / 2) = sqrt(12)
    assert torch.allclose(out[1], torch.tensor([-2.0, -2.0, 4.0]) / math.sqrt(12), atol=1e-6)
    # invariant to shifting and (positive) scaling of the logits
    assert torch.allclose(standardize_logits(3 * z + 7), out, atol=1e-5)


def test_dkd_against_probabilities():
    r = rng(1)
    s, t = r.normal(size=(4, 5)), r.normal(size=(4, 5)) * 2
    y = np.array([0, 3, 4, 1])
    T = 3.0
    tckd, nckd = [], []
    for i in range(4):
        ps, pt = np_softmax(s[i] / T), np_softmax(t[i] / T)
        bs = np.array([ps[y[i]], 1 - ps[y[i]]])
        bt = np.array([pt[y[i]], 1 - pt[y[i]]])
        tckd.append(T**2 * np.sum(bt * np.log(bt / bs)))
        others = [c for c in range(5) if c != y[i]]
        qs, qt = ps[others] / ps[others].sum(), pt[others] / pt[others].sum()
        nckd.append(T**2 * np.sum(qt * np.log(qt / qs)))
    got_t, got_n = dkd_terms(t64(s), t64(t), torch.tensor(y), T)
    assert np.allclose(got_t.numpy(), tckd) and np.allclose(got_n.numpy(), nckd)
    got = dkd_loss(t64(s), t64(t), torch.tensor(y), alpha=0.5, beta=2.0, temperature=T)
    assert got.item() == pytest.approx(np.mean(0.5 * np.array(tckd) + 2 * np.array(nckd)))
    # the DKD paper's decomposition: KD = TCKD + (1 - p_t[target]) * NCKD
    pt_gt = np.array([np_softmax(t[i] / T)[y[i]] for i in range(4)])
    kd = kd_loss(t64(s), t64(t), T, reduction="none").numpy()
    assert np.allclose(kd, np.array(tckd) + (1 - pt_gt) * np.array(nckd))


def test_dist_against_numpy_corrcoef():
    r = rng(2)
    s, t = r.normal(size=(5, 4)), r.normal(size=(5, 4))
    T = 2.0
    ys, yt = np_softmax(s / T), np_softmax(t / T)
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(5)])
    intra = 1 - np.mean([np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(4)])
    got_inter, got_intra = dist_terms(t64(s), t64(t), T)
    assert got_inter.item() == pytest.approx(T**2 * inter, rel=1e-6)
    assert got_intra.item() == pytest.approx(T**2 * intra, rel=1e-6)


def test_fitnet_and_vid_by_hand():
    s = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])
    t = torch.tensor([[[1.0, 0.0]], [[3.0, 1.0]]])
    assert fitnet_loss(s, t, reduction="none").tolist() == [2.0, 5.0]
    assert fitnet_loss(s, t).item() == pytest.approx(F.mse_loss(s, t).item())
    # N(0, 2) evaluated at 1: 0.5 * (1 / 2 + log 2) per element
    mean = torch.zeros(1, 2, 3)
    target = torch.ones(1, 2, 3)
    var = torch.tensor([2.0, 2.0])
    assert vid_loss(mean, target, var).item() == pytest.approx(0.5 * (0.5 + math.log(2)))
    var = torch.tensor([1.0, 4.0])
    expected = np.mean([0.5 * 1.0, 0.5 * (0.25 + math.log(4))])
    assert vid_loss(mean, target, var).item() == pytest.approx(expected)


def test_at_against_loops():
    r = rng(3)
    s, t = r.normal(size=(2, 3, 2, 2)), r.normal(size=(2, 5, 2, 2))
    per = []
    for b in range(2):
        a_s = np.array([sum(s[b, c, i, j] ** 2 for c in range(3)) / 3 for i in range(2) for j in range(2)])
        a_t = np.array([sum(t[b, c, i, j] ** 2 for c in range(5)) / 5 for i in range(2) for j in range(2)])
        per.append(np.mean((a_s / np.linalg.norm(a_s) - a_t / np.linalg.norm(a_t)) ** 2))
    assert np.allclose(at_loss(t64(s), t64(t), reduction="none").numpy(), per)
    assert at_loss(t64(s), t64(t)).item() == pytest.approx(np.mean(per))


def test_sp_against_numpy():
    r = rng(4)
    s, t = r.normal(size=(3, 2, 4)), r.normal(size=(3, 7))
    def g(a):
        a = a.reshape(len(a), -1)
        m = a @ a.T
        return m / np.sqrt((m ** 2).sum(axis=1, keepdims=True))
    expected = ((g(s) - g(t)) ** 2).sum() / 9
    assert sp_loss(t64(s), t64(t)).item() == pytest.approx(expected)


def test_cc_taylor_kernel_and_exact_rbf_limit():
    r = rng(5)
    s, t = r.normal(size=(4, 3)), r.normal(size=(4, 6))
    gamma = 0.4
    def corr(a, order):
        u = a / np.linalg.norm(a, axis=1, keepdims=True)
        out = np.zeros((4, 4))
        for i, j in itertools.product(range(4), range(4)):
            x = u[i] @ u[j]
            out[i, j] = math.exp(-2 * gamma) * sum((2 * gamma * x) ** p / math.factorial(p)
                                                  for p in range(order + 1))
        return out
    expected = np.mean((corr(s, 2) - corr(t, 2)) ** 2)
    assert cc_taylor_gaussian_loss(t64(s), t64(t), gamma, 2).item() == pytest.approx(expected)
    # a long expansion is the exact Gaussian RBF exp(-gamma ||u_i - u_j||^2) of unit vectors
    u = s / np.linalg.norm(s, axis=1, keepdims=True)
    rbf = np.exp(-gamma * ((u[:, None] - u[None]) ** 2).sum(-1))
    assert np.allclose(correlation_matrix(t64(s), gamma, 15).numpy(), rbf, atol=1e-9)


def test_rkd_against_loops():
    r = rng(6)
    s, t = r.normal(size=(4, 3)), r.normal(size=(4, 5))
    def huber(x):
        x = np.abs(x)
        return np.where(x < 1, 0.5 * x**2, x - 0.5)
    def dist(a):
        d = np.array([[np.linalg.norm(a[i] - a[j]) for j in range(4)] for i in range(4)])
        return d / d[~np.eye(4, dtype=bool)].mean()
    def angles(a):
        out = np.zeros((4, 4, 4))
        for i, j, k in itertools.product(range(4), repeat=3):
            if i != j and k != j:
                u, v = a[i] - a[j], a[k] - a[j]
                out[j, i, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return out
    d_loss = huber(dist(s) - dist(t)).mean()
    a_loss = huber(angles(s) - angles(t)).mean()
    assert rkd_distance_loss(t64(s), t64(t)).item() == pytest.approx(d_loss, rel=1e-6)
    assert rkd_angle_loss(t64(s), t64(t)).item() == pytest.approx(a_loss, rel=1e-6)
    assert rkd_loss(t64(s), t64(t), 25, 50).item() == pytest.approx(25 * d_loss + 50 * a_loss)
    # distances are scale-free: a scaled copy of the teacher gives zero distance loss
    assert rkd_distance_loss(t64(3 * t), t64(t)).item() == pytest.approx(0.0, abs=1e-9)


def test_pkt_against_loops():
    r = rng(7)
    s, t = r.normal(size=(3, 4)), r.normal(size=(3, 2))
    eps = 1e-7
    def cond(a):
        # rows divided by (norm + 1e-7), as RepDistiller's PKT does
        u = a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-7)
        k = np.array([[(1 + u[i] @ u[j]) / 2 for j in range(3)] for i in range(3)])
        return k / k.sum(axis=1, keepdims=True)
    ps, pt = cond(s), cond(t)
    per_row = (pt * np.log((pt + eps) / (ps + eps))).mean(axis=1)
    assert np.allclose(pkt_loss(t64(s), t64(t), reduction="none").numpy(), per_row)
    assert pkt_loss(t64(s), t64(t)).item() == pytest.approx(per_row.mean())


def test_ab_by_hand():
    s = torch.tensor([[0.5, -2.0, 0.5, 2.0]])
    t = torch.tensor([[-1.0, -1.0, 1.0, 1.0]])
    # off & s > -m: (0.5 + 1)^2; off & s <= -m: 0; on & s <= m: (0.5 - 1)^2; on & s > m: 0
    assert ab_loss(s, t, margin=1.0).item() == pytest.approx(2.25 + 0.25)
    s2 = torch.cat([s, torch.zeros(1, 4)])
    t2 = torch.cat([t, torch.ones(1, 4)])
    assert ab_loss(s2, t2, reduction="none").tolist() == pytest.approx([2.5, 4.0])


def test_ft_against_numpy():
    r = rng(8)
    s, t = r.normal(size=(2, 3, 4)), r.normal(size=(2, 5, 4))
    per = []
    for b in range(2):
        u, v = (s[b] ** 2).mean(axis=0), (t[b] ** 2).mean(axis=0)      # channel energy per position
        per.append(np.mean(np.abs(u / np.linalg.norm(u) - v / np.linalg.norm(v)) ** 1.5))
    assert np.allclose(ft_loss(t64(s), t64(t), p2=1.5, reduction="none").numpy(), per)


def test_fsp_against_loops():
    r = rng(9)
    a, b = r.normal(size=(2, 2, 4)), r.normal(size=(2, 3, 4))
    g = np.array([[[np.mean(a[n, i] * b[n, j]) for j in range(3)] for i in range(2)]
                  for n in range(2)])
    assert np.allclose(fsp_matrix(t64(a), t64(b)).numpy(), g)
    # a larger map is average pooled to the smaller one first
    big = np.repeat(b, 2, axis=2)                      # (2, 3, 8) pools back to b exactly
    assert np.allclose(fsp_matrix(t64(a), t64(big)).numpy(), g)
    # vectors (B, C) count as maps with one position: G is the outer product
    u, v = r.normal(size=(2, 2)), r.normal(size=(2, 3))
    assert np.allclose(fsp_matrix(t64(u), t64(v)).numpy(), u[:, :, None] * v[:, None, :])
    g2 = g + 0.5
    assert fsp_loss(t64(g), t64(g2)).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same channel numbers"):
        fsp_loss(t64(g), t64(g[:, :1]))


def test_nst_against_mmd_loops():
    r = rng(10)
    s, t = r.normal(size=(2, 3, 5)), r.normal(size=(2, 2, 5))
    per = []
    for n in range(2):
        fs = s[n] / np.linalg.norm(s[n], axis=1, keepdims=True)
        ft = t[n] / np.linalg.norm(t[n], axis=1, keepdims=True)
        k = lambda x, y: (x @ y) ** 2
        tt = np.mean([k(x, y) for x in ft for y in ft])
        ss = np.mean([k(x, y) for x in fs for y in fs])
        st = np.mean([k(x, y) for x in fs for y in ft])
        per.append(tt + ss - 2 * st)
    assert np.allclose(nst_loss(t64(s), t64(t), reduction="none").numpy(), per)
    assert nst_loss(t64(s), t64(s)).item() == pytest.approx(0.0, abs=1e-12)


def test_nce_and_crd_by_hand():
    n = 10
    scores = torch.tensor([[0.2, 0.05, 0.1]], dtype=torch.float64)
    noise = 2 / n
    expected = -(math.log(0.2 / (0.2 + noise)) + math.log(noise / (0.05 + noise))
                 + math.log(noise / (0.1 + noise)))
    assert nce_loss(scores, n, eps=0.0).item() == pytest.approx(expected)
    r = rng(11)
    e_s, e_t = r.normal(size=(2, 3)), r.normal(size=(2, 3))
    rows_s, rows_t = r.normal(size=(2, 4, 3)), r.normal(size=(2, 4, 3))
    T, zs, zt = 0.5, 3.0, 5.0
    total = 0.0
    for b in range(2):
        ps = np.exp(rows_t[b] @ e_s[b] / T) / zs          # student anchor vs teacher memory
        pt = np.exp(rows_s[b] @ e_t[b] / T) / zt          # teacher anchor vs student memory
        for p in (ps, pt):
            nz = 3 / n
            total -= np.log(p[0] / (p[0] + nz)) + np.sum(np.log(nz / (p[1:] + nz)))
    got = crd_loss(t64(e_s), t64(e_t), t64(rows_s), t64(rows_t), zs, zt, n, T, eps=0.0)
    assert got.item() == pytest.approx(total / 2)


# ==== gradient checks (float64) ===================================================================
def _gc(fn, *shapes, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    if positive:
        xs = [x.abs() + 0.1 for x in xs]
    xs = [x.requires_grad_() for x in xs]
    assert torch.autograd.gradcheck(fn, xs)


GRADCHECKS = {
    "standardize": lambda: _gc(lambda z: standardize_logits(z).pow(3).sum(), (3, 4)),
    "dkd": lambda: _gc(lambda s, t: dkd_loss(s, t, torch.tensor([1, 0, 3]), 1.0, 8.0, 2.0),
                       (3, 4), (3, 4)),
    "dist": lambda: _gc(lambda s, t: sum(dist_terms(s, t, 2.0)), (4, 5), (4, 5)),
    "fitnet": lambda: _gc(fitnet_loss, (2, 3, 4), (2, 3, 4)),
    "at": lambda: _gc(at_loss, (2, 3, 5), (2, 4, 5)),
    "sp": lambda: _gc(sp_loss, (3, 2, 4), (3, 5)),
    "cc": lambda: _gc(cc_loss, (4, 3), (4, 3)),
    "vid": lambda: _gc(lambda m, t, v: vid_loss(m, t, v.abs() + 0.5), (2, 3, 4), (2, 3, 4), (3,)),
    "rkd": lambda: _gc(rkd_loss, (4, 3), (4, 5)),
    "pkt": lambda: _gc(pkt_loss, (4, 3), (4, 5)),
    "ab": lambda: _gc(lambda s, t: ab_loss(s, t, 0.3), (2, 3, 4), (2, 3, 4), seed=1),
    "ft": lambda: _gc(ft_loss, (2, 3, 4), (2, 3, 4)),
    "fsp": lambda: _gc(lambda a, b, c, d: fsp_loss(fsp_matrix(a, b), fsp_matrix(c, d)),
                       (2, 2, 4), (2, 3, 2), (2, 2, 4), (2, 3, 2)),
    "nst": lambda: _gc(nst_loss, (2, 3, 5), (2, 2, 5)),
    "crd": lambda: _gc(lambda es, et, rs, rt: crd_loss(F.normalize(es, dim=1), F.normalize(et, dim=1),
                                                       rs, rt, 0.01, 0.02, 20, 0.5),
                       (2, 3), (2, 3), (2, 4, 3), (2, 4, 3)),
    "kd": lambda: _gc(lambda s, t: kd_loss(standardize_logits(s), standardize_logits(t)),
                      (3, 4), (3, 4)),
}


@pytest.mark.parametrize("name", sorted(GRADCHECKS))
def test_gradcheck(name):
    GRADCHECKS[name]()


def test_every_method_has_a_gradcheck():
    assert set(ALL) <= set(GRADCHECKS)


# ==== one training step of every registered method ================================================
def make_pair(method, student_name="cnn1d_small", seed=0):
    torch.manual_seed(seed)
    # FSP needs equal channel numbers at the paired stages: a teacher as wide as the student.
    teacher = (create_model("cnn1d", 3, SHAPE, widths=(8, 16)) if method == "fsp"
               else create_model("cnn1d", 3, SHAPE, widths=(12, 24, 32)))
    student = create_model(student_name, 3, SHAPE)
    return teacher, student


def make_batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *SHAPE, generator=g), torch.randint(0, 3, (n,), generator=g),
            torch.randperm(NUM_SAMPLES, generator=g)[:n])


#: test options: a small CRD embedding; AB and FSP keep their term after the preliminary stage
#: (by default they drop it, as the reference does, see test_ab_fsp_default_drop_the_term)
TEST_OPTIONS = {"crd": {"feat_dim": 8}, "ab": {"ab_weight": 1.0}, "fsp": {"fsp_weight": 50.0}}


def build(method, teacher, student, **options):
    options = {**TEST_OPTIONS.get(method, {}), **options}
    if method in ("ab", "fsp", "ft"):
        # These tests drive single steps, so the stage runs inside the run (the named variant);
        # the reference's separate stage through the trainer is tested in test_init_stage.py.
        options.setdefault("init_stage", "in_run")
    return build_distiller(method, teacher, options, student=student, num_samples=NUM_SAMPLES,
                           num_classes=3)


def train_step(distiller, student, seed=0):
    """One SGD step over the student and the distiller's trainable parameters."""
    distiller.train()
    student.train()
    params = list(student.parameters()) + [p for p in distiller.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    x, y, idx = make_batch(seed)
    out = distiller(student, x, y, idx)
    loss = sum(out.losses.values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return out


def changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.state_dict().values()))


@pytest.mark.parametrize("method", ALL)
def test_training_step_same_architecture(method):
    teacher, student = make_pair(method)
    t_state = copy.deepcopy(teacher.state_dict())
    d = build(method, teacher, student)
    before = [v.clone() for v in student.state_dict().values()]
    out = train_step(d, student)
    assert out.logits.shape == (8, 3)
    assert out.losses and all(v.dim() == 0 and torch.isfinite(v) for v in out.losses.values())
    assert "ce" in out.losses and len(out.losses) >= 2
    assert changed(before, student)
    # the teacher is frozen, in eval mode, and untouched (weights and batch-norm statistics)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, t_state[k]) for k, v in teacher.state_dict().items())
    # learnable parts of the method received gradients
    own = [p for n, p in d.named_parameters() if not n.startswith("teacher.")]
    if own and method != "ft":                            # FT's paraphraser is frozen here
        assert all(p.requires_grad for p in own)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own)


@pytest.mark.parametrize("method", ALL)
def test_training_step_cnn_teacher_mlp_student(method):
    teacher, student = make_pair(method, "mlp_small")
    if method == "fsp":
        teacher = create_model("cnn1d", 3, SHAPE)
    if method not in CROSS_OK:
        with pytest.raises(ValueError, match=method):
            build(method, teacher, student)
        return
    d = build(method, teacher, student)
    before = [v.clone() for v in student.state_dict().values()]
    out = train_step(d, student)
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert changed(before, student)


@pytest.mark.parametrize("method", ALL)
def test_training_step_two_mlps(method):
    torch.manual_seed(0)
    teacher = create_model("mlp", 3, SHAPE, widths=(16, 24))
    student = create_model("mlp", 3, SHAPE, widths=(16, 24) if method == "fsp" else (8, 12))
    if method in ("at", "nst", "ft"):          # spatial attention / selectivity / factor maps only
        with pytest.raises(ValueError, match="spatial axes"):
            build(method, teacher, student)
        return
    d = build(method, teacher, student)
    before = [v.clone() for v in student.state_dict().values()]
    out = train_step(d, student)
    assert all(torch.isfinite(v) for v in out.losses.values()) and len(out.losses) >= 2
    assert changed(before, student)


def test_cross_architecture_errors_name_the_fix():
    teacher, student = make_pair("at", "mlp_small")
    with pytest.raises(ValueError, match="different numbers of spatial axes.*fitnet"):
        build("at", teacher, student)
    with pytest.raises(ValueError, match="at least two features"):
        build("fsp", teacher, student)
    teacher, student = make_pair("ab")                    # 12/24/32 channels vs 8/16
    with pytest.raises(ValueError, match="same channel numbers"):
        build("fsp", teacher, student)
    mlp_t = create_model("mlp", 3, SHAPE, widths=(8, 8))
    with pytest.raises(ValueError, match="spatial axes"):
        build("nst", mlp_t, create_model("mlp_small", 3, SHAPE))


def test_feature_methods_need_the_student_and_crd_needs_num_samples():
    teacher, student = make_pair("fitnet")
    with pytest.raises(ValueError, match="needs the student"):
        build_distiller("fitnet", teacher)
    with pytest.raises(ValueError, match="num_samples"):
        build_distiller("crd", teacher, student=student)


# ==== preliminary stages (AB, FSP, FT) ============================================================
@pytest.mark.parametrize("method", ["ab", "fsp", "ft"])
def test_preliminary_stage_then_distillation(method):
    teacher, student = make_pair(method)
    d = build(method, teacher, student)
    d.train()
    d.set_epoch(2, 16)                                    # default: 16 // 8 = 2 preliminary epochs
    assert d.in_init_stage
    before = copy.deepcopy(student.state_dict())
    out = train_step(d, student)
    init_key = {"ab": "ab_init", "fsp": "fsp_init", "ft": "ft_rec"}[method]
    assert set(out.losses) == {init_key} and torch.isfinite(out.losses[init_key])
    after = student.state_dict()
    if method == "ft":
        # the student is untouched while the paraphraser learns to reconstruct
        assert all(torch.equal(before[k], v) for k, v in after.items())
        assert d.paraphraser.training
    else:
        # the student's feature layers learn; its classifier gets no gradient
        assert torch.equal(before["head.weight"], after["head.weight"])
        assert not torch.equal(before["stages.0.body.0.weight"], after["stages.0.body.0.weight"])
    d.set_epoch(3, 16)
    assert not d.in_init_stage
    out = train_step(d, student)
    assert set(out.losses) == {"ce", method}
    if method == "ft":
        assert not d.paraphraser.training                 # frozen after its pretraining
        assert all(p.grad is None for p in d.paraphraser.parameters())


def test_init_epochs_option():
    teacher, student = make_pair("ab")
    d = build("ab", teacher, student, init_epochs=0)
    d.set_epoch(1, 240)
    assert not d.in_init_stage
    d = build("ab", teacher, student)
    d.set_epoch(30, 240)
    assert d.in_init_stage and d.init_stage_epochs() == 30      # RepDistiller: 30 before 240
    d.set_epoch(31, 240)
    assert not d.in_init_stage
    for num_epochs, expected in ((1, 0), (2, 1), (4, 1), (16, 2), (80, 10)):
        d.set_epoch(1, num_epochs)
        assert d.init_stage_epochs() == expected
    d = build("fsp", *make_pair("fsp"), init_epochs=3)
    with pytest.raises(ValueError, match="init_epochs"):
        d.set_epoch(1, 3)
    with pytest.raises(ValueError, match="init_epochs"):
        build("ft", teacher, student, init_epochs=-1)


@pytest.mark.parametrize("method", ["ab", "fsp"])
def test_ab_fsp_default_drop_the_term_after_the_preliminary_stage(method):
    teacher, student = make_pair(method)
    d = build_distiller(method, teacher, {"init_stage": "in_run"}, student=student)
    assert getattr(d, f"{method}_weight") == 0 and d.init_weight == 1
    x, y, idx = make_batch()
    d.set_epoch(1, 8)
    assert set(d(student, x, y, idx).losses) == {f"{method}_init"}
    d.set_epoch(2, 8)
    assert set(d(student, x, y, idx).losses) == {"ce"}


# ==== CRD memory ====================================================================================
def test_crd_memory_follows_the_momentum_formula():
    teacher, student = make_pair("crd")
    d = build("crd", teacher, student, nce_k=5, nce_momentum=0.3)
    assert d.nce_k == 5 and d.memory_s.shape == (NUM_SAMPLES, 8)
    mem_s, mem_t = d.memory_s.clone(), d.memory_t.clone()
    x, y, idx = make_batch(3)
    d.train()
    student.train()
    with torch.no_grad():
        _, s_feats = get_features(student, x)
        _, t_feats = get_features(teacher, x)
        e_s = d.embed_s(s_feats["pooled"])
        e_t = d.embed_t(t_feats["pooled"])
    d(student, x, y, idx)
    for mem_before, mem_after, e in ((mem_s, d.memory_s, e_s), (mem_t, d.memory_t, e_t)):
        expected = 0.3 * mem_before[idx] + 0.7 * e
        expected = expected / expected.norm(dim=1, keepdim=True)
        assert torch.allclose(mem_after[idx], expected, atol=1e-6)
        others = torch.ones(NUM_SAMPLES, dtype=torch.bool)
        others[idx] = False
        assert torch.equal(mem_after[others], mem_before[others])
    assert d.z_student > 0 and d.z_teacher > 0
    z = d.z_student.clone()
    # eval mode: the memory is read, never written; Z stays fixed after the first step
    d.eval()
    frozen = d.memory_s.clone()
    d(student, x, y, idx)
    assert torch.equal(d.memory_s, frozen) and torch.equal(d.z_student, z)
    assert {"memory_s", "memory_t", "z_student", "z_teacher"} <= set(d.state_dict())


def test_crd_caps_negatives_at_the_dataset_size():
    teacher, student = make_pair("crd")
    d = build("crd", teacher, student)                     # nce_k 16384 by default
    assert d.nce_k == NUM_SAMPLES - 1
    idx = d.contrast_indices(torch.tensor([4, 9]))
    assert idx.shape == (2, NUM_SAMPLES) and idx[:, 0].tolist() == [4, 9]


# ==== state dicts, options, logit methods ===========================================================
@pytest.mark.parametrize("method", ALL)
def test_state_dict_round_trip(method):
    teacher, student = make_pair(method)
    a = build(method, teacher, student)
    train_step(a, student)                                 # moves connectors, memories, ...
    state = a.state_dict()
    torch.manual_seed(123)                                 # a differently initialised twin
    b = build(method, teacher, copy.deepcopy(student))
    b.load_state_dict(state)
    assert set(b.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in b.state_dict().items())


@pytest.mark.parametrize("method", ["kd", "dkd", "dist"])
def test_logit_standardize_option(method):
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    student = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    opts = {"warmup_epochs": 0} if method == "dkd" else {}
    plain = build_distiller(method, teacher, opts)(student, x, y, torch.arange(6))
    std = build_distiller(method, teacher, {**opts, "logit_standardize": True})(
        student, x, y, torch.arange(6))
    assert plain.losses["ce"].item() == pytest.approx(std.losses["ce"].item())
    s, t = student(x), teacher(x)
    zs, zt = standardize_logits(s), standardize_logits(t)
    if method == "kd":
        assert std.losses["kd"].item() == pytest.approx(0.5 * kd_loss(zs, zt, 4.0).item(), rel=1e-5)
    elif method == "dkd":
        tckd, nckd = dkd_terms(zs, zt, y, 4.0)
        assert std.losses["tckd"].item() == pytest.approx(tckd.mean().item(), rel=1e-5)
        assert std.losses["nckd"].item() == pytest.approx(8 * nckd.mean().item(), rel=1e-5)
    else:
        inter, intra = dist_terms(zs, zt, 4.0)
        assert std.losses["dist_inter"].item() == pytest.approx(2 * inter.item(), rel=1e-5)
        assert std.losses["dist_intra"].item() == pytest.approx(2 * intra.item(), rel=1e-5)


def test_dkd_warmup():
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    full = build_distiller("dkd", teacher, {"alpha": 2.0, "warmup_epochs": 0})(
        student, x, y, torch.arange(6)).losses                   # no warm-up
    d = build_distiller("dkd", teacher, {"alpha": 2.0})
    d.set_epoch(5, 240)                                          # default warm-up 20 epochs
    warm = d(student, x, y, torch.arange(6)).losses
    d.set_epoch(5, 30)                                           # fixed, whatever the run's length
    assert d(student, x, y, torch.arange(6)).losses["tckd"].item() == pytest.approx(
        warm["tckd"].item())
    assert warm["tckd"].item() == pytest.approx(full["tckd"].item() * 5 / 20, rel=1e-5)
    assert warm["nckd"].item() == pytest.approx(full["nckd"].item() * 5 / 20, rel=1e-5)
    assert warm["ce"].item() == pytest.approx(full["ce"].item())
    d = build_distiller("dkd", teacher, {"warmup_epochs": 0})
    d.set_epoch(1, 240)
    assert d.warmup_factor() == 1.0


def test_feature_method_terms_and_kd_weight():
    teacher, student = make_pair("pkt")
    d = build("pkt", teacher, student, kd_weight=0.5, ce_weight=0.2, pkt_weight=10.0)
    x, y, idx = make_batch()
    out = d(student, x, y, idx)
    assert set(out.losses) == {"ce", "kd", "pkt"}
    s_logits, s_feats = get_features(student, x)
    with torch.no_grad():
        t_logits, t_feats = get_features(teacher, x)
    assert out.losses["ce"].item() == pytest.approx(0.2 * F.cross_entropy(s_logits, y).item(), rel=1e-5)
    assert out.losses["kd"].item() == pytest.approx(0.5 * kd_loss(s_logits, t_logits).item(), rel=1e-5)
    assert out.losses["pkt"].item() == pytest.approx(
        10 * pkt_loss(s_feats["pooled"], t_feats["pooled"]).item(), rel=1e-4)
    # defaults: RepDistiller weights, no KD term
    defaults = build("fitnet", teacher, student)
    assert defaults.fitnet_weight == 100 and defaults.kd_weight == 0 and defaults.ce_weight == 1
    assert set(defaults(student, x, y, idx).losses) == {"ce", "fitnet"}


def test_unknown_options_are_listed():
    teacher, student = make_pair("at")
    with pytest.raises(ValueError, match="valid options: at_weight, p, ce_weight"):
        build("at", teacher, student, beta=3)
    with pytest.raises(KeyError, match="available: ab, at, cc, crd, dist, dkd"):
        build_distiller("hint", teacher)


# ==== user models by module name ====================================================================
def user_cnn(widths, seed):
    torch.manual_seed(seed)
    layers, c = [], 1
    for w in widths:
        layers += [nn.Conv1d(c, w, 3, padding=1), nn.BatchNorm1d(w), nn.ReLU(inplace=True)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(c, 3))


@pytest.mark.parametrize("method", ["fitnet", "ab", "crd", "rkd"])
def test_user_models_with_named_layers(method):
    teacher, student = user_cnn((6, 10), 0), user_cnn((4,), 1)
    # AB distils pre-activations: name the batch norms before the ReLUs
    options = {"teacher_layers": ["1", "4"] if method == "ab" else ["2", "5"],
               "student_layers": ["1"] if method == "ab" else ["2"]}
    options.update(TEST_OPTIONS.get(method, {}))
    with pytest.raises(ValueError, match="input_shape"):
        build_distiller(method, teacher, options, student=student, num_samples=NUM_SAMPLES)
    with pytest.raises(KeyError, match="valid names"):
        build_distiller(method, teacher, {**options, "student_layers": ["nope"]},
                        student=student, num_samples=NUM_SAMPLES, input_shape=SHAPE)
    d = build_distiller(method, teacher, options, student=student, num_samples=NUM_SAMPLES,
                        input_shape=SHAPE)
    before = [v.clone() for v in student.state_dict().values()]
    out = train_step(d, student)
    assert all(torch.isfinite(v) for v in out.losses.values()) and method in out.losses
    assert changed(before, student)
    # the option wins over the context default
    d2 = build_distiller(method, teacher, {**options, "input_shape": [1, 8]}, student=student,
                         num_samples=NUM_SAMPLES, input_shape=SHAPE)
    if method == "fitnet":
        assert d2.t_shapes.stages[-1] == (10, 8)


# ==== the real training loop ===========================================================================
@pytest.mark.parametrize("method,epochs,options", [
    ("crd", 1, {"feat_dim": 8, "nce_k": 4}),
    ("ft", 2, {"init_epochs": 1, "init_stage": "in_run"}),
])
def test_trainer_integration(method, epochs, options):
    teacher, student = make_pair(method)
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(NUM_SAMPLES, *SHAPE, generator=g),
                        torch.randint(0, 3, (NUM_SAMPLES,), generator=g))
    d = build_distiller(method, teacher, options, student=student, num_samples=len(data),
                        num_classes=3)
    settings = TrainSettings(epochs=epochs, batch_size=8, lr=0.05, milestones=[])
    trainer = Trainer(student, d, data, settings, progress=False)
    own = {id(p) for p in student.parameters()}
    n_extra = sum(1 for p in d.parameters() if p.requires_grad and id(p) not in own)
    assert n_extra > 0                       # connectors / embeddings are optimised too
    history = trainer.fit()
    assert len(history) == epochs
    if method == "crd":
        assert {"loss_ce", "loss_crd"} <= set(history[0])
        assert "objective" in trainer.state_dict()
        assert "memory_s" in trainer.state_dict()["objective"]
    else:
        assert set(k for k in history[0] if k.startswith("loss_")) == {"loss_ft_rec"}
        assert {"loss_ce", "loss_ft"} <= set(history[1])
    assert all(math.isfinite(v) for r in history for k, v in r.items() if k.startswith("loss"))
    assert not teacher.training


def test_registry_lists_every_method():
    assert set(ALL) == {"kd", "dkd", "dist", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt",
                        "ab", "ft", "fsp", "nst", "crd"}
    for name in ALL:
        assert DISTILLERS.get(name).__doc__


def test_api_distils_user_modules_with_named_layers():
    """A plain user nn.Sequential pair, feature method, through the one-call API."""
    import soteacher as st
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
                            nn.Flatten(), nn.Linear(8, 3))
    student = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
                            nn.Flatten(), nn.Linear(4, 3))
    pairs = [(torch.randn(1, 16), i % 3) for i in range(24)]
    before = student[0].weight.detach().clone()
    result = st.distill(student, teacher, pairs, method="fitnet", epochs=1, batch_size=8,
                        options={"teacher_layers": ["1"], "student_layers": ["1"]},
                        progress=False)
    assert result.history[0]["loss_fitnet"] > 0
    assert not torch.equal(before, student[0].weight)


def test_crd_gets_the_training_labels_from_the_training_set():
    from soteacher.data.base import ArrayDataset
    train = ArrayDataset(torch.randn(NUM_SAMPLES, *SHAPE), torch.arange(NUM_SAMPLES) % 3)
    teacher, student = make_pair("crd")
    d = build_distiller("crd", teacher, {"nce_k": 4}, student=student, num_samples=NUM_SAMPLES,
                        train_set=train)
    assert torch.equal(d.sample_labels, train.y)
    # negatives of a sample come from the other classes, from the first step on
    idx = torch.arange(6)
    neg = d.contrast_indices(idx)[:, 1:]
    assert (train.y[neg] != train.y[idx].unsqueeze(1)).all()
