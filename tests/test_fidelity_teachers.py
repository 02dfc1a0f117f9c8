"""Teacher baselines against the official SoTeacher code (github.com/shwinshaker/SoTeacher):
CRL (``helper/crl_util.py``: class ``Crl`` and its ``History``) and the weight schedules of CRL
and of the consistency term (``helper/crl_util.py`` and ``helper/consist_util.py``, the private
``__get_weight_schedule`` of both classes, driven as ``train_teacher.py`` drives them: ``step``
is called after each 1-based epoch, so the weight of epoch k >= 2 is the schedule at ``k - 1``).

How the constants were obtained: the reference files were exported from the mirror to a scratch
folder outside this project, ``.cuda()`` calls removed (nothing else changed), and run on CPU with
torch 2.x on exactly the tensors that ``episode()`` below builds: ``Crl(1.0, scheduler=...,
start_at=..., epochs=5, trainsize=12, n_classes=5)``, ``_criterion(logits, labels, indices)`` per
batch, ``step(k)`` after epoch k; the per-batch losses were printed with ``repr``.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from soteacher.regularizers import ConsistencyRegularizer, schedule_weight
from soteacher.regularizers.schedules import STEP_START
from soteacher.teachers import build_teacher_objective
from soteacher.teachers.crl import ConfidenceRanking, crl_loss, max_count, normalised_counts

N, C, B, E = 12, 5, 4, 5


def episode(n=N, c=C, b=B, epochs=E, seed=2024, bias=1.0):
    """Per epoch: a permutation of the n samples in batches of b, random logits pushed toward
    the label by ``bias`` (so that correctness counts vary), as (logits, labels, indices)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        z = torch.randn(n, c, generator=g) + bias * F.one_hot(y, c)
        out.append([(z[perm[i:i + b]], y[perm[i:i + b]], perm[i:i + b])
                    for i in range(0, n, b)])
    return out


def run_ours(crl, epochs):
    return [[float(crl(z, y, idx, k)) for z, y, idx in batches]
            for k, batches in enumerate(epochs, start=1)]


# ---- CRL against the reference's numbers ---------------------------------------------------------
# Per-batch losses of the reference, epochs 1..5 x 3 batches (see the module docstring).
_TAIL = [[0.2757542133331299, 0.3219085931777954, 0.34363698959350586],
         [0.2746291160583496, 0.18276894092559814, 0.28915590047836304],
         [0.17094632983207703, 0.17778168618679047, 0.0647628977894783]]
REFERENCE_CRL = {
    # scheduler=None (the reference's default: a constant weight)
    ("constant", STEP_START): [[0.0, 0.0, 0.0], [0.0, 0.91650390625, 0.5968449711799622], *_TAIL],
    # scheduler='step', start_at=2: weight 0 in epochs 1..2 (1: no count yet), 1 from epoch 3
    ("step", 2): [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], *_TAIL],
    ("linear", STEP_START): [[0.0, 0.0, 0.0], [0.0, 0.3666015565395355, 0.23873798549175262],
                             [0.16545253992080688, 0.19314517080783844, 0.20618219673633575],
                             [0.2197033017873764, 0.14621515572071075, 0.2313247174024582],
                             _TAIL[2]],
    ("cosine", STEP_START): [[0.0, 0.0, 0.0], [0.0, 0.5387074947357178, 0.35081666707992554],
                             [0.22308984398841858, 0.2604295313358307, 0.2780081629753113],
                             [0.2611878216266632, 0.17382359504699707, 0.2750036120414734],
                             _TAIL[2]],
}
# The reference's correctness history after the 5 epochs (the same for every schedule).
REFERENCE_COUNTS = [1.0, 1.0, 3.0, 3.0, 4.0, 4.0, 1.0, 0.0, 1.0, 2.0, 1.0, 3.0]


@pytest.mark.parametrize("schedule,start", list(REFERENCE_CRL))
def test_crl_equals_the_official_code(schedule, start):
    crl = ConfidenceRanking(N, weight=1.0, num_epochs=E, schedule=schedule, start_epoch=start)
    got = run_ours(crl, episode())
    expected = REFERENCE_CRL[(schedule, start)]
    for k, (g, e) in enumerate(zip(got, expected), start=1):
        # float32 both; the reference takes the margin from float64 numpy: <= 1 ulp apart
        assert g == pytest.approx(e, rel=1e-6, abs=1e-7), f"epoch {k}"
    assert crl.counts.tolist() == REFERENCE_COUNTS


def test_crl_through_the_teacher_objective_equals_the_official_code():
    obj = build_teacher_objective("crl", {"crl_schedule": "linear"}, num_samples=N,
                                  num_classes=C, num_epochs=E)
    assert obj.crl.weight == 1.0       # the reference's --crl_alpha default
    got = run_ours(obj.crl, episode())
    for g, e in zip(got, REFERENCE_CRL[("linear", STEP_START)]):
        assert g == pytest.approx(e, rel=1e-6, abs=1e-7)


def test_crl_normaliser_is_the_epochs_completed():
    # the reference's History.max_correctness: 1, raised by one after every epoch from epoch 2 on
    assert [max_count(k) for k in range(1, 7)] == [1, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="epochs are counted from 1"):
        max_count(0)


# ---- CRL against an independent float64 expression of the formula -------------------------------
def crl_formula(epochs, n):
    """Per-batch losses and final counts, in float64 Python scalars, from the formula:
    c_i = (count_i - m) / (M - m), M = max(1, k - 1), m = min over all samples;
    loss = mean_i max(0, |c_i - c_{i+1}| - sign(c_i - c_{i+1}) (conf_i - conf_{i+1}))."""
    counts, losses = [0.0] * n, []
    for k, batches in enumerate(epochs, start=1):
        top = 1 if k <= 2 else k - 1
        per_epoch = []
        for z, y, idx in batches:
            lo = min(counts)
            ids = idx.tolist()
            norm = [(counts[i] - lo) / (top - lo) for i in ids]
            conf = [max(math.exp(v) for v in row) / sum(math.exp(v) for v in row)
                    for row in z.double().tolist()]
            b = len(ids)
            terms = []
            for j in range(b):
                nxt = (j + 1) % b
                d = norm[j] - norm[nxt]
                sign = (d > 0) - (d < 0)
                terms.append(max(0.0, abs(d) - sign * (conf[j] - conf[nxt])))
            per_epoch.append(sum(terms) / b)
            for i, row, label in zip(ids, z.tolist(), y.tolist()):
                counts[i] += float(row.index(max(row)) == label)
        losses.append(per_epoch)
    return losses, counts


def test_crl_equals_the_float64_formula_over_several_epochs():
    epochs = episode(n=40, c=4, b=8, epochs=6, seed=7, bias=1.5)
    expected, counts = crl_formula(epochs, 40)
    crl = ConfidenceRanking(40)
    got = run_ours(crl, epochs)
    flat = [v for ep in expected[1:] for v in ep]
    assert sum(v > 0 for v in flat) > len(flat) // 2     # the episode exercises the ranking
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=2e-7)
    assert crl.counts.tolist() == counts


def test_crl_loss_gradient():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    norm = torch.tensor([0.0, 0.5, 1.0, 0.25, 0.5, 0.75], dtype=torch.float64)
    assert crl_loss(logits, norm).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda z: crl_loss(z, norm), (logits,))


def test_crl_deviation_when_every_sample_was_always_right():
    # The reference divides by M - m = 0 here and returns NaN (run on these tensors: epochs 2
    # and 3 give nan); ours scales every count to 0 and the loss is 0.
    crl = ConfidenceRanking(4)
    z = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 5.0]])
    y = torch.tensor([0, 1, 0, 1])
    losses = [float(crl(z, y, torch.arange(4), k)) for k in (1, 2, 3)]
    assert losses == [0.0, 0.0, 0.0]
    assert normalised_counts(crl.counts, 4).tolist() == [0.0] * 4


# ---- weight schedules against the reference's schedule function ---------------------------------
# The reference's __get_weight_schedule(schedule, max_weight=1.5, epochs=6, start_at=2) at
# e = k - 1 for k = 1..6 (identical in Crl and ConsistencyRegularizer); 'constant' is its
# scheduler=None, which leaves the weight at 1.5. Epoch 1 of the reference runs at the
# unscheduled weight, but both terms are 0 in epoch 1.
REFERENCE_SCHEDULES = {
    "constant": [1.5] * 6,
    "linear": [0.25, 0.5, 0.75, 1.0, 1.25, 1.5],
    "cosine": [0.3882285676537811, 0.7499999999999998, 1.0606601717798214, 1.299038105676658,
               1.4488887394336025, 1.5],
    "cycle": [0.82915619758885, 1.1180339887498947, 1.299038105676658, 1.414213562373095,
              1.479019945774904, 1.5],
    "step": [0.0, 0.0, 1.5, 1.5, 1.5, 1.5],
}


@pytest.mark.parametrize("name", list(REFERENCE_SCHEDULES))
def test_schedules_equal_the_official_code_epoch_by_epoch(name):
    expected = REFERENCE_SCHEDULES[name]
    got = [schedule_weight(name, 1.5, k, 6, start_epoch=2) for k in range(1, 7)]
    assert got == pytest.approx(expected, rel=1e-15, abs=1e-15)
    reg = ConsistencyRegularizer(4, 3, weight=1.5, num_epochs=6, schedule=name, start_epoch=2)
    crl = ConfidenceRanking(4, weight=1.5, num_epochs=6, schedule=name, start_epoch=2)
    for k in range(2, 7):
        assert reg.weight_at(k) == pytest.approx(expected[k - 1], rel=1e-15, abs=1e-15)
        assert crl.weight_at(k) == pytest.approx(expected[k - 1], rel=1e-15, abs=1e-15)


def test_step_start_defaults_are_the_reference_50():
    # the reference's --consist_start_at and --crl_start_at default to 50: its weight is 0 while
    # the 0-based epoch is below 50, i.e. for 1-based epochs 1..50, and on from epoch 51
    assert STEP_START == 50
    reg = ConsistencyRegularizer(4, 3, weight=1.0, num_epochs=240, schedule="step")
    assert [reg.weight_at(k) for k in (50, 51)] == [0.0, 1.0]
    for method, opts in (("consistency", {"consistency_schedule": "step"}),
                         ("crl", {"crl_schedule": "step"})):
        obj = build_teacher_objective(method, opts, num_samples=4, num_classes=3,
                                      num_epochs=240)
        term = obj.consistency if method == "consistency" else obj.crl
        assert term.start_epoch == 50
        assert [term.weight_at(k) for k in (1, 50, 51, 240)] == [0.0, 0.0, 1.0, 1.0]
