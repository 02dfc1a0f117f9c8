"""AT, SP, NST, RKD, PKT, KD and CRD against RepDistiller (HobbitLong/RepDistiller, the CRD
benchmark's code; the SoTeacher authors' fork ships the same files), and SoTeacher's Lipschitz
and consistency regularisers against the official SoTeacher code (shwinshaker/SoTeacher).

Each loss is checked twice:

* against an independent float64 expression of its formula written here (NumPy loops);
* against constants obtained by running the reference's own code on the same deterministic
  float64 tensors: RepDistiller's ``distiller_zoo/{AT,SP,NST,RKD,PKT,KD}.py`` and
  ``crd/{criterion,memory}.py``, SoTeacher's ``helper/lip_util.py`` (``lip1Loss``) and
  ``helper/consist_util.py`` (``ConsistencyRegularizer``). The reference was run once, outside
  this project, on a scratch export of those files (torch 2.13, CPU, its ``.cuda()`` calls
  made no-ops); the constants are its printed results.

Inputs are built from sines (:func:`det`), not from a random generator, so the constants do not
depend on a library's random stream. The feature positions each distiller reads (``stages`` =
``feat[1:-1]`` paired from the shallowest, ``stages[-1]`` = ``feat[-2]``, ``pooled`` =
``feat[-1]``) are RepDistiller's (``tests/test_fidelity_features.py``); the distiller-level
constants below were computed by the reference on lists of tensors with our stage shapes.
"""

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from soteacher.distillers import AT, CRD, NST, PKT, RKD, SP
from soteacher.distillers.at import at_loss, attention_map
from soteacher.distillers.crd import class_negatives, crd_loss
from soteacher.distillers.kd import kd_loss
from soteacher.distillers.nst import nst_loss
from soteacher.distillers.pkt import pkt_loss
from soteacher.distillers.rkd import rkd_loss
from soteacher.distillers.sp import sp_loss
from soteacher.models import create_model
from soteacher.regularizers.consistency import ConsistencyRegularizer
from soteacher.regularizers.lipschitz import lipschitz_bound

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


@functools.lru_cache(maxsize=None)
def meta_pair(teacher, student):
    """Teacher and student on the meta device: shapes without memory or compute (shared
    between tests: the distillers only read them)."""
    with torch.device("meta"):
        return create_model(teacher, 100), create_model(student, 100)


def stage_feats(shapes, a, c):
    """One deterministic (2, *shape) tensor per stage shape."""
    return [det((2,) + tuple(sh), a + 0.013 * i, c + i) for i, sh in enumerate(shapes)]


def huber(x):
    """Smooth L1 with beta 1, elementwise."""
    return np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5)


def unit(v):
    n = np.linalg.norm(v)
    return v / max(n, 1e-12)


# ==== independent float64 expressions ============================================================
def np_at(fs, ft):
    out = []
    for b in range(fs.shape[0]):
        qs = unit((fs[b] ** 2).mean(axis=0).ravel())
        qt = unit((ft[b] ** 2).mean(axis=0).ravel())
        out.append(((qs - qt) ** 2).mean())
    return np.array(out)


def np_sp(fs, ft):
    b = fs.shape[0]
    gs, gt = [], []
    for f, g in ((fs.reshape(b, -1), gs), (ft.reshape(b, -1), gt)):
        m = f @ f.T
        g.extend(unit(row) for row in m)
    return ((np.array(gs) - np.array(gt)) ** 2).sum() / (b * b)


def np_nst(fs, ft):
    out = []
    for b in range(fs.shape[0]):
        s = np.array([unit(c.ravel()) for c in fs[b]])
        t = np.array([unit(c.ravel()) for c in ft[b]])
        k = lambda x, y: np.mean([(xi @ yj) ** 2 for xi in x for yj in y])  # noqa: E731
        out.append(k(t, t) + k(s, s) - 2 * k(s, t))
    return np.array(out)


def np_rkd(es, et, wd=25.0, wa=50.0):
    b = len(es)

    def dist(e):
        d = np.array([[math.sqrt(max(((e[i] - e[j]) ** 2).sum(), 1e-12)) if i != j else 0.0
                       for j in range(b)] for i in range(b)])
        return d / d[~np.eye(b, dtype=bool)].mean()

    def angles(e):
        return np.array([[[unit(e[i] - e[j]) @ unit(e[k] - e[j]) for k in range(b)]
                          for i in range(b)] for j in range(b)])

    es, et = es.reshape(b, -1), et.reshape(b, -1)
    return (wd * huber(dist(es) - dist(et)).mean()
            + wa * huber(angles(es) - angles(et)).mean())


def np_pkt(fs, ft, eps=1e-7):
    def cond(f):
        u = np.array([r / (np.linalg.norm(r) + eps) for r in f.reshape(len(f), -1)])
        k = (u @ u.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = cond(fs), cond(ft)
    return (pt * np.log((pt + eps) / (ps + eps))).mean()


def np_kd(zs, zt, t):
    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    ps, pt = softmax(zs / t), softmax(zt / t)
    return (pt * np.log(pt / ps)).sum() / len(zs) * t * t


# ==== the loss functions: formula, reference constant, gradient ===================================
FS, FT = det((3, 4, 6, 6), 0.37), 2 * det((3, 5, 6, 6), 0.53, 1.0)
ES, ET = det((6, 5), 0.37), 2 * det((6, 7), 0.53, 1.0)


def test_at_loss():
    want = np_at(FS.numpy(), FT.numpy())
    assert np.allclose(at_loss(FS, FT, reduction="none").numpy(), want, rtol=1e-12)
    # RepDistiller's Attention().at_loss(FS, FT) printed 0.007217379977823505
    assert at_loss(FS, FT).item() == pytest.approx(0.007217379977823505, rel=1e-12)
    assert at_loss(FS, FT).item() == pytest.approx(want.mean(), rel=1e-12)
    s, t = FS[:2, :2, :3, :3].clone().requires_grad_(), FT[:2, :3, :3, :3].clone()
    assert torch.autograd.gradcheck(lambda a: at_loss(a, t), (s,))
    # the reference raises to the power p without |.|; absolute=True is the paper's |f|^p
    q = attention_map(FS, p=3.0)
    assert torch.allclose(q, F.normalize(FS.pow(3).mean(1).flatten(1), dim=1), rtol=1e-12)
    assert not torch.allclose(q, attention_map(FS, p=3.0, absolute=True))
    assert torch.equal(attention_map(FS), attention_map(FS, absolute=True))


def test_sp_loss():
    fs, ft = det((5, 4, 3, 3), 0.37), 2 * det((5, 6, 2, 2), 0.53, 1.0)
    # RepDistiller's Similarity().similarity_loss(fs, ft) printed 0.22070780021531064
    assert sp_loss(fs, ft).item() == pytest.approx(0.22070780021531064, rel=1e-12)
    assert sp_loss(fs, ft).item() == pytest.approx(np_sp(fs.numpy(), ft.numpy()), rel=1e-12)
    s = fs[:3, :2].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: sp_loss(a, ft[:3]), (s,))


def test_nst_loss():
    want = np_nst(FS.numpy(), FT.numpy())
    assert np.allclose(nst_loss(FS, FT, reduction="none").numpy(), want, rtol=1e-12)
    # RepDistiller's NSTLoss().nst_loss(FS, FT) printed 1.3135140683913975
    assert nst_loss(FS, FT).item() == pytest.approx(1.3135140683913975, rel=1e-12)
    s, t = FS[:2, :2, :3, :3].clone().requires_grad_(), FT[:2, :3, :3, :3].clone()
    assert torch.autograd.gradcheck(lambda a: nst_loss(a, t), (s,))


def test_rkd_loss():
    # RepDistiller's RKDLoss()(ES, ET) printed 11.329140019322587
    assert rkd_loss(ES, ET).item() == pytest.approx(11.329140019322587, rel=1e-12)
    assert rkd_loss(ES, ET).item() == pytest.approx(np_rkd(ES.numpy(), ET.numpy()), rel=1e-12)
    assert rkd_loss(ES, ET, 2.0, 3.0).item() == pytest.approx(
        np_rkd(ES.numpy(), ET.numpy(), 2.0, 3.0), rel=1e-12)
    s = ES[:4].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: rkd_loss(a, ET[:4]), (s,))


def test_pkt_loss():
    # RepDistiller's PKT()(ES, ET) printed 0.15954651441882453, and 0.09885596658470977 for a
    # student feature of norm ~1e-6 (its eps added to the norm shrinks such rows)
    assert pkt_loss(ES, ET).item() == pytest.approx(0.15954651441882453, rel=1e-12)
    assert pkt_loss(1e-6 * ES, ET).item() == pytest.approx(0.09885596658470977, rel=1e-12)
    for s in (ES, 1e-6 * ES):
        assert pkt_loss(s, ET).item() == pytest.approx(np_pkt(s.numpy(), ET.numpy()), rel=1e-12)
    assert pkt_loss(torch.zeros(3, 4, dtype=F64), ET[:3]).isfinite()
    s = ES[:4].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: pkt_loss(a, ET[:4]), (s,))


def test_kd_loss():
    zs, zt = 3 * det((4, 10), 0.37), 5 * det((4, 10), 0.53, 1.0)
    # RepDistiller's DistillKL(4)(zs, zt) (KL summed, / batch, * T^2) printed 5.7965575480491
    assert kd_loss(zs, zt, 4.0).item() == pytest.approx(5.7965575480491, rel=1e-12)
    assert kd_loss(zs, zt, 4.0).item() == pytest.approx(np_kd(zs.numpy(), zt.numpy(), 4.0),
                                                        rel=1e-12)


# ==== the distillers: defaults, feature positions, weighted terms =================================
@pytest.mark.parametrize("teacher, student, at_want, nst_want", [
    # 1000 * sum(Attention()(g_s, g_t)) and 50 * sum(NSTLoss()(g_s, g_t)) of RepDistiller
    ("wrn_40_2", "shufflev1", 0.0805910990377441, 123.49453660956236),
    ("vgg13", "mobilenetv2", 0.8564350608769267, 87.81485026004233),
])
def test_at_and_nst_distillers(teacher, student, at_want, nst_want):
    pair = meta_pair(teacher, student)
    at, nst = AT(*pair).double(), NST(*pair).double()
    assert (at.at_weight, at.p, at.absolute, at.ce_weight, at.kd_weight) == (1000, 2, False, 1, 0)
    assert (nst.nst_weight, nst.ce_weight, nst.kd_weight) == (50, 1, 0)
    s = {"stages": stage_feats(at.s_shapes.stages, 0.11, 0.0)}
    t = {"stages": stage_feats(at.t_shapes.stages, 0.07, 0.5)}
    assert at.distill_terms(s, t, None, None)["at"].item() == pytest.approx(at_want, rel=1e-12)
    assert nst.distill_terms(s, t, None, None)["nst"].item() == pytest.approx(nst_want, rel=1e-12)


def test_sp_distiller_reads_each_last_stage():
    d = SP(*meta_pair("resnet50_cifar", "resnet8x4")).double()     # 4 teacher, 3 student stages
    assert (d.sp_weight, d.ce_weight, d.kd_weight) == (3000, 1, 0)
    s = {"stages": stage_feats(d.s_shapes.stages, 0.11, 0.0)}
    t = {"stages": stage_feats(d.t_shapes.stages, 0.07, 0.5)}
    # 3000 * Similarity()([feat_s[-2]], [feat_t[-2]]) printed 45.60423338537417
    assert d.distill_terms(s, t, None, None)["sp"].item() == pytest.approx(45.60423338537417,
                                                                           rel=1e-12)


def test_rkd_and_pkt_distillers_on_pooled_features():
    pair = meta_pair("wrn_40_2", "shufflev1")
    rkd, pkt = RKD(*pair).double(), PKT(*pair).double()
    assert (rkd.rkd_weight, rkd.distance_weight, rkd.angle_weight, rkd.ce_weight,
            rkd.kd_weight) == (1, 25, 50, 1, 0)
    assert isinstance(rkd.embed, nn.Identity)
    assert (pkt.pkt_weight, pkt.ce_weight, pkt.kd_weight) == (30000, 1, 0)
    s, t = {"pooled": det((5, 960), 0.11)}, {"pooled": det((5, 128), 0.07, 0.5).relu()}
    # RKDLoss()(f_s, f_t) printed 6.851550107199295; 30000 * PKT()(f_s, f_t) 2738.053071829475
    assert rkd.distill_terms(s, t, None, None)["rkd"].item() == pytest.approx(6.851550107199295,
                                                                              rel=1e-12)
    assert pkt.distill_terms(s, t, None, None)["pkt"].item() == pytest.approx(2738.053071829475,
                                                                              rel=1e-11)


# ==== CRD =========================================================================================
N_CRD, D_CRD, K_CRD = 20, 6, 5
CRD_BATCHES = [[3, 7, 11, 0], [5, 3, 19, 8], [7, 12, 2, 3]]


def crd_fixture():
    """wrn_40_2 (pooled 128) -> resnet8 (pooled 64), feat_dim 6, nce_k 5, 20 samples; embeddings
    and memories filled deterministically."""
    d = CRD(*meta_pair("wrn_40_2", "resnet8"), num_samples=N_CRD, feat_dim=D_CRD,
            nce_k=K_CRD).double()
    fill(d.embed_s.parameters(), 1.0)
    fill(d.embed_t.parameters(), 2.0)
    with torch.no_grad():
        d.memory_s.copy_(0.4 * det((N_CRD, D_CRD), 0.29, 0.1))
        d.memory_t.copy_(0.4 * det((N_CRD, D_CRD), 0.43, 0.7))
    return d.train()


def crd_step(step):
    index = CRD_BATCHES[step]
    neg = [[(7 * j + 3 * b + step * 5 + 1) % N_CRD for j in range(K_CRD)]
           for b in range(len(index))]
    contrast = torch.tensor([[i] + n for i, n in zip(index, neg)])
    f_s, f_t = det((4, 64), 0.11 + 0.01 * step), 3 * det((4, 128), 0.07, 0.3 + step)
    return f_s, f_t, torch.tensor(index), contrast


def test_crd_defaults_and_initialisation():
    pair = meta_pair("wrn_40_2", "resnet8")
    torch.manual_seed(3)
    d = CRD(*pair, num_samples=1000)
    assert (d.crd_weight, d.nce_k, d.nce_t, d.nce_momentum, d.negatives, d.ce_weight,
            d.kd_weight) == (0.8, 999, 0.07, 0.5, "class", 1, 0)
    # the reference's construction order and rule: Embed(64, 128), Embed(128, 128), then two
    # memories uniform in [-s, s] with s = 1 / sqrt(128 / 3) (with the same seed, RepDistiller's
    # CRDLoss gave bit-identical tensors)
    torch.manual_seed(3)
    lin_s, lin_t = nn.Linear(64, 128), nn.Linear(128, 128)
    s = 1 / math.sqrt(128 / 3)
    mem_s = torch.rand(1000, 128) * (2 * s) - s
    mem_t = torch.rand(1000, 128) * (2 * s) - s
    assert torch.equal(d.embed_s.linear.weight, lin_s.weight)
    assert torch.equal(d.embed_t.linear.bias, lin_t.bias)
    assert torch.allclose(d.memory_s, mem_s, rtol=0, atol=1e-7)
    assert torch.allclose(d.memory_t, mem_t, rtol=0, atol=1e-7)
    assert d.z_student.item() < 0 and (d.sample_labels == -1).all()


def test_crd_three_steps_equal_the_reference():
    # RepDistiller's CRDLoss (feat_dim 6, nce_k 5, n_data 20, momentum 0.5; its float32 copy of
    # T = 0.07 set to 0.07 in float64), embeddings and memories filled as in crd_fixture, given
    # the same contrast indices: loss, Z (set on the first step), gradient projections of the two
    # embedding weights, and memory projections after each step.
    want = [
        (13.474815183995375, (-3.120353038199651, -1.4764759339555051),
         (-1.4190736825269208, 0.8149264088014962)),
        (11.779388097862887, (-1.9657519662634186, -10.450802443103484),
         (0.14465967865662477, 0.2823329280075384)),
        (11.813532879966376, (-5.95593205934386, -0.8554918985569178),
         (1.0153880156165465, 1.5936707156265117)),
    ]
    d = crd_fixture()
    for step, (loss_w, grad_w, mem_w) in enumerate(want):
        f_s, f_t, index, contrast = crd_step(step)
        loss = d.contrast_loss(f_s, f_t, index, contrast)
        grads = torch.autograd.grad(loss, [d.embed_s.linear.weight, d.embed_t.linear.weight])
        assert loss.item() == pytest.approx(loss_w, rel=1e-12)
        assert d.z_student.item() == pytest.approx(1703.7608394394874, rel=1e-12)
        assert d.z_teacher.item() == pytest.approx(325.7199315714627, rel=1e-12)
        assert [proj(g) for g in grads] == pytest.approx(grad_w, rel=1e-10)
        assert (proj(d.memory_s), proj(d.memory_t)) == pytest.approx(mem_w, rel=1e-10)


def test_crd_first_step_against_the_formula():
    d = crd_fixture()
    f_s, f_t, index, contrast = crd_step(0)
    mem_s, mem_t = d.memory_s.numpy().copy(), d.memory_t.numpy().copy()

    def embed(lin, f):
        return np.array([unit(r) for r in f.numpy() @ lin.weight.detach().numpy().T
                         + lin.bias.detach().numpy()])

    e_s, e_t = embed(d.embed_s.linear, f_s), embed(d.embed_t.linear, f_t)
    c = contrast.numpy()
    n, k, temp, eps = N_CRD, K_CRD, 0.07, 1e-7
    out_s = np.exp(np.einsum("bkd,bd->bk", mem_t[c], e_s) / temp)   # student anchors
    out_t = np.exp(np.einsum("bkd,bd->bk", mem_s[c], e_t) / temp)   # teacher anchors
    z_s, z_t = out_s.mean() * n, out_t.mean() * n

    def nce(p):
        noise = k / n
        return -(np.log(p[:, 0] / (p[:, 0] + noise + eps)).sum()
                 + np.log(noise / (p[:, 1:] + noise + eps)).sum()) / len(p)

    want = nce(out_s / z_s) + nce(out_t / z_t)
    d.contrast_indices = lambda index, y=None: contrast          # the same negatives
    got = d.distill_terms({"pooled": f_s}, {"pooled": f_t}, None, index)["crd"]
    assert got.item() == pytest.approx(0.8 * want, rel=1e-12)
    assert d.z_student.item() == pytest.approx(z_s, rel=1e-12)
    for mem, before, e in ((d.memory_s, mem_s, e_s), (d.memory_t, mem_t, e_t)):
        rows = np.array([unit(0.5 * before[i] + 0.5 * e[b]) for b, i in enumerate(index)])
        assert np.allclose(mem[index].numpy(), rows, rtol=1e-12)
    # the pure function gives the same value
    rows_s, rows_t = torch.from_numpy(mem_s[c]), torch.from_numpy(mem_t[c])
    assert crd_loss(torch.from_numpy(e_s), torch.from_numpy(e_t), rows_s, rows_t, z_s, z_t,
                    n).item() == pytest.approx(want, rel=1e-12)


def test_crd_z_is_fixed_once_and_survives_a_state_dict():
    d = crd_fixture()
    f_s, f_t, index, contrast = crd_step(0)
    d.contrast_loss(f_s, f_t, index, contrast)
    z = d.z_student.clone()
    e = crd_fixture()                                   # a fresh twin, then the trained state
    e.load_state_dict(d.state_dict())
    for obj in (d, e):
        f_s, f_t, index, contrast = crd_step(1)
        obj.contrast_loss(3 * f_s, f_t, index, contrast)
        assert torch.equal(obj.z_student, z)


def labels_30():
    return torch.arange(30) % 3                         # 3 classes of 10


def test_class_negatives_are_distinct_samples_of_other_classes():
    labels = labels_30()
    index = torch.tensor([0, 4, 8, 29])
    torch.manual_seed(0)
    neg = class_negatives(torch.rand(4, 30), torch.rand(4, 15), labels, labels[index], index)
    for row, i in zip(neg, index):
        assert len(set(row.tolist())) == 15                          # without replacement
        assert (labels[row] != labels[i]).all()
    # more negatives than other-class samples (20): with replacement, still other classes
    neg = class_negatives(torch.rand(4, 30), torch.rand(4, 25), labels, labels[index], index)
    for row, i in zip(neg, index):
        assert (labels[row] != labels[i]).all() and len(set(row.tolist())) <= 20
    # classes not known yet: every other sample is a candidate, never the sample itself
    unknown = torch.full((30,), -1)
    neg = class_negatives(torch.rand(4, 30), torch.rand(4, 29), unknown, unknown[index], index)
    for row, i in zip(neg, index):
        assert sorted(row.tolist()) == [j for j in range(30) if j != i]


def test_class_negatives_are_uniform():
    labels, rows = labels_30(), 3000
    index = torch.zeros(rows, dtype=torch.long)                   # anchor 0, class 0
    torch.manual_seed(1)
    for k in (5, 25):                                   # without and with replacement
        neg = class_negatives(torch.rand(rows, 30), torch.rand(rows, k), labels,
                              labels[index], index)
        counts = torch.bincount(neg.flatten(), minlength=30).double()
        assert counts[labels == 0].sum() == 0
        expected = rows * k / 20
        sd = math.sqrt(expected)
        assert (counts[labels != 0] - expected).abs().max() < 6 * sd


def test_crd_class_negatives_from_given_or_learned_labels():
    labels = labels_30()
    d = CRD(*meta_pair("wrn_40_2", "resnet8"), num_samples=30, feat_dim=4, nce_k=8,
            sample_labels=labels)
    index = torch.tensor([1, 5, 9])
    idx = d.contrast_indices(index, labels[index])
    assert idx.shape == (3, 9) and idx[:, 0].tolist() == [1, 5, 9]
    assert (labels[idx[:, 1:]] != labels[index][:, None]).all()
    # learned: a training step records the batch's classes
    e = CRD(*meta_pair("wrn_40_2", "resnet8"), num_samples=30, feat_dim=4, nce_k=8)
    e.double().train()
    f_s, f_t = det((3, 64), 0.2), det((3, 128), 0.3)
    e.contrast_loss(f_s, f_t, index, e.contrast_indices(index, labels[index]), labels[index])
    assert e.sample_labels[index].tolist() == labels[index].tolist()
    others = torch.ones(30, dtype=torch.bool)
    others[index] = False
    assert (e.sample_labels[others] == -1).all()
    with pytest.raises(ValueError, match="negatives"):
        CRD(*meta_pair("wrn_40_2", "resnet8"), num_samples=30, negatives="exact")
    with pytest.raises(ValueError, match="one integer class per training sample"):
        CRD(*meta_pair("wrn_40_2", "resnet8"), num_samples=30, sample_labels=[0, 1])
    u = CRD(*meta_pair("wrn_40_2", "resnet8"), num_samples=30, feat_dim=4, nce_k=8,
            negatives="uniform")
    assert u.contrast_indices(index).shape == (3, 9)


# ==== SoTeacher's Lipschitz bound ================================================================
@torch.no_grad()
def fill_stats(model):
    for j, (name, buf) in enumerate(model.named_buffers()):
        if name.endswith("running_var"):
            buf.copy_(0.5 + 0.4 * det(tuple(buf.shape), 0.37 + 0.01 * j, j))


def np_lipschitz(model):
    total = 0.0
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            total += np.abs(m.weight.detach().numpy()).sum()
        elif isinstance(m, nn.Linear):
            total += np.abs(m.weight.detach().numpy()).sum(axis=0).max()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            g, v = m.weight.detach().numpy(), m.running_var.numpy()
            total += (np.abs(g) / np.sqrt(v + m.eps)).max()
    return total


#: (model, input shape, lip1Loss(model), sum of proj(gradient) over the parameters), from
#: SoTeacher's lip1Loss run on our models, float64, filled with ``fill`` and ``fill_stats``
LIPSCHITZ = [
    ("resnet8", None, 14679.261482644226, 12.827039124154311),
    ("resnet20", None, 51652.21525036725, -36.383982215863384),
    ("resnet56", None, 162599.12439041532, -21.533075752163242),
    ("resnet8x4", None, 230182.5882706345, 18.948081578309633),
    ("resnet32x4", None, 1413015.4759613436, -27.251408735936256),
    ("wrn_16_1", None, 33162.90873093143, -7.806780360952327),
    ("wrn_16_2", None, 131538.35336054282, 139.14594655832104),
    ("wrn_40_1", None, 107105.92447908441, 12.391376207245798),
    ("wrn_40_2", None, 427277.3885065668, 466.53377340843576),
    ("vgg8", None, 746646.5021038977, -5.060377021269047),
    ("vgg13", None, 1795685.001508558, -48.46314689044902),
    ("mobilenetv2", None, 127357.83614721599, -24.550200728283787),
    ("shufflev1", None, 158529.4157260946, -20.731666977611816),
    ("shufflev2", None, 236310.86305803657, -162.05786848409144),
    ("mlp_small", (40,), 32.4979508202705, 3.1512236486286023),
    ("cnn2d_small", (1, 8, 8), 254.28150573360972, 11.228872680888983),
]


@pytest.mark.parametrize("name, shape, value, grad", LIPSCHITZ, ids=[r[0] for r in LIPSCHITZ])
def test_lipschitz_bound_equals_the_reference(name, shape, value, grad):
    model = create_model(name, 100, input_shape=shape).double()
    fill(model.parameters())
    fill_stats(model)
    got = lipschitz_bound(model)
    assert got.item() == pytest.approx(value, rel=1e-12)
    assert got.item() == pytest.approx(np_lipschitz(model), rel=1e-12)
    grads = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    assert sum(proj(g) for g in grads if g is not None) == pytest.approx(grad, rel=1e-9)
    # the gradient of a convolution's term is sign(W)
    by_param = dict(zip([id(p) for p in model.parameters()], grads))
    for conv in [m for m in model.modules() if isinstance(m, nn.Conv2d)][:3]:
        assert torch.equal(by_param[id(conv.weight)], conv.weight.sign())


def test_lipschitz_gradient_of_linear_and_batch_norm():
    lin, bn = nn.Linear(3, 2).double(), nn.BatchNorm1d(3).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.5]]))
        bn.weight.copy_(torch.tensor([2.0, -3.0, 0.5]))
        bn.running_var.copy_(torch.tensor([3.0, 0.5, 0.1]))
    net = nn.Sequential(lin, nn.ReLU(), nn.Sequential(nn.Flatten(), bn))
    got = lipschitz_bound(net)
    gw, gg, gb = torch.autograd.grad(got, [lin.weight, bn.weight, bn.bias], allow_unused=True)
    assert torch.equal(gw, torch.tensor([[0, 0, 1.0], [0, 0, -1.0]], dtype=F64))   # column 3
    scale = 1 / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(gg, torch.tensor([0, -1.0, 0], dtype=F64) * scale)      # channel 2
    assert gb is None


# ==== SoTeacher's consistency regularisation =====================================================
N_CR, C_CR, E_CR = 10, 5, 4


def cr_batches(epoch):
    perm = [(3 * i + epoch) % N_CR for i in range(N_CR)]
    return [perm[:4], perm[4:8], perm[8:]]


def cr_logits(epoch, batch, size):
    return 2 * det((size, C_CR), 0.37 + 0.05 * epoch, batch)


def np_consistency(weight_at):
    """The reference behaviour from its description: zero bank, loss read before the update,
    zero in epoch 1, ``tau = 1`` in epoch 1 and ``1 / (k + 1)`` in epoch k >= 2."""
    bank, losses, banks = np.zeros((N_CR, C_CR)), [], []
    for epoch in range(1, E_CR + 1):
        tau = 1.0 if epoch == 1 else 1.0 / (epoch + 1)
        for bi, b in enumerate(cr_batches(epoch)):
            z = cr_logits(epoch, bi, len(b)).numpy()
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            losses.append(0.0 if epoch == 1 else
                          weight_at(epoch) * ((p - bank[b]) ** 2).sum(axis=1).mean())
            bank[b] = (1 - tau) * bank[b] + tau * p
        banks.append(bank.copy())
    return losses, banks


@pytest.mark.parametrize("schedule, weight, options, losses, grads, banks", [
    # SoTeacher's ConsistencyRegularizer(alpha, scheduler, start_at, epochs=4, trainsize=10,
    # n_classes=5), float64, its step(epoch) after each epoch: every batch's loss, proj of the
    # gradient on the logits, proj of the bank after each epoch
    ("linear", 1.0, {},
     [0.0, 0.0, 0.0, 0.039655180179974506, 0.05286570298166754, 0.003409986468975488,
      0.05699141708487836, 0.04568748070345971, 0.10362739132830866, 0.16103606889951683,
      0.05361455205732395, 0.2591930892431177],
     [0.0, 0.0, 0.0, 0.006809772424183461, -0.0035898045390088326, -0.0035890314303157122,
      -0.0025070951514467796, -0.013116616580902005, 0.00541850231035246, -0.034618586459334,
      -0.028935369028584734, 0.0005073852797047654],
     [0.19762332297469393, 0.5281371590959, 0.4739408105563786, 0.5746981032138573]),
    ("step", 0.7, {"start_epoch": 2},
     [0.0] * 6 + [0.053191989279219795, 0.0426416486565624, 0.09671889857308807,
                  0.11272524822966178, 0.03753018644012676, 0.18143516247018238],
     [0.0] * 6 + [-0.0023399554746836616, -0.01224217547550854, 0.005057268822995609,
                  -0.024233010521533788, -0.020254758320009322, 0.0003551696957933576],
     [0.19762332297469393, 0.5281371590959, 0.4739408105563786, 0.5746981032138573]),
])
def test_consistency_equals_the_reference_over_four_epochs(schedule, weight, options, losses,
                                                           grads, banks):
    # ours computes softmax and bank in float32 (as the reference does on the GPU): float32
    # tolerances against the float64 reference run
    reg = ConsistencyRegularizer(N_CR, C_CR, weight=weight, num_epochs=E_CR, schedule=schedule,
                                 **options)
    want_losses, want_banks = np_consistency(reg.weight_at)
    got, got_grads = [], []
    for epoch in range(1, E_CR + 1):
        for bi, b in enumerate(cr_batches(epoch)):
            z = cr_logits(epoch, bi, len(b)).requires_grad_()
            loss = reg(z, torch.tensor(b), epoch)
            got.append(loss.item())
            got_grads.append(proj(torch.autograd.grad(loss, z)[0]) if loss.requires_grad else 0.0)
        bank = reg.bank.bank.double()
        assert proj(bank) == pytest.approx(banks[epoch - 1], rel=1e-6)
        assert np.allclose(bank.numpy(), want_banks[epoch - 1], rtol=0, atol=1e-7)
    assert got == pytest.approx(losses, rel=1e-6, abs=1e-9)
    assert got == pytest.approx(want_losses, rel=1e-6, abs=1e-9)
    assert got_grads == pytest.approx(grads, rel=1e-5, abs=1e-7)
