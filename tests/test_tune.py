"""``soteacher tune``: the Optuna study resumes, never reads test data, writes a loadable overlay,
and rejects bad input with the fix; trials of a few epochs on tiny known-truth data."""

import csv
import json
import shlex
import shutil
import sys

import pytest
import torch
import yaml

pytest.importorskip("optuna")

from soteacher import pipeline  # noqa: E402
from soteacher import tune as T  # noqa: E402
from soteacher.cli.main import main  # noqa: E402
from soteacher.config import (ConfigError, apply_overrides, config_to_dict,  # noqa: E402
                              load_config)
from soteacher.engine.trainer import NonFiniteLossError  # noqa: E402
from soteacher.experiment import datasets, runs  # noqa: E402
from conftest import load_benchmark  # noqa: E402
from soteacher.experiment.regimes import t_quantile  # noqa: E402

CFG = {
    "seed": 0,
    "data": {"name": "known_truth", "val_fraction": 0.2,
             "options": {"num_classes": 4, "input_shape": [1, 16], "num_train": 100,
                         "num_test": 60, "seed": 0}},
    "teacher": {"method": "soteacher", "options": {"lipschitz_weight": 1.0e-5},
                "model": {"name": "cnn1d", "options": {"widths": [8, 16]}},
                "train": {"epochs": 2, "batch_size": 20, "milestones": [], "eval_every": 0}},
    "student": {"model": {"name": "cnn1d_small"},
                "train": {"epochs": 1, "batch_size": 20, "milestones": [], "eval_every": 0}},
}
QUIET = dict(log=lambda m: None)


pytestmark = pytest.mark.usefixtures("one_thread")


def _write(tmp_path, name="cfg.yaml", **changes):
    cfg = json.loads(json.dumps(CFG))
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _config(tmp_path, **changes):
    return T.load_tune_config(_write(tmp_path, **changes))


def _rows(out):
    with (out / "trials.csv").open() as f:
        return list(csv.DictReader(f))


class Calls:
    """Wraps a function of ``module`` and records the keyword arguments of every call."""

    def __init__(self, monkeypatch, module, name, before=None):
        self.calls, self.fn, self.before = [], getattr(module, name), before
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        if self.before is not None:
            self.before(len(self.calls))
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def study2(tmp_path_factory):
    """A finished study of two trials (proxy val_nll) and its config file."""
    root = tmp_path_factory.mktemp("study2")
    path = _write(root)
    result = T.tune(T.load_tune_config(path), root / "out", n_trials=2, proxy="val_nll", **QUIET)
    return path, root / "out", result


# ---- resuming ----------------------------------------------------------------------------------
def test_more_trials_continue_the_study_without_rerunning_the_completed_ones(
        study2, tmp_path, monkeypatch):
    path, done2, first = study2
    out = tmp_path / "out"
    shutil.copytree(done2, out)
    before = {n: (out / "trials" / str(n) / "model.pt").stat().st_mtime_ns for n in (0, 1)}
    teachers = Calls(monkeypatch, pipeline, "run_teacher")
    result = T.tune(T.load_tune_config(path), out, n_trials=4, proxy="val_nll", **QUIET)
    assert result["completed"] == 4 and result["failed"] == 0
    assert len(teachers.calls) == 2                 # only trials 2 and 3 trained
    rows = _rows(out)
    assert [(r["number"], r["state"]) for r in rows] == [(str(n), "COMPLETE") for n in range(4)]
    for n in (0, 1):
        assert (out / "trials" / str(n) / "model.pt").stat().st_mtime_ns == before[n]
        assert float(rows[n]["value"]) == first["rows"][n]["value"]
    # a second call with the same number of trials trains nothing
    again = T.tune(T.load_tune_config(path), out, n_trials=4, proxy="val_nll", **QUIET)
    assert len(teachers.calls) == 2 and again["completed"] == 4

    # the sampler is seeded per trial: the resumed study equals an uninterrupted one
    whole = T.tune(T.load_tune_config(path), tmp_path / "whole", n_trials=4, proxy="val_nll",
                   **QUIET)
    assert [r["value"] for r in whole["rows"]] == [r["value"] for r in result["rows"]]
    assert ([r.get("consistency_weight") for r in whole["rows"]] ==
            [r.get("consistency_weight") for r in result["rows"]])


@pytest.mark.parametrize("how", ["ctrl_c", "killed"])
def test_an_interrupted_trial_is_retried_from_its_checkpoint(tmp_path, monkeypatch, how):
    path = _write(tmp_path)
    reference = T.tune(T.load_tune_config(path), tmp_path / "ref", n_trials=1, proxy="val_nll",
                       **QUIET)["best"]["value"]
    # interrupt the first trial's teacher after its first epoch's checkpoint
    from soteacher.engine.trainer import Trainer
    write = Trainer._write_checkpoint

    def interrupted_write(self):
        write(self)
        if self.epoch == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "_write_checkpoint", interrupted_write)
    if how == "killed":                      # a killed process leaves the trial RUNNING
        monkeypatch.setattr(T, "_mark_interrupted", lambda study, trial: None)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        T.tune(T.load_tune_config(path), out, n_trials=1, proxy="val_nll", **QUIET)
    assert (out / "trials" / "0" / "checkpoint.pt").is_file()
    assert not (out / "trials" / "0" / "model.pt").exists()
    import optuna
    study = optuna.load_study(study_name=T.STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")
    assert study.trials[0].state.name == ("FAIL" if how == "ctrl_c" else "RUNNING")

    monkeypatch.setattr(Trainer, "_write_checkpoint", write)
    teachers = Calls(monkeypatch, pipeline, "run_teacher")
    result = T.tune(T.load_tune_config(path), out, n_trials=1, proxy="val_nll", **QUIET)
    rows = _rows(out)
    assert [(r["number"], r["state"], r["retry_of"], r["error"]) for r in rows] == [
        ("0", "FAIL", "", "interrupted"), ("1", "COMPLETE", "0", "")]
    assert rows[1]["consistency_weight"] == rows[0]["consistency_weight"]   # same settings
    assert [c["resume"] for c in teachers.calls] == [True]      # continued, not restarted
    assert not (out / "trials" / "0").exists() and (out / "trials" / "1" / "model.pt").is_file()
    assert result["best"]["number"] == 1
    assert result["best"]["value"] == pytest.approx(reference, rel=1e-6)


def test_a_trial_with_a_non_finite_loss_fails_and_does_not_count(tmp_path, monkeypatch):
    real = T.run_trial
    calls = []

    def diverging_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise NonFiniteLossError("loss is nan at epoch 1, step 3")
        return real(*args, **kwargs)
    monkeypatch.setattr(T, "run_trial", diverging_first)
    out = tmp_path / "out"
    result = T.tune(_config(tmp_path), out, n_trials=1, proxy="val_acc", **QUIET)
    assert result["completed"] == 1 and result["failed"] == 1
    rows = _rows(out)
    assert rows[0]["state"] == "FAIL" and "NonFiniteLossError" in rows[0]["error"]
    assert result["best"]["number"] == 1

    def always(*args, **kwargs):
        raise NonFiniteLossError("loss is inf")
    monkeypatch.setattr(T, "run_trial", always)
    with pytest.raises(T.TuneFailed, match="3 trials in a row failed.*narrow tune.space"):
        T.tune(_config(tmp_path), out, n_trials=2, proxy="val_acc", **QUIET)
    assert [r["state"] for r in _rows(out)] == ["FAIL", "COMPLETE", "FAIL", "FAIL", "FAIL"]


# ---- test data ---------------------------------------------------------------------------------
class Poisoned(torch.utils.data.Dataset):
    """A test split that must not be read: any use is recorded and raises."""

    touched: list = []

    def __len__(self):
        Poisoned.touched.append("len")
        raise AssertionError("the test split was read")

    def __getitem__(self, i):
        Poisoned.touched.append("item")
        raise AssertionError("the test split was read")

    def __getattr__(self, name):
        if name in ("x", "y"):
            Poisoned.touched.append(name)
            raise AssertionError("the test split was read")
        raise AttributeError(name)


def test_tuning_never_reads_the_test_split(tmp_path, monkeypatch):
    import dataclasses
    real = runs.raw_data
    monkeypatch.setattr(datasets, "_RAW", {})
    monkeypatch.setattr(runs, "raw_data",
                        lambda spec: dataclasses.replace(real(spec), test=Poisoned()))
    Poisoned.touched.clear()
    with pytest.raises(AssertionError):            # the poison works where the test split is read
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
        pipeline.model_report(model, runs.grid_data(T.load_tune_config(_write(tmp_path))))
    Poisoned.touched.clear()
    result = T.tune(_config(tmp_path), tmp_path / "out", n_trials=2, **QUIET)  # student_val_acc
    assert Poisoned.touched == []
    assert result["completed"] == 2
    for row in result["rows"]:
        assert not [k for k in row if "test" in k]
        assert 0 <= row["student_val_acc"] <= 1 and row["value"] == row["student_val_acc"]
    summary = json.loads((tmp_path / "out" / "trials" / "0" / "summary.json").read_text())
    assert "val_nll" in summary["metrics"] and not [k for k in summary["metrics"] if "test" in k]
    # the training logs of the trials name the held-out split for what it is: val_*, no test_*
    logged = [json.loads(line) for log in (tmp_path / "out" / "trials").rglob("metrics.jsonl")
              for line in log.read_text().splitlines() if line.strip()]
    assert logged and any("val_acc" in r for r in logged)
    assert not [k for r in logged for k in r if k.startswith("test")]


# ---- outputs -----------------------------------------------------------------------------------
def test_best_yaml_is_a_config_overlay_of_the_best_trial(study2):
    path, out, result = study2
    best = result["best"]
    rows = {r["number"]: r for r in result["rows"]}
    want = min(rows.values(), key=lambda r: r["value"])          # val_nll: lower is better
    assert best["number"] == want["number"] and best["value"] == want["value"]

    base = load_config(path)
    tuned = T.apply_overlay(base, out / "best.yaml")
    assert tuned == T.trial_config(base, best["settings"])
    assert tuned.teacher.method == best["settings"]["method"]
    assert tuned.teacher.train.epochs == best["settings"]["epochs"]
    for k, v in best["settings"].items():
        if k not in ("method", "epochs"):
            assert tuned.teacher.options[k] == v
    # everything but the teacher's settings is the base config's
    assert tuned.student == base.student and tuned.data == base.data
    assert tuned.teacher.model == base.teacher.model
    assert load_config(out / "best_config.yaml") == tuned
    # the command-line form in best.yaml's header gives the same config
    line = next(l for l in (out / "best.yaml").read_text().splitlines() if "--set" in l)
    sets = [a for a in shlex.split(line.lstrip("# ")) if a != "--set"]
    assert apply_overrides(base, sets, notes=[]) == tuned
    # the trial's own run used exactly this config
    stored = yaml.safe_load((out / "trials" / str(best["number"]) / "config.yaml").read_text())
    assert stored["teacher"] == yaml.safe_load(yaml.safe_dump(
        config_to_dict(tuned)))["teacher"]


def test_overlay_with_an_unknown_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {methd: soteacher}\n")
    with pytest.raises(ConfigError, match="methd"):
        T.apply_overlay(load_config(_write(tmp_path)), bad)


# ---- the search space --------------------------------------------------------------------------
def test_trial_config_scales_milestones_and_the_step_start():
    cfg = load_config(None, ["teacher.train.epochs=40", "teacher.train.milestones=[20, 30]"])
    assert T.parse_space(cfg)["epochs"].choices == (20, 30, 40, 60)     # 0.5, 0.75, 1, 1.5 x 40
    c = T.trial_config(cfg, {"method": "soteacher", "epochs": 48,
                             "consistency_schedule": "step", "consistency_weight": 3.0})
    assert c.teacher.train.epochs == 48 and c.teacher.train.milestones == [24, 36]
    assert c.teacher.options["consistency_start_epoch"] == 10               # 50/240 of 48
    assert c.teacher.options["consistency_weight"] == 3.0
    assert c.teacher.options["lipschitz_weight"] == 1e-5                    # the config's
    assert cfg.teacher.train.epochs == 40                                  # not changed
    c = T.trial_config(cfg, {"method": "soteacher", "epochs": 2})
    assert c.teacher.train.milestones == [1]          # 20*2/40=1, 30*2/40=1.5->2 dropped (>= 2)
    s = T.trial_config(cfg, {"method": "standard", "epochs": 40})
    assert s.teacher.method == "standard" and s.teacher.options == {}      # SoTeacher's dropped
    # a start the config sets is kept
    own = apply_overrides(cfg, ["teacher.options.consistency_start_epoch=5"])
    assert T.trial_config(own, {"consistency_schedule": "step"}).teacher.options[
        "consistency_start_epoch"] == 5


def test_space_overrides_and_conditional_sampling():
    import optuna
    cfg = load_config(None)
    dims = T.parse_space(cfg, {"method": ["standard", "crl"], "epochs": None,
                               "crl_weight": {"low": 0.5, "high": 2.0}})
    assert set(dims) == {"method", "crl_weight"}      # SoTeacher's keys irrelevant: dropped
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        s = T.sample_settings(trial, dims, cfg)
        seen.add(s["method"])
        assert ("crl_weight" in s) == (s["method"] == "crl")     # standard has no crl_weight
        if "crl_weight" in s:
            assert 0.5 <= s["crl_weight"] <= 2.0
        study.tell(trial, 0.0)
    assert seen == {"standard", "crl"}
    fixed = T.parse_space(cfg, {"method": "soteacher", "consistency_weight": 2.0})
    assert fixed["consistency_weight"].suggest(None) == 2.0


@pytest.mark.parametrize("space, message", [
    ({"consistncy_weight": [1, 2]}, r"unknown key tune.space.consistncy_weight.*valid keys: "
                                    r"method, epochs, .*consistency_weight"),
    ({"method": ["standard"], "consistency_weight": [1.0]},
     "none of the teacher methods searched \\(standard\\) takes it"),
    ({"method": ["standrd"]}, "unknown teacher method 'standrd'; available: .*soteacher"),
    ({"consistency_weight": {"low": 10, "high": 1}}, "'low' \\(10\\) must be below 'high'"),
    ({"lipschitz_weight": {"low": 0, "high": 1, "log": True}}, "log range needs 'low' > 0"),
    ({"consistency_weight": {"low": 1, "hi": 2}}, "unknown key 'hi' in tune.space"),
    ({"consistency_weight": []}, "empty list"),
    ({"epochs": [10, 0]}, "epochs must be whole numbers >= 1"),
])
def test_bad_space_is_a_clear_error(space, message):
    with pytest.raises(ConfigError, match=message):
        T.parse_space(load_config(None), space)


# ---- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, changes, message", [
    ({"proxy": "test_acc"}, {}, "unknown proxy 'test_acc'; available: student_val_acc, val_nll"),
    ({"proxy": "train_tv_true"}, {}, "unknown proxy 'train_tv_true'.*need p\\* or test data"),
    ({"n_trials": 0}, {}, "number of trials must be a whole number >= 1"),
    ({"backend": "slurm"}, {}, "unknown tune backend 'slurm'; available: local, ray"),
    ({}, {"data__val_fraction": 0.0}, "set data.val_fraction \\(e.g. 0.1\\)"),
    ({"space": {"foo": [1, 2]}}, {}, "unknown key tune.space.foo"),
    ({}, {"tune__resources": {"cpu": 1}}, "unknown key 'cpu' in tune.resources"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, kwargs, changes, message):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        T.tune(_config(tmp_path, **changes), out, **kwargs, **QUIET)
    assert not out.exists()


def test_missing_ray_or_optuna_is_a_one_line_error_with_the_install_command(
        tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"^--backend ray needs Ray: pip install "
                                          r"'soteacher\[ray\]' \(or tune with --backend local\)$"):
        T.tune(_config(tmp_path), out, backend="ray", **QUIET)
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match=r"^soteacher tune needs Optuna: pip install "
                                          r"'soteacher\[tune\]'$"):
        T.tune(_config(tmp_path), out, **QUIET)
    assert not out.exists()


def test_a_study_of_another_config_is_not_continued(study2, tmp_path):
    path, done2, _ = study2
    out = tmp_path / "out"
    shutil.copytree(done2, out)
    with pytest.raises(ConfigError, match="holds a study of another config \\(proxy: 'val_nll' "
                                          "there, 'val_acc' now\\)"):
        T.tune(T.load_tune_config(path), out, n_trials=2, proxy="val_acc", **QUIET)
    with pytest.raises(ConfigError, match="config.teacher.train.epochs: 2 there, 3 now"):
        T.tune(T.load_tune_config(path, ["teacher.train.epochs=3"]), out, n_trials=2,
               proxy="val_nll", **QUIET)
    with pytest.raises(ConfigError, match="already holds a study"):
        T.tune(T.load_tune_config(path), out, n_trials=2, proxy="val_nll", resume=False,
               **QUIET)


class FakeRay:
    """The part of Ray that ``tune --backend ray`` uses, in this process: a task runs when the
    driver waits for it (oldest first); ``in_flight`` records how many were submitted at once."""

    class TaskError(Exception):
        def __init__(self, cause):
            super().__init__(str(cause))
            self.cause = cause

    def __init__(self):
        self.pending, self.in_flight, self.calls = [], [], []
        self.initialized = False

    def is_initialized(self):
        return self.initialized

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        self.initialized = True

    def shutdown(self):
        self.calls.append(("shutdown", {}))
        self.initialized = False

    def cluster_resources(self):
        return {"CPU": 2.0}

    def remote(self, fn):
        ray = self

        class Task:
            def options(self, **kwargs):
                ray.calls.append(("options", kwargs))
                return self

            def remote(self, *args):
                ref = FakeRay.Ref(fn, args)
                ray.pending.append(ref)
                ray.in_flight.append(len(ray.pending))
                return ref
        return Task()

    class Ref:
        def __init__(self, fn, args):
            self.fn, self.args = fn, args

    def wait(self, refs, num_returns=1):
        return [refs[0]], refs[1:]

    def get(self, ref):
        self.pending.remove(ref)
        try:
            return ref.fn(*ref.args)
        except Exception as e:
            raise FakeRay.TaskError(e) from None

    def cancel(self, ref):
        pass


def test_ray_backend_runs_k_trials_at_once_and_equals_the_local_study(
        study2, tmp_path, monkeypatch):
    path, _, local = study2
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    cfg = T.load_tune_config(path, ["tune.parallel=2", "tune.resources={cpus: 1}"])
    result = T.tune(cfg, tmp_path / "out", n_trials=2, proxy="val_nll", backend="ray", **QUIET)
    assert max(fake.in_flight) == 2                  # both trials submitted before either ended
    assert [r["value"] for r in result["rows"]] == [r["value"] for r in local["rows"]]
    assert result["best"]["number"] == local["best"]["number"]
    assert ("options", {"num_cpus": 1.0, "num_gpus": 0.0, "max_retries": 0}) in fake.calls
    assert fake.calls[0] == ("init", {"address": "local", "include_dashboard": False,
                                      "logging_level": "warning"})
    assert fake.calls[-1][0] == "shutdown"

    # a task whose loss diverges fails alone; any other error stops the study
    real = T._ray_trial

    def diverging(cfg, settings, proxy, run_dir, *rest):
        if run_dir.endswith("2"):
            raise NonFiniteLossError("loss is nan")
        return real(cfg, settings, proxy, run_dir, *rest)
    monkeypatch.setattr(T, "_ray_trial", diverging)
    result = T.tune(cfg, tmp_path / "out", n_trials=3, proxy="val_nll", backend="ray", **QUIET)
    assert [r["state"] for r in result["rows"]] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]

    def broken(*args):
        raise ValueError("a bug")
    monkeypatch.setattr(T, "_ray_trial", broken)
    with pytest.raises(ValueError, match="a bug"):
        T.tune(cfg, tmp_path / "out", n_trials=4, proxy="val_nll", backend="ray", **QUIET)
    assert fake.calls[-1][0] == "shutdown"


# ---- command line ------------------------------------------------------------------------------
def test_cli_tune(tmp_path, capsys):
    path = _write(tmp_path, tune={"space": {"method": ["soteacher"], "epochs": None}})
    out = tmp_path / "out"
    assert main(["tune", str(path), "--out", str(out), "--trials", "1", "--proxy", "val_acc",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "best: trial 0 (val_acc = " in printed and "method=soteacher" in printed
    assert (out / "best.yaml").is_file() and (out / "best_config.yaml").is_file()
    assert json.loads((out / "tune.json").read_text())["direction"] == "maximize"
    assert main(["tune", str(path), "--out", str(out), "--proxy", "nope"]) == 2
    assert "unknown proxy 'nope'" in capsys.readouterr().err


# ---- the benchmark's statistics ----------------------------------------------------------------
def _benchmark():
    return load_benchmark("tune_vs_default")


def test_benchmark_paired_interval_and_gap_closed():
    b = _benchmark()
    # differences 1, 2, 3: mean 2, sample sd 1, t(0.975, 2) = 4.3027 -> 2 +- 4.3027 / sqrt(3)
    s = b.paired([1.5, 2.0, 3.5], [0.5, 0.0, 0.5])
    assert s["mean"] == pytest.approx(2.0) and s["n"] == 3 and s["wins"] == 3
    assert s["low"] == pytest.approx(2 - 2.48417, abs=1e-4)
    assert s["high"] == pytest.approx(2 + 2.48417, abs=1e-4)
    assert t_quantile(30) == pytest.approx(2.042, abs=1e-3)     # the table it reads
    assert t_quantile(120) == pytest.approx(1.980, abs=1e-3)
    one = b.paired([0.7], [0.6])
    assert one["mean"] == pytest.approx(0.1) and one["low"] is None
    # standard 0.60, oracle 0.70, tuned 0.65: half the gap
    assert b.gap_closed(0.65, 0.60, 0.70) == pytest.approx(0.5)
    assert b.gap_closed(0.65, 0.60, 0.60) is None
