"""Teacher-training methods: every registered method trains, and each baseline's mechanics
(CRL, SWA, best-on-validation, temperature scaling, SFTN, the validation split) by hand."""

import json
import math
import types
import warnings

import pytest
import torch
from torch import nn

from soteacher import ArrayDataset, Trainer, TrainSettings
from soteacher.config import apply_overrides, load_config
from soteacher.engine.io import safe_torch_load
from soteacher.models import create_model
from soteacher.pipeline import build_data, load_model, run_teacher
from soteacher.teachers import callbacks as callbacks_module
from soteacher.teachers import (BestOnValidation, TemperatureFit, TemperatureScaled,
                                WeightAveraging, build_teacher_objective, crl_loss,
                                fit_temperature, list_teachers)
from soteacher.teachers.calibration import separates
from soteacher.teachers.crl import ConfidenceRanking, normalised_counts
from soteacher.teachers.sftn import SFTNObjective, branch_points

TINY = ["data.options.num_train=80", "data.options.num_test=40", "data.options.num_classes=4",
        "data.options.input_shape=[1, 16]", "data.val_fraction=0.25",
        "teacher.train.epochs=1", "teacher.train.batch_size=16", "teacher.train.eval_every=0",
        "teacher.model.options.widths=[8, 16]", "student.model.name=cnn1d_small",
        "student.model.options={}"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    cfg = apply_overrides(load_config(), TINY)
    return cfg, build_data(cfg)


# ---- every method ------------------------------------------------------------------------------
def test_all_methods_are_registered():
    assert {"standard", "soteacher", "lipschitz", "consistency", "label_smoothing", "crl", "swa",
            "early_stop", "temperature_scaled", "sftn"} <= set(list_teachers())


@pytest.mark.parametrize("method", list_teachers())
def test_every_method_trains_one_epoch_and_reloads(tmp_path, tiny, method):
    cfg, data = tiny
    model = run_teacher(cfg, data, tmp_path, method=method, options={}, progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and math.isfinite(json.loads(lines[0])["loss"])
    loaded = load_model(tmp_path)
    x = data.test.x[:5]
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)
    # whatever a method trains beside the teacher (SFTN's branches) is not in its weights
    plain = create_model(cfg.teacher.model.name, num_classes=4, input_shape=(1, 16),
                         **cfg.teacher.model.options)
    saved = safe_torch_load(tmp_path / "model.pt")["state_dict"]
    assert set(saved) == set(plain.state_dict())


@pytest.mark.parametrize("method", ["early_stop", "temperature_scaled"])
def test_methods_that_need_a_validation_split_say_how(tiny, method):
    cfg, data = tiny
    with pytest.raises(ValueError, match=r"set data.val_fraction=0.1"):
        build_teacher_objective(method, {}, num_samples=60, num_classes=4, num_epochs=1,
                                val_set=None)


def test_validation_split_is_seeded_disjoint_and_complete():
    base = apply_overrides(load_config(), TINY)
    a, b = build_data(base), build_data(base)
    other = build_data(apply_overrides(base, ["seed=1"]))
    assert len(a.train) == 60 and len(a.val) == 20
    assert torch.equal(a.val.x, b.val.x) and not torch.equal(a.val.x, other.val.x)
    full = build_data(apply_overrides(base, ["data.val_fraction=0.0"]))
    assert not hasattr(full, "val") or full.val is None
    rows = lambda t: sorted(map(tuple, t.flatten(1).tolist()))
    assert rows(torch.cat([a.train.x, a.val.x])) == rows(full.train.x)


# ---- CRL ---------------------------------------------------------------------------------------
def test_crl_loss_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25], [0.9, 0.05, 0.05]])
    c = torch.tensor([1.0, 0.5, 0.5])
    # pairs (0,1): relu(0.5 - 0.2) = 0.3; (1,2): equal counts -> 0; (2,0): relu(0.5 + 0.2) = 0.7
    assert float(crl_loss(p.log(), c)) == pytest.approx((0.3 + 0.0 + 0.7) / 3, abs=1e-6)
    # epoch 3: M = 2 (epochs completed), m = 0
    assert normalised_counts(torch.tensor([2.0, 1, 0, 1]), 3).tolist() == pytest.approx(
        [1, 1 / 2, 0, 1 / 2])
    # epoch 5: M = 4, m = 1
    assert normalised_counts(torch.tensor([4.0, 1, 2]), 5).tolist() == pytest.approx(
        [1, 0, 1 / 3])
    assert normalised_counts(torch.tensor([1.0, 1.0]), 1).tolist() == [0.0, 0.0]


def test_crl_counts_correct_predictions_and_combines_with_soteacher():
    crl = ConfidenceRanking(4)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    crl(logits, torch.tensor([0, 0, 0]), torch.tensor([3, 1, 0]), epoch=1)
    assert crl.counts.tolist() == [1.0, 0.0, 0.0, 1.0]
    obj = build_teacher_objective("soteacher", {"crl_weight": 0.5}, num_samples=8,
                                  num_classes=3, num_epochs=2)
    model = nn.Sequential(nn.Linear(5, 3))
    obj.set_epoch(2, 2)
    out = obj(model, torch.randn(8, 5), torch.randint(0, 3, (8,)), torch.arange(8))
    assert {"ce", "lipschitz", "consistency", "crl"} <= set(out.losses)
    assert "crl.counts" in obj.state_dict()          # checkpointed with the objective


def test_crl_weight_schedule_and_its_options():
    obj = build_teacher_objective("crl", {"crl_weight": 2.0}, num_samples=4, num_classes=2,
                                  num_epochs=60)
    assert obj.crl.schedule == "constant" and obj.crl.start_epoch == 50
    assert [obj.crl.weight_at(k) for k in (1, 50, 51)] == [2.0, 2.0, 2.0]
    obj = build_teacher_objective("crl", {"crl_weight": 2.0, "crl_schedule": "step"},
                                  num_samples=4, num_classes=2, num_epochs=60)
    assert [obj.crl.weight_at(k) for k in (1, 50, 51, 60)] == [0.0, 0.0, 2.0, 2.0]
    obj = build_teacher_objective("crl", {"crl_schedule": "linear"}, num_samples=4,
                                  num_classes=2, num_epochs=4)
    obj.set_epoch(2, 8)                           # the trainer's epoch count reaches the term
    assert obj.crl.weight_at(2) == pytest.approx(0.25)
    # the loss carries the scheduled weight: 0 until the step schedule switches on
    crl = ConfidenceRanking(3, weight=2.0, num_epochs=4, schedule="step", start_epoch=2)
    crl.counts.copy_(torch.tensor([0.0, 1.0, 0.0]))
    logits = torch.tensor([[3.0, 0.0], [0.0, 0.5], [1.0, 0.0]])
    crl.eval()
    assert float(crl(logits, torch.zeros(3, dtype=torch.long), torch.arange(3), 2)) == 0.0
    on = crl(logits, torch.zeros(3, dtype=torch.long), torch.arange(3), 3)
    assert float(on) == pytest.approx(2.0 * float(crl_loss(logits, normalised_counts(
        crl.counts, 3))), rel=1e-6) and float(on) > 0
    with pytest.warns(UserWarning, match="crl_start_epoch below 10"):
        build_teacher_objective("crl", {"crl_schedule": "step"}, num_samples=4, num_classes=2,
                                num_epochs=10)
    with pytest.raises(ValueError, match="unknown CRL schedule 'stp'; available"):
        build_teacher_objective("crl", {"crl_schedule": "stp"}, num_samples=4, num_classes=2,
                                num_epochs=10)
    with pytest.raises(ValueError, match="start_epoch is the number of epochs at weight 0"):
        build_teacher_objective("crl", {"crl_schedule": "step", "crl_start_epoch": -1},
                                num_samples=4, num_classes=2, num_epochs=10)


# ---- trainer-level helpers ---------------------------------------------------------------------
def _data(n=48, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g))


class Snapshots:
    """Keeps the model's parameters at the end of every epoch."""

    def __init__(self):
        self.params = {}

    def on_epoch_end(self, trainer, epoch, record):
        self.params[epoch] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _trainer(model, callbacks, epochs=3, run_dir=None, resume=False, data=None):
    s = TrainSettings(epochs=epochs, batch_size=8, lr=0.2, milestones=[], eval_every=0)
    obj = build_teacher_objective("standard", {}, num_samples=48, num_classes=3,
                                  num_epochs=epochs)
    return Trainer(model, obj, data or _data(), s, seed=1, progress=False, run_dir=run_dir,
                   resume=resume, callbacks=callbacks)


def _mlp(bn=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.ReLU(),
                                                                         nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def test_swa_average_is_the_mean_of_the_per_epoch_weights():
    snaps = Snapshots()
    t = _trainer(_mlp(), [snaps, WeightAveraging(start_epoch=2)], epochs=4)   # epochs 2, 3, 4
    t.fit()
    for name, p in t.model.named_parameters():
        expected = torch.stack([snaps.params[e][name] for e in (2, 3, 4)]).mean(0)
        assert torch.allclose(p, expected, atol=1e-6), name
    assert [r["swa_models"] for r in t.history] == [0, 1, 2, 3]


def test_swa_refreshes_batch_norm_and_resumes_exactly(tmp_path):
    data = _data()
    t = _trainer(_mlp(bn=True), [WeightAveraging(start_epoch=1)], data=data)
    t.fit()
    lin, bn = t.model[0], t.model[1]
    with torch.no_grad():
        h = lin(data.x)
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)   # 48 = 6 equal batches
    # interrupted after epoch 2, resumed: the same averaged weights and refreshed statistics
    ref = _trainer(_mlp(bn=True), [WeightAveraging(1)], run_dir=tmp_path / "ref")
    ref.fit()
    cut = _trainer(_mlp(bn=True), [WeightAveraging(1)], run_dir=tmp_path / "cut")
    orig = cut._train_epoch
    cut._train_epoch = lambda e: (_ for _ in ()).throw(KeyboardInterrupt) if e == 3 else orig(e)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    resumed = _trainer(_mlp(bn=True), [WeightAveraging(1)], run_dir=tmp_path / "cut",
                       resume=True)
    resumed.fit()
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_early_stop_restores_the_best_validation_epoch():
    snaps = Snapshots()
    val = _data(n=30, seed=5)
    best = BestOnValidation(val, metric="nll")
    t = _trainer(_mlp(), [snaps, best], epochs=5)
    t.fit()
    nll = [r["val_nll"] for r in t.history]
    epoch = 1 + nll.index(min(nll))
    assert best.best_epoch == epoch and t.history[-1]["best_epoch"] == epoch
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, snaps.params[epoch][k]), k
    assert all("val_acc" in r for r in t.history)


def _scripted_validation(monkeypatch, accs):
    """Make BestOnValidation see the validation accuracies ``accs``, one per epoch."""
    it = iter(accs)
    monkeypatch.setattr(callbacks_module, "evaluate",
                        lambda *a, **k: {"val_acc": next(it), "val_nll": 1.0, "val_ece": 0.0})


def test_early_stop_with_patience_stops_and_restores_the_best(monkeypatch, tmp_path):
    # best at epoch 2; epochs 3, 4, 5 bring nothing new: with patience 3, epoch 5 is the last
    _scripted_validation(monkeypatch, [0.5, 0.6, 0.55, 0.6, 0.59, 0.9, 0.9, 0.9])
    snaps = Snapshots()
    best = BestOnValidation(_data(n=8), metric="acc", patience=3)
    t = _trainer(_mlp(), [snaps, best], epochs=8, run_dir=tmp_path)
    t.fit()
    assert [r["epoch"] for r in t.history] == [1, 2, 3, 4, 5]
    assert t.history[-1]["stopped_early"] is True
    assert not any(r.get("stopped_early") for r in t.history[:-1])
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, snaps.params[2][k]), k
    # resumed from its checkpoint, the stopped run trains no further epoch
    _scripted_validation(monkeypatch, [])
    again = _trainer(_mlp(seed=3), [Snapshots(), BestOnValidation(_data(n=8), patience=3)],
                     epochs=8, run_dir=tmp_path, resume=True)
    again.fit()
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, snaps.params[2][k]), k


def test_early_stop_without_patience_runs_every_epoch(monkeypatch):
    _scripted_validation(monkeypatch, [0.9, 0.1, 0.1, 0.1, 0.1])
    t = _trainer(_mlp(), [BestOnValidation(_data(n=8))], epochs=5)
    t.fit()
    assert len(t.history) == 5 and t.history[-1]["best_epoch"] == 1


@pytest.mark.parametrize("patience", [0, -1, 1.5, True])
def test_early_stop_refuses_a_bad_patience(patience):
    with pytest.raises(ValueError, match="patience"):
        BestOnValidation(_data(n=8), patience=patience)


# ---- temperature scaling -----------------------------------------------------------------------
def test_fit_temperature_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    true_logits = 1.5 * torch.randn(20000, 5, generator=g)
    y = torch.multinomial(true_logits.softmax(1), 1, generator=g)[:, 0]
    for t_true in (0.5, 2.5):
        assert fit_temperature(true_logits * t_true, y) == pytest.approx(t_true, rel=0.05)


def test_separates_is_true_only_when_every_label_has_the_strictly_largest_logit():
    z = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    assert separates(z, torch.tensor([0, 1]))
    assert not separates(z, torch.tensor([0, 2]))
    assert not separates(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0]))      # a tie


def test_a_separated_validation_split_has_no_temperature_to_fit():
    z = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.5, 0.0, 1.0]])
    y = torch.tensor([0, 1, 2])
    assert fit_temperature(z, y) == pytest.approx(1e-3)       # the search's end, meaningless
    # with one error among them there is a finite optimum
    t = fit_temperature(z, torch.tensor([0, 1, 0]))
    assert 1e-3 < t < 1e3


def test_temperature_fit_keeps_1_when_the_validation_split_is_separated():
    x = torch.eye(3).repeat(4, 1) * 5.0
    val = ArrayDataset(x, x.argmax(1))
    trainer = types.SimpleNamespace(model=nn.Identity(), device=torch.device("cpu"),
                                    preprocess=None, model_spec={"name": "m"})
    fit = TemperatureFit(val)
    with pytest.warns(UserWarning, match="keeping temperature 1"):
        fit.on_fit_end(trainer)
    assert fit.temperature == 1.0 and trainer.model_spec["temperature"] == 1.0
    # one wrong label: a real fit, no warning
    y = x.argmax(1).clone()
    y[0] = 1
    trainer.model_spec = {"name": "m"}
    fit = TemperatureFit(ArrayDataset(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit.on_fit_end(trainer)
    assert fit.temperature == pytest.approx(fit_temperature(x, y))
    assert fit.temperature != 1.0


def test_temperature_travels_with_the_saved_teacher(tmp_path, tiny):
    cfg, data = tiny
    model = run_teacher(cfg, data, tmp_path, method="temperature_scaled", options={},
                        progress=False)
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    t = blob["spec"]["temperature"]
    assert isinstance(t, float) and t > 0
    loaded = load_model(tmp_path)
    assert isinstance(model, TemperatureScaled) and isinstance(loaded, TemperatureScaled)
    assert float(loaded.temperature) == pytest.approx(t)
    x = data.test.x[:4]
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), loaded.model(x) / t, atol=1e-6)
        logits, feats = loaded.forward_features(x)
        assert torch.allclose(logits, loaded(x), atol=1e-6) and len(feats["stages"]) == 2
    assert loaded.input_shape == loaded.model.input_shape     # attributes of the inner model


# ---- SFTN --------------------------------------------------------------------------------------
def test_sftn_branch_points():
    assert branch_points(3, 3) == [(1, 1), (2, 2)]
    assert branch_points(2, 2) == [(1, 1)]
    assert branch_points(4, 2) == [(2, 1)]
    with pytest.raises(ValueError, match="at least 2 stages"):
        branch_points(3, 1)


def test_sftn_trains_branches_with_the_teacher_and_refuses_other_models():
    teacher = create_model("cnn1d", num_classes=3, input_shape=(1, 16), widths=(8, 16, 16))
    build = lambda student, **kw: build_teacher_objective(
        "sftn", {"student_model": student, **kw}, num_samples=8, num_classes=3, num_epochs=1,
        input_shape=(1, 16), model=teacher)
    obj = build("mlp", student_options={"widths": [12, 6]})     # 1-D conv features -> vectors
    assert isinstance(obj, SFTNObjective) and len(obj.branches) == 1
    out = obj(teacher, torch.randn(8, 1, 16), torch.randint(0, 3, (8,)), torch.arange(8))
    assert set(out.losses) == {"ce", "branch_ce", "branch_kl"}
    sum(out.losses.values()).backward()
    assert teacher.stages[0].body[0].weight.grad is not None
    assert all(p.grad is not None for p in obj.branches[0].adapter.parameters())
    assert len(build("cnn1d", student_options={"widths": [4, 4, 4]}).branches) == 2
    with pytest.raises(ValueError, match="needs the student architecture"):
        build_teacher_objective("sftn", {}, num_samples=8, num_classes=3, num_epochs=1,
                                input_shape=(1, 16), model=teacher)
    with pytest.raises(ValueError, match="feature contract"):
        build_teacher_objective("sftn", {"student_model": "cnn1d_small"}, num_samples=8,
                                num_classes=3, num_epochs=1, input_shape=(1, 16),
                                model=nn.Sequential(nn.Flatten(), nn.Linear(16, 3)))
