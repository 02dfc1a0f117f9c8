"""``soteacher experiment``: the grid end to end, restart-and-skip, and the report's arithmetic."""

import csv
import json
import sys

import pytest
import torch
import yaml

from soteacher.cli.main import main
from soteacher.config import ConfigError, ExperimentConfig, apply_overrides
from soteacher.experiment import (format_summary, mean_std, paired_differences, student_cells,
                                  teacher_variants, validate_experiment)
from soteacher.experiment.grid import format_value, model_pairs

GRID = {
    "seed": 0,
    "data": {"name": "known_truth", "val_fraction": 0.0,
             "options": {"num_classes": 4, "input_shape": [1, 16], "num_train": 100,
                         "num_test": 60, "seed": 0}},
    "teacher": {"model": {"name": "cnn1d", "options": {"widths": [8, 16]}},
                "train": {"epochs": 2, "batch_size": 20, "milestones": [], "eval_every": 0}},
    "student": {"model": {"name": "cnn1d_small"},
                "train": {"epochs": 1, "batch_size": 20, "milestones": [], "eval_every": 0}},
    "experiment": {"teachers": ["standard", "soteacher"], "distillers": ["kd"],
                   "seeds": [0, 1]},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    assert plots == ["reliability", "student_acc", "teacher_vs_student", "truth_distance"]
    weights = sorted(out.rglob("model.pt"))
    assert len(weights) == 8
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
