"""``soteacher experiment``: the grid end to end, restart-and-skip, and the report's arithmetic."""

import csv
import json
import sys

import pytest
import yaml

from soteacher.cli.main import main
from soteacher.config import (ConfigError, ExperimentConfig, apply_overrides,
                              load_experiment_config)
from soteacher.experiment import (format_summary, mean_std, paired_differences, student_cells,
                                  teacher_variants, validate_experiment)
from soteacher.experiment.grid import format_value, model_pairs
from conftest import tiny_grid

GRID = tiny_grid(["standard", "soteacher"], seeds=[0, 1])


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, **experiment):
    grid = json.loads(json.dumps(GRID))
    grid["experiment"].update(experiment)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_tiny_grid_end_to_end_then_restart_trains_nothing(tmp_path, capsys, monkeypatch):
    cfg, out = _config(tmp_path), tmp_path / "out"
    assert main(["experiment", str(cfg), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Difference to the `standard` teacher" in printed

    rows = list(csv.DictReader((out / "results.csv").open()))
    teachers = [r for r in rows if r["kind"] == "teacher"]
    students = [r for r in rows if r["kind"] == "student"]
    assert len(teachers) == 4 and len(students) == 4
    assert {(r["teacher"], r["seed"]) for r in students} == {
        (t, s) for t in ("standard", "soteacher") for s in ("0", "1")}
    for r in students:
        assert r["dataset"] == "known_truth" and r["pair"] == "cnn1d-cnn1d_small"
        assert r["distiller"] == "kd"
        for key in ("teacher_test_acc", "teacher_test_nll", "teacher_test_ece",
                    "teacher_train_tv_true", "student_test_acc", "student_test_nll",
                    "student_test_ece", "student_test_agreement"):
            assert 0 <= float(r[key]) < 10, key
        # every student names its teacher's run, which holds that teacher's weights
        tdir = out / r["teacher_dir"]
        assert (tdir / "model.pt").is_file()
        summary = json.loads((out / r["student_dir"] / "summary.json").read_text())
        assert summary["teacher_dir"] == r["teacher_dir"]
        teacher_summary = json.loads((tdir / "summary.json").read_text())
        assert teacher_summary["teacher"] == r["teacher"] == summary["teacher"]
        assert summary["teacher_run"] == teacher_summary["teacher_run"]
        assert float(r["teacher_test_acc"]) == pytest.approx(
            teacher_summary["metrics"]["test_acc"])
    summary_md = (out / "summary.md").read_text()
    assert "`soteacher`" in summary_md and "(2)" in summary_md
    plots = sorted(p.name.split("__")[0] for p in (out / "plots").glob("*.png"))
    assert plots == ["premise", "reliability", "student_acc", "teacher_vs_student",
                     "truth_distance"]
    assert "explains" in (out / "premise.md").read_text()
    weights = sorted(out.rglob("model.pt"))
    assert len(weights) == 8
    status = json.loads((out / "known_truth" / "status.json").read_text())
    assert (status["state"], status["backend"], status["counts"]["finished"]) == \
        ("finished", "local", 8)
    assert [r["state"] for r in status["runs"]] == ["finished"] * 8
    assert not list(out.rglob(".lock"))
    stamps = {p: p.stat().st_mtime_ns for p in weights}

    # a second run finds everything finished: nothing trains, nothing is rewritten
    def no_training(self):
        raise AssertionError("the restarted experiment trained a model")

    monkeypatch.setattr("soteacher.engine.trainer.Trainer.fit", no_training)
    assert main(["experiment", str(cfg), "--out", str(out), "--quiet", "--no-plots"]) == 0
    assert {p: p.stat().st_mtime_ns for p in weights} == stamps
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 8

    # a changed config never reuses the runs made with the old one
    capsys.readouterr()
    assert main(["experiment", str(cfg), "--out", str(out), "--quiet",
                 "--set", "teacher.train.epochs=3"]) == 2
    assert "teacher.train.epochs: 2 here, 3 asked for" in capsys.readouterr().err


def test_unfinished_student_is_retrained_and_the_report_remade(tmp_path, monkeypatch):
    cfg = _config(tmp_path, teachers=["standard"], seeds=[0])
    out = tmp_path / "out"
    assert main(["experiment", str(cfg), "--out", str(out), "--quiet", "--no-plots"]) == 0
    student = next(out.rglob("students/standard/kd"))
    (student / "summary.json").unlink()         # as if killed before it finished
    calls = []
    from soteacher.engine.trainer import Trainer
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: calls.append(self.run_dir) or fit(self))
    assert main(["experiment", str(cfg), "--out", str(out), "--quiet", "--no-plots"]) == 0
    assert calls == [student]                   # only the student, resumed from its checkpoint
    assert (student / "summary.json").is_file()
    assert main(["experiment", "--report-only", "--out", str(out), "--no-plots"]) == 0
    status = json.loads((out / "known_truth" / "status.json").read_text())
    assert (status["counts"]["finished"], status["counts"]["before"]) == (2, 1)

    # a student begun from another instance of its teacher starts over, not from its checkpoint
    (student / "summary.json").unlink()
    origin = json.loads((student / "teacher.json").read_text())
    (student / "teacher.json").write_text(json.dumps({**origin, "teacher_run": "earlier"}))
    resumed = []
    monkeypatch.setattr(Trainer, "fit", lambda self: resumed.append(self.resume) or fit(self))
    assert main(["experiment", str(cfg), "--out", str(out), "--quiet", "--no-plots"]) == 0
    assert resumed == [False]
    assert json.loads((student / "teacher.json").read_text()) == origin


def test_grid_expansion_sweep_names_and_errors():
    cfg = apply_overrides(ExperimentConfig(), [
        "experiment.teachers=[standard, soteacher, {method: soteacher, name: so+crl, "
        "options: {crl_weight: 1.0}}]",
        "experiment.sweep={lipschitz_weight: [2.0e-6, 1.0e-5], consistency_schedule: [step]}",
        "experiment.sweep_teachers=[soteacher, so+crl]"])
    names = [v.name for v in teacher_variants(cfg.experiment)]
    assert names == ["standard",
                     "soteacher[lipschitz_weight=2e-6,consistency_schedule=step]",
                     "soteacher[lipschitz_weight=1e-5,consistency_schedule=step]",
                     "so+crl[lipschitz_weight=2e-6,consistency_schedule=step]",
                     "so+crl[lipschitz_weight=1e-5,consistency_schedule=step]"]
    v = teacher_variants(cfg.experiment)[3]
    assert v.options == {"crl_weight": 1.0, "lipschitz_weight": 2e-6,
                         "consistency_schedule": "step"}
    assert format_value(1e-10) == "1e-10" and format_value(0.5) == "0.5"
    pairs = model_pairs(cfg.base(), apply_overrides(cfg, [
        "experiment.pairs=[{teacher: cnn1d, student: {name: mlp, options: {widths: [8]}}}]"
    ]).experiment)
    assert pairs[0].name == "cnn1d-mlp" and pairs[0].student.options == {"widths": [8]}

    # bare names take the run config's options for that method
    cfg = apply_overrides(ExperimentConfig(), [
        "teacher.method=soteacher", "teacher.options={lipschitz_weight: 3.0e-6}",
        "distill.method=kd", "distill.options={temperature: 2.0}",
        "experiment.teachers=[standard, soteacher]", "experiment.distillers=[kd, dkd]"])
    variants, distillers, _ = validate_experiment(cfg)
    assert [v.options for v in variants] == [{}, {"lipschitz_weight": 3e-6}]
    assert [d.options for d in distillers] == [{"temperature": 2.0}, {}]

    bad = [
        ("experiment.teachers=[standard, standard]", "appears twice"),
        ("experiment.teachers=[standrd]", "unknown teacher method 'standrd'"),
        ("experiment.teachers=[{method: soteacher, options: {lipshitz_weight: 1}}]",
         "unknown option.*'lipshitz_weight'"),
        ("experiment.distillers=[kdd]", "unknown distiller 'kdd'"),
        ("experiment.seeds=[]", "experiment.seeds is empty"),
        ("experiment.sweep={lipschitz_weight: 1.0}", "must be a non-empty list"),
        ("experiment.teachers=[standard, early_stop]", "set data.val_fraction=0.1"),
        ("experiment.teachers=[standard, sftn]", None),          # valid
    ]
    for override, message in bad:
        c = apply_overrides(ExperimentConfig(), [override])
        if message is None:
            validate_experiment(c)
            continue
        with pytest.raises(ConfigError, match=message):
            validate_experiment(c)


# ---- the summary's arithmetic on fixed inputs ----------------------------------------------------
def _row(teacher, seed, acc, distiller="kd"):
    return {"kind": "student", "dataset": "d", "pair": "p", "teacher": teacher,
            "distiller": distiller, "seed": seed, "student_test_acc": acc}


def test_summary_statistics_by_hand():
    assert mean_std([1, 2, 3, 4]) == pytest.approx((2.5, 1.2909944487, 4))
    assert mean_std([5.0]) == (5.0, None, 1)
    assert paired_differences({0: 0.5, 1: 0.7, 3: 0.9}, {0: 0.4, 1: 0.8, 2: 0.1}) == \
        pytest.approx([0.1, -0.1])
    rows = ([_row("standard", s, a) for s, a in enumerate([0.70, 0.72, 0.74])]
            + [_row("soteacher", s, a) for s, a in enumerate([0.71, 0.75, 0.74, 0.90])])
    cells = {c["teacher"]: c for c in student_cells(rows)}
    base, so = cells["standard"], cells["soteacher"]
    assert (base["n"], base["mean"], base["std"]) == pytest.approx((3, 0.72, 0.02))
    assert base["diff_mean"] is None and base["diff_n"] == 0
    # soteacher: mean of 4 seeds; paired only on seeds 0..2: diffs 0.01, 0.03, 0.00
    assert (so["n"], so["mean"]) == pytest.approx((4, 0.775))
    # deviations from 0.775: -0.065, -0.025, -0.035, 0.125; squares sum to 0.0217
    assert so["std"] == pytest.approx((0.0217 / 3) ** 0.5)
    # deviations from 0.04/3: -1/300, 5/300, -4/300; squares sum to 42/90000
    assert (so["diff_n"], so["diff_mean"], so["diff_std"]) == pytest.approx(
        (3, 0.04 / 3, (42 / 90000 / 2) ** 0.5))
    assert so["diff_ahead"] == 2 and base["diff_ahead"] is None     # seed 2 is a tie
    md = format_summary(rows)
    assert "| `standard` | 72.00 ± 2.00 (3) |" in md
    assert "| `soteacher` | 77.50 ± 8.50 (4) |" in md
    assert "| `soteacher` | +1.33 ± 1.53 (3) |" in md


def test_plots_without_matplotlib_say_how_to_install(monkeypatch):
    from soteacher.experiment.plots import make_plots
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"pip install 'soteacher\[plot\]'"):
        make_plots(".", [_row("standard", 0, 0.5)], "plots")


def test_results_csv_round_trip_and_partial_rerun_merge(tmp_path):
    from soteacher.experiment.report import merge_rows, read_results_csv, write_results_csv

    def row(kind, teacher, distiller, seed, acc):
        r = {"kind": kind, "dataset": "d", "pair": "a-b", "teacher": teacher,
             "teacher_method": teacher, "teacher_options": {"w": 1.0}, "distiller": distiller,
             "distiller_method": distiller, "distiller_options": None, "seed": seed,
             "teacher_dir": f"t{seed}", "student_dir": None, "teacher_test_acc": 0.5}
        if kind == "student":
            r["student_test_acc"] = acc
        return r

    old = [row("teacher", "standard", None, 0, None), row("student", "standard", "kd", 0, 0.6),
           row("student", "standard", "fitnet", 0, 0.1)]
    write_results_csv(old, tmp_path / "results.csv")
    back = read_results_csv(tmp_path / "results.csv")
    assert back[1]["student_test_acc"] == 0.6 and back[1]["seed"] == 0
    assert back[0]["teacher_options"] == {"w": 1.0} and back[0]["distiller"] is None
    assert back[0].get("student_test_acc") is None
    new = [row("student", "standard", "fitnet", 0, 0.7)]
    merged = merge_rows(new, back)
    fitnet = [r for r in merged if r["distiller"] == "fitnet"]
    assert len(merged) == 3 and len(fitnet) == 1 and fitnet[0]["student_test_acc"] == 0.7
    assert [r["kind"] for r in merged] == ["teacher", "student", "student"]


def test_previous_rows_first_csv_wins_and_drop_rules_need_every_column(tmp_path):
    from soteacher.experiment.report import read_previous, write_results_csv

    def row(dataset, teacher, distiller, acc):
        return {"kind": "student", "dataset": dataset, "pair": "a-b", "teacher": teacher,
                "teacher_method": teacher, "teacher_options": None, "distiller": distiller,
                "distiller_method": distiller, "distiller_options": None, "seed": 0,
                "teacher_dir": "t", "student_dir": "s", "student_test_acc": acc}

    rerun = [row("d1", "crl", "fitnet", 0.9)]
    old = [row("d1", "crl", "fitnet", 0.1), row("d1", "lip", "fitnet", 0.2),
           row("d1", "lip", "kd", 0.3), row("d2", "lip", "fitnet", 0.4)]
    write_results_csv(rerun, tmp_path / "rerun.csv")
    write_results_csv(old, tmp_path / "old.csv")
    rows = read_previous([tmp_path / "rerun.csv", tmp_path / "old.csv"])
    assert sorted((r["dataset"], r["teacher"], r["distiller"], r["student_test_acc"])
                  for r in rows) == [("d1", "crl", "fitnet", 0.9), ("d1", "lip", "fitnet", 0.2),
                                     ("d1", "lip", "kd", 0.3), ("d2", "lip", "fitnet", 0.4)]
    # a rule drops the rows matching all of its columns, nothing else
    kept = read_previous([tmp_path / "rerun.csv", tmp_path / "old.csv"],
                         drop=[{"dataset": "d1", "teacher": "lip", "distiller": "fitnet"}])
    assert sorted(r["student_test_acc"] for r in kept) == [0.3, 0.4, 0.9]
    kept = read_previous([tmp_path / "old.csv"], drop=[{"seed": "0", "distiller": "kd"}])
    assert sorted(r["student_test_acc"] for r in kept) == [0.1, 0.2, 0.4]
    with pytest.raises(ValueError, match="no column distiler"):
        read_previous([tmp_path / "old.csv"], drop=[{"distiler": "kd"}])


# ---- backends, locks and progress, without Ray ----------------------------------------------------
def test_execution_keys_are_checked_before_anything_runs():
    from soteacher.experiment.grid import run_resources
    spec = apply_overrides(ExperimentConfig(), ["experiment.resources={gpus: 0.25}"]).experiment
    assert run_resources(spec) == {"cpus": 1.0, "gpus": 0.25}
    bad = [
        ("experiment.backend=slurm", "unknown experiment.backend 'slurm'; available: local, ray"),
        ("experiment.resources={cpu: 1}", "unknown key 'cpu' in experiment.resources"),
        ("experiment.resources={gpus: -1}", "must be a number >= 0"),
        ("experiment.resources={cpus: 1.5}", "a fraction below 1 or a whole number"),
        ("experiment.retries=-1", "experiment.retries must be a whole number >= 0"),
        ("experiment.address=head:6379", "add --backend ray"),
    ]
    for override, message in bad:
        with pytest.raises(ConfigError, match=message):
            validate_experiment(apply_overrides(ExperimentConfig(), [override]))
    cuda = apply_overrides(ExperimentConfig(), ["experiment.backend=ray", "device=cuda"])
    with pytest.raises(ConfigError, match="experiment.resources.gpus=1"):
        run_resources(cuda.experiment, cuda.device)


def test_ray_backend_without_ray_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)       # import ray fails
    code = main(["experiment", str(_config(tmp_path)), "--out", str(tmp_path / "out"),
                 "--backend", "ray", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err == ("soteacher experiment: error: --backend ray needs Ray: pip install "
                   "'soteacher[ray]' (or run the grid with --backend local)")
    assert not (tmp_path / "out").exists()


def test_ray_instance_and_slots_without_starting_ray():
    from soteacher.experiment.ray_backend import _init, slots

    class FakeRay:
        def __init__(self, up=False):
            self.up, self.calls = up, []

        def is_initialized(self):
            return self.up

        def init(self, **kwargs):
            self.calls.append(kwargs)

    local, cluster, connected = FakeRay(), FakeRay(), FakeRay(up=True)
    assert _init(local, None) and local.calls[0]["address"] == "local"   # a new local instance
    assert _init(cluster, "head:6379") and cluster.calls[0]["address"] == "head:6379"
    assert not _init(connected, "head:6379") and connected.calls == []   # the caller's Ray
    # 8 GPUs, 32 CPUs: one run per GPU -> 8 at once; a quarter GPU each -> 32, CPU-bound
    machine = {"CPU": 32.0, "GPU": 8.0}
    assert slots(machine, {"cpus": 1, "gpus": 1}, 100) == 8
    assert slots(machine, {"cpus": 1, "gpus": 0.25}, 100) == 32
    assert slots(machine, {"cpus": 2, "gpus": 0.25}, 100) == 16
    assert slots(machine, {"cpus": 1, "gpus": 0}, 10) == 10
    assert slots({"CPU": 2.0}, {"cpus": 1, "gpus": 1}, 10) == 0


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    import os
    import subprocess
    from soteacher.experiment.lock import RunLock, RunLockedError
    path = tmp_path / "run" / ".lock"
    with RunLock(path, owner="task-a"):
        assert json.loads(path.read_text())["owner"] == "task-a"
        with pytest.raises(RunLockedError, match=f"being trained by process {os.getpid()}"):
            RunLock(path, owner="task-b").acquire()
        again = RunLock(path, owner="task-a")       # a later attempt of the same task
        again.acquire()
        again.release()
    assert not path.exists()
    # a holder that died: on this host, a process that is gone; elsewhere, a lock not touched
    gone = subprocess.Popen(["true"])
    gone.wait()
    for holder, age in [({"host": __import__("socket").gethostname(), "pid": gone.pid}, 0),
                        ({"host": "another-machine", "pid": 1}, 1000)]:
        path.write_text(json.dumps({**holder, "owner": "x"}))
        os.utime(path, (path.stat().st_mtime - age,) * 2)
        with RunLock(path, owner="task-c"):
            assert json.loads(path.read_text())["owner"] == "task-c"
    path.write_text(json.dumps({"host": "another-machine", "pid": 1, "owner": "x"}))
    with pytest.raises(RunLockedError, match="another-machine"):
        RunLock(path).acquire()                     # touched just now: alive


def test_progress_counts_estimate_and_status_file(tmp_path):
    from soteacher.experiment import GridFailed, plan_grid
    from soteacher.experiment.progress import GridProgress, estimate_left, format_duration
    # 3 teachers and 4 students waiting, a teacher 10 s into its mean of 30 s, a student
    # past its mean of 6 s; two slots: (3*30 + 4*6 + 20 + 0) / 2
    assert estimate_left({"teacher": 3, "student": 4}, {"teacher": [10.0], "student": [9.0]},
                         {"teacher": 30.0, "student": 6.0}, 2) == pytest.approx(67.0)
    assert estimate_left({"student": 2}, {}, {"teacher": 30.0}, 1) == 60.0   # borrowed mean
    assert estimate_left({"teacher": 1}, {}, {}, 1) is None
    assert [format_duration(s) for s in (0.42, 45, 192, 7500, None)] == \
        ["0.4s", "45s", "3m12s", "2h05m", "?"]

    cfg = load_experiment_config(_config(tmp_path))
    root, runs = plan_grid(cfg, tmp_path / "out")
    assert [r.kind for r in runs] == ["teacher", "student"] * 4
    assert runs[1].teacher_dir == runs[0].run_dir
    now = [0.0]
    lines = []
    p = GridProgress(runs, root, tmp_path / "out", "ray", lines.append, slots=2,
                     clock=lambda: now[0])
    p.before(runs[0])
    p.start(runs[2], host="h1", node="n1")
    now[0] = 30.0
    p.finish(runs[2], {"state": "new", "seconds": 30.0})
    p.start(runs[4], host="h2", node="n2")
    now[0] = 40.0
    p.fail(runs[4], RuntimeError("out of memory\ntraceback..."))
    p.unrun(runs[5], "its teacher failed")
    assert p.counts() == {"total": 8, "finished": 2, "before": 1, "running": 0, "waiting": 4,
                          "failed": 1, "unrun": 1}
    # 5 waiting when it failed: one teacher (30 s) and four students (no mean yet: 30 s) / 2
    assert lines[-1] == ("[2/8 finished, 0 running, 5 waiting, 1 failed; 40s, about 1m15s left] "
                         "cnn1d-cnn1d_small seed 1: teacher standard: FAILED: RuntimeError: out "
                         "of memory")
    status = json.loads((root / "status.json").read_text())
    assert status["state"] == "running" and status["eta_s"] == 60.0   # its student now unrun
    assert status["runs"][4]["error"] == "RuntimeError: out of memory"
    assert status["runs"][4]["node"] == "n2"

    e = GridFailed([("t", "RuntimeError: x; after 3 attempt(s)")], ["s1", "s2"], {"finished": 5})
    assert str(e) == ("1 run(s) of the grid failed: t (RuntimeError: x; after 3 attempt(s)). "
                      "left unrun because their teacher failed: s1; s2. the other 5 runs "
                      "finished; fix the cause and start the same command again (finished runs "
                      "are kept, interrupted ones resume)")


def test_ray_extra_is_pinned_and_installed_by_dev():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11+")
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert [d.split(">=")[0] for d in extras["ray"]] == ["ray"]
    assert any("ray" in d for d in extras["dev"] if d.startswith("soteacher["))
    pins = [line for line in (root / "constraints.txt").read_text().splitlines()
            if line.startswith("ray==")]
    assert len(pins) == 1


def test_experiment_modules_import_each_other_without_a_circle():
    """Plan (grid), runs, scheduling and reporting are separate steps: the imports between the
    package's modules, those inside functions included, form no cycle."""
    import ast
    from pathlib import Path
    import soteacher.experiment as pkg
    folder = Path(pkg.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        graph[path.stem] = {node.module for node in ast.walk(tree)
                            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    assert {"grid", "runs", "schedule", "report", "stats", "plots", "progress"} <= set(graph)
    assert "plots" in graph["report"] and "ray_backend" in graph["schedule"]   # seen, lazy

    def visit(name, seen):
        assert name not in seen, " -> ".join([*seen, name])
        for dep in graph.get(name, ()):
            visit(dep, [*seen, name])

    for name in graph:
        visit(name, [])
