import json

import pytest
import torch
from torch import nn

from soteacher import ArrayDataset, IndexedDataset, NonFiniteLossError, Trainer, TrainSettings
from soteacher.engine.io import safe_torch_load
from soteacher.objective import Objective, StepOutput
from soteacher.teachers import build_teacher_objective


def make_data(n=40, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return ArrayDataset(x, y)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


class Jitter(nn.Module):
    def forward(self, x):
        return x + 0.1 * torch.randn_like(x)


def trainer(run_dir=None, epochs=4, resume=False, data=None, **kw):
    data = data or make_data()
    s = TrainSettings(epochs=epochs, batch_size=8, lr=0.1, milestones=[2], eval_every=1)
    obj = build_teacher_objective("soteacher", {"lipschitz_weight": 1e-3}, num_samples=len(data),
                                  num_classes=3, num_epochs=epochs)
    return Trainer(make_model(), obj, data, s, augment=Jitter(), seed=3, run_dir=run_dir,
                   resume=resume, progress=False, **kw)


def test_metrics_log_and_checkpoint_hold_the_whole_state(tmp_path):
    t = trainer(tmp_path, evaluate=lambda m: {"test_metric": 1.0})
    hist = t.fit()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4] and lines == hist
    assert all(r["stage"] == "main" for r in lines)       # no preliminary stage in this run
    for r in lines:
        assert r["loss"] == pytest.approx(r["loss_ce"] + r["loss_lipschitz"] + r["loss_consistency"])
        assert r["test_metric"] == 1.0
    assert lines[0]["loss_consistency"] == 0.0 and lines[1]["loss_consistency"] > 0
    assert lines[0]["lr"] == pytest.approx(0.1) and lines[2]["lr"] == pytest.approx(0.01)
    ckpt = safe_torch_load(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 4
    assert ckpt["init_epochs"] == 0 and ckpt["init_optimizer"] is None
    assert ckpt["stage"] == {"name": "main", "epochs_done": 4, "steps_done": 0}
    assert torch.equal(ckpt["objective"]["consistency.bank.bank"],
                       t.objective.consistency.bank.bank)
    assert {"model", "optimizer", "rng", "versions"} <= set(ckpt)
    weights = safe_torch_load(tmp_path / "model.pt")
    assert all(torch.equal(weights["state_dict"][k], v) for k, v in t.model.state_dict().items())


def test_resume_after_interruption_is_exact(tmp_path):
    full = trainer(tmp_path / "a")
    full.fit()

    interrupted = trainer(tmp_path / "b")
    original = interrupted._train_epoch

    def crash_at_3(epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return original(epoch)

    interrupted._train_epoch = crash_at_3
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert safe_torch_load(tmp_path / "b" / "checkpoint.pt")["epoch"] == 2
    # scramble the global RNG: the checkpoint must restore it
    torch.manual_seed(12345)
    resumed = trainer(tmp_path / "b", resume=True)
    resumed.fit()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert torch.equal(full.objective.consistency.bank.bank,
                       resumed.objective.consistency.bank.bank)
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == 4
    assert (tmp_path / "b" / "metrics.jsonl").read_text().count("\n") == 4


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(Exception, match="nothing to resume"):
        trainer(tmp_path, resume=True).fit()


class NanAtEpoch2(Objective):
    def forward(self, model, x, y, index):
        logits = model(x)
        bad = logits.sum() * float("nan") if self.epoch == 2 else logits.sum() * 0
        return StepOutput(logits, {"ce": nn.functional.cross_entropy(logits, y), "bad": bad})


def test_non_finite_loss_stops_with_epoch_step_and_term(tmp_path):
    data = make_data()
    t = Trainer(make_model(), NanAtEpoch2(), data, TrainSettings(epochs=3, batch_size=8),
                seed=0, run_dir=tmp_path, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1: bad=nan.*epoch 1"):
        t.fit()
    ckpt = safe_torch_load(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_generic_dataset_path_matches_in_memory_path():
    data = make_data()
    pairs = [(data.x[i], int(data.y[i])) for i in range(len(data))]
    a = trainer(epochs=2, data=data)
    a.fit()
    b = trainer(epochs=2, data=IndexedDataset(pairs))
    b.fit()
    for k, v in a.model.state_dict().items():
        assert torch.allclose(v.float(), b.model.state_dict()[k].float(), atol=1e-6), k


def test_batch_size_larger_than_dataset_is_refused():
    with pytest.raises(ValueError, match="larger than the training set"):
        Trainer(make_model(), build_teacher_objective("standard", num_samples=4, num_classes=3,
                                                      num_epochs=1),
                make_data(n=4), TrainSettings(epochs=1, batch_size=8), progress=False)


def test_single_sample_tail_batch_is_dropped():
    t = trainer(epochs=1, data=make_data(n=17))   # 17 = 2 * 8 + 1
    assert t.steps_per_epoch() == 2
    t.fit()


def test_learning_rate_schedules():
    from soteacher.engine.optim import learning_rate
    s = TrainSettings(epochs=240, lr=0.05, milestones=[150, 180, 210], gamma=0.1)
    got = [learning_rate(s, k) for k in (1, 150, 151, 180, 181, 211, 240)]
    assert got == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005, 0.00005, 0.00005])
    c = TrainSettings(epochs=4, lr=1.0, schedule="cosine")
    assert [learning_rate(c, k) for k in (1, 2, 3)] == pytest.approx([1.0, 0.5 * (1 + 2**-0.5), 0.5])


class CountAndAverage:
    """A callback with state: counts epochs and averages the first layer's weight."""

    def __init__(self):
        self.n, self.avg, self.ended = 0, None, False

    def on_epoch_end(self, trainer, epoch, record):
        w = trainer.model[0].weight.detach().clone()
        self.avg = w if self.avg is None else (self.avg * self.n + w) / (self.n + 1)
        self.n += 1
        record["callback_epochs"] = self.n

    def on_fit_end(self, trainer):
        self.ended = True

    def state_dict(self):
        return {"n": self.n, "avg": self.avg}

    def load_state_dict(self, state):
        self.n, self.avg = state["n"], state["avg"]


def test_callbacks_run_every_epoch_and_resume_with_their_state(tmp_path):
    cb = CountAndAverage()
    t = trainer(tmp_path, epochs=3, callbacks=[cb])
    original = t._train_epoch
    t._train_epoch = lambda e: (_ for _ in ()).throw(KeyboardInterrupt) if e == 3 else original(e)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert cb.n == 2 and not cb.ended
    cb2 = CountAndAverage()
    hist = trainer(tmp_path, epochs=3, resume=True, callbacks=[cb2]).fit()
    assert cb2.n == 3 and cb2.ended and [r["callback_epochs"] for r in hist] == [1, 2, 3]
    ref = CountAndAverage()
    trainer(tmp_path / "ref", epochs=3, callbacks=[ref]).fit()
    assert torch.equal(ref.avg, cb2.avg)


def test_an_interrupt_that_python_swallowed_stops_the_run_at_the_next_step(tmp_path):
    """Ctrl-C raises KeyboardInterrupt and flags the request: where the exception was lost (it
    landed in a finaliser, where Python only prints it), the next step stops the run."""
    from soteacher.engine.trainer import request_interrupt

    class SwallowOnce(Jitter):
        calls = 0

        def forward(self, x, *args, **kwargs):
            SwallowOnce.calls += 1
            if SwallowOnce.calls == 3:           # the third step: Ctrl-C, its exception lost
                request_interrupt()
            return super().forward(x, *args, **kwargs)

    t = trainer(tmp_path)
    t.augment = SwallowOnce()
    try:
        with pytest.raises(KeyboardInterrupt):
            t.fit()
    finally:
        request_interrupt(False)
    assert SwallowOnce.calls == 3                 # stopped before the fourth step
    assert not (tmp_path / "model.pt").exists()   # no final weights from an interrupted run
    assert trainer(tmp_path / "again", epochs=1).fit()   # the flag is cleared afterwards
