"""SWA and label smoothing against the reference code; early stopping and temperature scaling
against their own definitions (no reference code has them).

How the reference constants were obtained: ``helper/regularizer.py`` (class ``SWA``) of the
official SoTeacher code (shwinshaker/SoTeacher 0148005) and ``mdistiller/distillers/loss.py``
(``CrossEntropyLabelSmooth``) of the logit-standardisation KD code
(sunshangquan/logit-standardization-KD f6e5aa5) were exported into a scratch folder outside this
project and run on the CPU (``Tensor.cuda`` patched to a no-op) on the closed-form tensors below;
the printed values (``float.hex`` for the SWA state, so the comparison can be exact) are pasted
here. The SWA driver followed ``train_teacher.py``: ``SWA(net, loader, swa_start=2,
swa_interval=1)``, the net's parameters set to snapshot ``e`` at the end of epoch ``e = 1..4``
and ``update(e)`` called for ``e >= 2``; the loader yielded the three batches of
:func:`loader_batches`; before epoch 1 the live net ran once in training mode on ``3 x + 1`` so
its batch-norm statistics were not the initial ones. The official SoTeacher code has no label
smoothing (no option in ``config_teacher.py``); its ``helper/loss.py: ce_soft`` on the smoothed
targets gave the same values as ``CrossEntropyLabelSmooth``.
"""

import copy
import json
import math

import pytest
import torch
from torch import nn

from soteacher import ArrayDataset, Trainer, TrainSettings
from soteacher.config import apply_overrides, load_config
from soteacher.distillers import build_distiller, kd_loss
from soteacher.pipeline import build_data, load_model, run_teacher
from soteacher.teachers import TemperatureScaled, WeightAveraging, build_teacher_objective
from soteacher.teachers.callbacks import refresh_batch_norm, swa_update
from soteacher.teachers.objective import TeacherObjective


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- fixed tensors (closed forms, no RNG) ------------------------------------------------------
def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)     # initial values are overwritten by the snapshots
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.ReLU(), nn.Linear(2, 2))


def snapshot(j: int, shape: torch.Size, e: int) -> torch.Tensor:
    """Parameter ``j`` (in ``parameters()`` order) at the end of epoch ``e``, float64."""
    n = math.prod(shape)
    v = torch.sin(0.7 * torch.arange(n, dtype=torch.float64) + 1.3 * e + j) * (1 + 0.1 * e)
    return v.reshape(shape)


def set_snapshot(model: nn.Module, e: int) -> None:
    with torch.no_grad():
        for j, p in enumerate(model.parameters()):
            p.copy_(snapshot(j, p.shape, e))


def inputs() -> torch.Tensor:
    i = torch.arange(13, dtype=torch.float64)[:, None]
    k = torch.arange(3, dtype=torch.float64)[None, :]
    return (torch.cos(0.37 * i + 1.1 * k) * (1 + 0.05 * i)).float()


def loader_batches() -> list[torch.Tensor]:
    x = inputs()
    return [x[0:5], x[5:10], x[10:13]]          # a last batch of another size


def h(s: str) -> list[float]:
    return [float.fromhex(v) for v in s.split()]


# What the reference's swa_net held after epoch 4 (3 updates), as float.hex of float32 values,
# run with one CPU thread. The parameters come from element-wise operations and are bit-equal
# whatever the machine; batch norm's reductions round differently with the number of threads
# (two threads changed the last bit of two statistics), so those are compared to a few ulps.
BN_STATS = ("1.running_mean", "1.running_var")
REF_SWA = {
    "0.weight": h("-0x1.021acp-1 -0x1.561ad6p-1 -0x1.09353cp-1 -0x1.fca31p-4 0x1.4fe704p-2 "
                  "0x1.407dfp-1"),
    "0.bias": h("-0x1.48745cp-1 -0x1.7af562p-2"),
    "1.weight": h("-0x1.834cc4p-3 0x1.12b49p-2"),
    "1.bias": h("0x1.bfa666p-2 0x1.51e738p-1"),
    "1.running_mean": h("-0x1.0f58ep-2 -0x1.b0043ap-2"),
    "1.running_var": h("0x1.465ee4p-2 0x1.7a60ecp-3"),
    "3.weight": h("0x1.52b0fap-1 0x1.c792fcp-2 0x1.38088p-6 -0x1.a9bdfcp-2"),
    "3.bias": h("0x1.1c553p-2 -0x1.6f0588p-3"),
}
REF_NUM_BATCHES_TRACKED = 10     # 1 (the live net's pass) + 3 refreshes x 3 batches
# After the first update (epoch 2) the reference's running statistics were:
REF_AFTER_FIRST = {"1.running_mean": [-0.6968986988067627, -0.39776909351348877],
                   "1.running_var": [0.4021281599998474, 0.6669790148735046]}


def run_ours(start: int = 2, last: int = 4) -> tuple[nn.Module, dict]:
    """Our swa_update and refresh_batch_norm, driven as train_teacher.py drives SWA."""
    net = tiny_model()
    with torch.no_grad():
        net.train()
        net(inputs() * 3 + 1)
    avg, count, first = None, 0, None
    for e in range(1, last + 1):
        set_snapshot(net, e)
        if e >= start:
            if avg is None:
                avg = copy.deepcopy(net)
            swa_update(avg, net, count)
            count += 1
            refresh_batch_norm(avg, loader_batches())
            if first is None:
                first = {k: v.clone() for k, v in avg.state_dict().items()}
    return avg, first


# ---- SWA ---------------------------------------------------------------------------------------
def test_swa_average_and_bn_refresh_equal_the_reference():
    avg, first = run_ours()
    sd = avg.state_dict()
    for k, v in REF_SWA.items():
        ref = torch.tensor(v, dtype=torch.float32)
        if k in BN_STATS:
            assert torch.allclose(sd[k], ref, rtol=1e-6, atol=0), k
        else:
            assert torch.equal(sd[k].flatten(), ref), k
    assert int(sd["1.num_batches_tracked"]) == REF_NUM_BATCHES_TRACKED
    for k, v in REF_AFTER_FIRST.items():
        assert torch.allclose(first[k], torch.tensor(v), rtol=0, atol=1e-7), k


def test_swa_average_and_bn_refresh_equal_the_formula_in_float64():
    avg, _ = run_ours()
    params = dict(avg.named_parameters())
    for j, (name, p) in enumerate(params.items()):
        mean = sum(snapshot(j, p.shape, e) for e in (2, 3, 4)) / 3      # epochs >= start
        assert torch.allclose(p.double(), mean, rtol=0, atol=1e-6), name
    # batch norm's input is the first linear layer's output with the averaged weights
    x = inputs().double()
    z = x @ params["0.weight"].double().T + params["0.bias"].double()
    bn = avg[1]
    assert torch.allclose(bn.running_mean.double(), z.mean(0), rtol=0, atol=1e-6)
    sizes = [5, 5, 3]
    chunks = z.split(sizes)
    var = sum(n / 13 * c.var(0, unbiased=True) for n, c in zip(sizes, chunks))
    assert torch.allclose(bn.running_var.double(), var, rtol=0, atol=1e-6)
    # PyTorch's momentum=None (an unweighted mean over batches) would differ here
    unweighted = sum(c.var(0, unbiased=True) for c in chunks) / 3
    assert not torch.allclose(bn.running_var.double(), unweighted, rtol=0, atol=1e-3)


def test_refresh_batch_norm_restores_mode_and_momentum_and_skips_models_without_bn():
    net = tiny_model()
    net.eval()
    net[1].momentum = 0.3
    refresh_batch_norm(net, loader_batches())
    assert not net.training and net[1].momentum == 0.3
    plain = nn.Sequential(nn.Linear(3, 2))
    refresh_batch_norm(plain, iter(()))                 # nothing to do, nothing raised


def test_swa_update_refuses_a_different_model():
    with pytest.raises(ValueError, match="build the average as a copy of the model"):
        swa_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0)


def test_swa_defaults_are_the_reference_ones():
    cb = build_teacher_objective("swa", {}, num_samples=8, num_classes=3,
                                 num_epochs=240).callbacks[0]
    assert (cb.start_epoch, cb.interval, cb.bn_refresh) == (150, 1, "every_update")
    # the first averaged epoch is swa_start itself (train_teacher.py: epoch >= swa_start)
    assert [e for e in range(1, 241) if cb.averages(e)] == list(range(150, 241))
    scaled = build_teacher_objective("swa", {"swa_start": "scaled"}, num_samples=8,
                                     num_classes=3, num_epochs=50).callbacks[0]
    assert scaled.start_epoch == 31                     # round(50 * 150 / 240)
    every2 = WeightAveraging(3, interval=2)
    assert [e for e in range(1, 10) if every2.averages(e)] == [3, 5, 7, 9]


def test_swa_start_after_the_last_epoch_warns_and_bad_options_say_what_to_do():
    with pytest.warns(UserWarning, match="no weights are averaged.*swa_start=scaled"):
        build_teacher_objective("swa", {}, num_samples=8, num_classes=3, num_epochs=50)
    for opts, match in (({"swa_start": 0}, "swa_start must be the first averaged epoch"),
                        ({"swa_start": "late"}, "or 'scaled'"),
                        ({"swa_interval": 0}, "swa_interval must be"),
                        ({"bn_refresh": "always"}, "available: every_update, end, off")):
        with pytest.raises(ValueError, match=match):
            build_teacher_objective("swa", {"swa_start": 1, **opts}, num_samples=8,
                                    num_classes=3, num_epochs=4)


# ---- SWA inside the trainer --------------------------------------------------------------------
def _data(n=40, d=3, c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g))


class Noise(nn.Module):
    """An augmentation that draws on the global RNG."""

    def forward(self, x):
        return x + 0.1 * torch.randn_like(x)


class Snapshots:
    def __init__(self):
        self.states = {}

    def on_epoch_end(self, trainer, epoch, record):
        self.states[epoch] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _fit(callbacks, epochs=4, evaluate=None, eval_every=0):
    s = TrainSettings(epochs=epochs, batch_size=8, lr=0.1, milestones=[], eval_every=eval_every)
    obj = TeacherObjective()
    t = Trainer(tiny_model(), obj, _data(), s, seed=3, progress=False, augment=Noise(),
                evaluate=evaluate, callbacks=callbacks)
    t.fit()
    return t


def test_swa_in_training_averages_from_the_start_epoch_and_leaves_training_alone():
    plain = Snapshots()
    _fit([plain])
    snaps = Snapshots()
    acc = lambda m: {"test_acc": 0.5}
    t = _fit([snaps, WeightAveraging(2)], evaluate=acc, eval_every=2)
    # the trained model followed the very same path as without averaging (own RNG stream)
    for e in range(1, 5):
        for k, v in plain.states[e].items():
            assert torch.equal(v, snaps.states[e][k]), (e, k)
    for k, p in t.model.named_parameters():
        mean = torch.stack([snaps.states[e][k] for e in (2, 3, 4)]).mean(0)
        assert torch.allclose(p, mean, atol=1e-6), k
    assert [r["swa_models"] for r in t.history] == [0, 1, 2, 3]
    # the averaged model is evaluated on the epochs the trainer evaluates
    assert [("swa_test_acc" in r) for r in t.history] == [False, True, False, True]
    # its batch-norm statistics were recomputed, not the trained model's
    assert not torch.equal(t.model[1].running_mean, snaps.states[4]["1.running_mean"])


def test_swa_bn_refresh_end_and_off():
    snaps, end = Snapshots(), WeightAveraging(2, bn_refresh="end")
    t_end = _fit([snaps, end])
    t_every = _fit([WeightAveraging(2)])
    for k, p in t_end.model.named_parameters():
        assert torch.equal(p, dict(t_every.model.named_parameters())[k]), k
    bn = t_end.model[1]
    assert not torch.equal(bn.running_mean, snaps.states[4]["1.running_mean"])
    t_off = _fit([snaps, WeightAveraging(2, bn_refresh="off")])
    # no pass: the statistics copied with the model at the first averaged epoch
    assert torch.equal(t_off.model[1].running_mean, snaps.states[2]["1.running_mean"])


def test_swa_without_an_averaged_epoch_keeps_the_trained_weights():
    snaps = Snapshots()
    t = _fit([snaps, WeightAveraging(9)])
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, snaps.states[4][k]), k


# ---- label smoothing ---------------------------------------------------------------------------
def fixed_logits() -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(6, dtype=torch.float64)[:, None]
    c = torch.arange(5, dtype=torch.float64)[None, :]
    z = (2.0 * torch.sin(0.9 * i + 0.5 * c * c) + 0.3 * c).float()
    return z, torch.tensor([0, 3, 4, 1, 2, 3])


# CrossEntropyLabelSmooth(5, epsilon=eps)(z, y) in the reference (SoTeacher's ce_soft on the
# smoothed targets printed the same values).
REF_LS = {0.1: 2.788412094116211, 0.25: 2.7252695560455322}


class Fixed(nn.Module):
    def __init__(self, z):
        super().__init__()
        self.register_buffer("z", z)

    def forward(self, x):
        return self.z


def smoothed_ce_float64(z, y, eps):
    out = 0.0
    C = z.shape[1]
    for row, label in zip(z.double().tolist(), y.tolist()):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        out += sum(((1 - eps) * (c == label) + eps / C) * (lse - v) for c, v in enumerate(row))
    return out / len(y)


@pytest.mark.parametrize("eps", sorted(REF_LS))
def test_label_smoothing_equals_the_reference_and_the_formula(eps):
    z, y = fixed_logits()
    obj = TeacherObjective(label_smoothing=eps)
    ce = obj(Fixed(z), torch.zeros(6, 1), y, torch.arange(6)).losses["ce"]
    assert float(ce) == pytest.approx(REF_LS[eps], rel=1e-6)
    assert float(ce) == pytest.approx(smoothed_ce_float64(z, y, eps), rel=1e-6)
    # the eps / (C - 1) convention (no mass on the label from eps) is a different number
    q = torch.full((6, 5), eps / 4, dtype=torch.float64)
    q[torch.arange(6), y] = 1 - eps
    other = float(-(q * z.double().log_softmax(1)).sum(1).mean())
    assert abs(other - float(ce)) > 1e-3


def test_label_smoothing_method_defaults_to_0_1_and_gradcheck():
    obj = build_teacher_objective("label_smoothing", {}, num_samples=6, num_classes=5,
                                  num_epochs=1)
    assert obj.label_smoothing == 0.1
    z, y = fixed_logits()
    z = z.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: obj(Fixed(t), torch.zeros(6, 1), y, torch.arange(6)).losses["ce"], (z,))
    with pytest.raises(ValueError, match="label_smoothing must be < 1"):
        TeacherObjective(label_smoothing=1.0)


# ---- temperature scaling, as the student sees it -----------------------------------------------
class TwoOut(nn.Module):
    """Logits and a feature from fixed weights."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.body(x))

    def forward_features(self, x, preact=False):
        f = self.body(x)
        return self.head(f), {"stages": [f], "pooled": f}


def test_a_temperature_scaled_teacher_gives_distillers_its_divided_logits():
    torch.manual_seed(0)
    inner, T, tau = TwoOut(), 2.5, 4.0
    teacher = TemperatureScaled(inner, T)
    x = inputs()
    with torch.no_grad():
        z = inner(x)
        logits, feats = teacher.forward_features(x)
        assert torch.equal(logits, z / T)
        assert torch.equal(feats["pooled"], inner.body(x))          # features unchanged
    student = nn.Linear(3, 5)
    kd = build_distiller("kd", teacher, {"temperature": tau, "ce_weight": 0.0, "kl_weight": 1.0})
    y = torch.zeros(13, dtype=torch.long)
    out = kd(student, x, y, torch.arange(13))
    with torch.no_grad():
        s = student(x)
    got = float(out.losses["kd"].detach())
    assert got == pytest.approx(float(kd_loss(s, z / T, tau)), rel=1e-6)
    # i.e. softmax(z / (T * tau)) against the student's softmax(s / tau), in float64
    p_t = (z.double() / (T * tau)).softmax(1)
    log_p_s = (s.double() / tau).log_softmax(1)
    expected = float((p_t * (p_t.log() - log_p_s)).sum(1).mean() * tau**2)
    assert got == pytest.approx(expected, rel=1e-5)


def test_swa_through_the_pipeline_saves_the_averaged_teacher(tmp_path):
    cfg = apply_overrides(load_config(), [
        "data.options.num_train=48", "data.options.num_test=16", "data.options.num_classes=3",
        "data.options.input_shape=[1, 16]", "teacher.train.epochs=2",
        "teacher.train.batch_size=16", "teacher.train.eval_every=0",
        "teacher.model.options.widths=[8, 16]"])
    data = build_data(cfg)
    model = run_teacher(cfg, data, tmp_path, method="swa", options={"swa_start": 1},
                        progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["swa_models"] for r in records] == [1, 2]
    assert "swa_test_acc" in records[-1] and "swa_test_acc" not in records[0]
    loaded = load_model(tmp_path)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(data.test.x[:4]), loaded(data.test.x[:4]))
