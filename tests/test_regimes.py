"""The regime map: statistics against hand-computed values, the conclusion sentences, the
report files, and benchmarks/regimes.py end to end on a tiny grid."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from pathlib import Path

import pytest

from conftest import load_benchmark
from soteacher.config import ConfigError
from soteacher.experiment.regimes import (Cell, Factor, bootstrap_ratio, cell_stats,
                                          factor_sentence, format_regimes_report, regime_stats,
                                          seed_values, t_interval, t_quantile, verdict,
                                          write_regimes)


def _bench():
    return load_benchmark("regimes")


def _rows(values: dict[str, list[float]], dataset: str = "d", distiller: str = "kd",
          seeds: list[int] | None = None) -> list[dict]:
    rows = []
    for teacher, vals in values.items():
        for i, v in enumerate(vals):
            rows.append({"kind": "student", "dataset": dataset, "pair": "p", "teacher": teacher,
                         "distiller": distiller, "seed": (seeds or list(range(len(vals))))[i],
                         "student_test_acc": v})
    return rows


# ---- t quantiles and intervals ------------------------------------------------------------------
def test_t_quantile_reads_the_table_and_interpolates_in_one_over_df():
    assert t_quantile(1) == 12.7062
    assert t_quantile(9) == 2.2622
    # between df 30 (2.0423) and 40 (2.0211), linear in 1/df: w = (1/30 - 1/35) / (1/30 - 1/40)
    w = (1 / 30 - 1 / 35) / (1 / 30 - 1 / 40)
    assert t_quantile(35) == pytest.approx(2.0423 + w * (2.0211 - 2.0423), abs=1e-12)
    assert t_quantile(35) == pytest.approx(2.0301, abs=2e-4)        # the exact quantile
    assert 1.96 < t_quantile(1000) < 1.9623 + 1e-3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="degrees of freedom"):
            t_quantile(bad)


def test_t_interval_by_hand():
    # mean 3, sample sd sqrt(14/3), half width t(3) * sd / sqrt(4)
    r = t_interval([1.0, 2.0, 3.0, 6.0])
    half = 3.1824 * math.sqrt(14 / 3) / 2
    assert r["n"] == 4 and r["mean"] == 3.0
    assert r["sd"] == pytest.approx(math.sqrt(14 / 3))
    assert (r["lo"], r["hi"]) == (pytest.approx(3 - half), pytest.approx(3 + half))
    one = t_interval([0.5])
    assert one["n"] == 1 and one["mean"] == 0.5 and math.isnan(one["lo"])
    assert t_interval([])["n"] == 0


def test_verdict_needs_the_whole_interval_on_one_side():
    assert verdict(0.1, 0.3) == "helps"
    assert verdict(-0.3, -0.1) == "hurts"
    assert verdict(-0.1, 0.3) == "no detectable effect"
    assert verdict(0.0, 0.3) == "no detectable effect"
    assert verdict(math.nan, math.nan) == "no detectable effect"


# ---- gap closed ---------------------------------------------------------------------------------
def test_bootstrap_ratio_by_hand():
    # two items: resamples {1,1} (p 1/4) -> 0.5, mixed (1/2) -> 1.0, {3,3} (1/4) -> 1.5
    r = bootstrap_ratio([1.0, 3.0], [2.0, 2.0], n_boot=4000)
    assert r["ratio"] == 1.0 and r["undefined"] == 0.0
    assert (r["lo"], r["hi"]) == (0.5, 1.5)
    # a constant ratio has a zero-width interval
    c = bootstrap_ratio([0.01, 0.02, 0.03], [0.02, 0.04, 0.06])
    assert c["ratio"] == pytest.approx(0.5) and c["lo"] == pytest.approx(0.5)
    assert c["hi"] == pytest.approx(0.5)


def test_bootstrap_ratio_undefined_and_unbounded():
    assert math.isnan(bootstrap_ratio([0.1, 0.2], [-0.1, 0.05])["ratio"])     # mean gap < 0
    r = bootstrap_ratio([0.1, 0.1, 0.1], [0.3, -0.1, 0.05])                  # mean gap > 0
    assert r["ratio"] == pytest.approx(0.1 / (0.25 / 3))
    assert r["undefined"] > 0.025 and (r["lo"], r["hi"]) == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="paired"):
        bootstrap_ratio([1.0], [1.0, 2.0])


def test_cell_stats_on_constructed_rows():
    rows = _rows({"standard": [0.50, 0.52, 0.54, 0.60], "soteacher": [0.52, 0.53, 0.57],
                  "oracle": [0.56, 0.56, 0.58]})
    s = cell_stats(rows, Cell("fam", "f", "x", "d"), "kd")
    # seed 3 has no SoTeacher student: 3 pairs, gains 0.02, 0.01, 0.03
    assert s["n"] == 3 and s["gain"] == pytest.approx(0.02)
    assert s["gain_sd"] == pytest.approx(0.01)
    half = 4.3027 * 0.01 / math.sqrt(3)
    assert s["gain_lo"] == pytest.approx(0.02 - half) and s["gain_hi"] == pytest.approx(0.02 + half)
    assert (s["ahead"], s["behind"], s["tied"]) == (3, 0, 0)
    assert s["verdict"] == "no detectable effect"                 # lo < 0 with 3 seeds
    assert s["treated_mean"] == pytest.approx(0.54) and s["baseline_mean"] == pytest.approx(0.52)
    # oracle gaps 0.06, 0.04, 0.04: gap closed 0.02 / (0.14 / 3)
    assert s["oracle_gap"] == pytest.approx(0.14 / 3)
    assert s["gap_closed"] == pytest.approx(0.02 / (0.14 / 3))
    assert s["gap_closed_lo"] <= s["gap_closed"] <= s["gap_closed_hi"]


def test_the_oracle_students_may_come_from_another_experiment():
    rows = (_rows({"standard": [0.5, 0.5], "soteacher": [0.51, 0.52]}, dataset="wide")
            + _rows({"oracle": [0.54, 0.53]}, dataset="base"))
    cell = Cell("fam", "teacher_widths", "wide", "wide", oracle_dataset="base")
    s = cell_stats(rows, cell)
    assert s["oracle_n"] == 2 and s["oracle_gap"] == pytest.approx(0.035)
    assert s["gap_closed"] == pytest.approx(0.015 / 0.035)
    no_oracle = cell_stats(rows, Cell("fam", "f", "wide", "wide", oracle=None))
    assert no_oracle["oracle_n"] == 0 and math.isnan(no_oracle["gap_closed"])


def test_two_rows_for_one_seed_are_an_error():
    rows = _rows({"standard": [0.5, 0.6]}, seeds=[0, 0])
    with pytest.raises(ValueError, match="own experiment name"):
        seed_values(rows, "d", "standard", "kd")


# ---- words --------------------------------------------------------------------------------------
def _factor_stats(sign: float) -> list[dict]:
    base = [0.50, 0.51, 0.52, 0.50, 0.49]
    rows = []
    for level, shift in (("small", 0.02), ("large", 0.0)):
        noise = [0.001, -0.001, 0.002, 0.0, -0.002] if shift else [0.01, -0.012, 0.004, -0.003,
                                                                     0.002]
        rows += _rows({"standard": base,
                       "soteacher": [b + sign * shift + e for b, e in zip(base, noise)]},
                      dataset=level)
    cells = [Cell("fam", "size", "small", "small", oracle=None),
             Cell("fam", "size", "large", "large", oracle=None, is_base=True)]
    return regime_stats(rows, cells)


def test_the_conclusion_sentence_flips_with_the_sign():
    up, down = _factor_stats(+1.0), _factor_stats(-1.0)
    assert [s["verdict"] for s in up] == ["helps", "no detectable effect"]
    assert [s["verdict"] for s in down] == ["hurts", "no detectable effect"]
    s_up, s_down = factor_sentence(up, "Size"), factor_sentence(down, "Size")
    assert s_up.startswith("Size, KD students, 5 paired seeds per level: SoTeacher helps at "
                           "small (+2.00 points, 95% CI +1")
    assert "has no detectable effect at large" in s_up and "hurts" not in s_up
    assert "SoTeacher hurts at small (-2.00 points" in s_down and "helps" not in s_down
    assert s_up.endswith(".") and s_up.count(". ") == 0        # one sentence
    flat = factor_sentence([up[1]], "Size")
    assert "no detectable effect at the level tested (large; gain" in flat


def test_report_has_one_sentence_per_factor_and_the_table():
    stats = _factor_stats(+1.0)
    text = format_regimes_report(stats, [Factor("size", "Training-set size")])
    conclusions = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(conclusions) == 1 and conclusions[0].startswith("- Training-set size, KD")
    assert "| **large** (base) | 5 |" in text and "| helps |" in text
    assert "no finished paired runs" in factor_sentence(
        regime_stats([], [Cell("fam", "size", "a", "a")], distillers=["kd"]), "Size")


def test_write_regimes_writes_the_files(tmp_path):
    pytest.importorskip("matplotlib")
    stats_rows = []
    for level in ("a", "b"):
        stats_rows += _rows({"standard": [0.5, 0.52, 0.51], "soteacher": [0.51, 0.53, 0.53],
                             "oracle": [0.55, 0.56, 0.55]}, dataset=level)
    cells = [Cell("fam", "size", "a", "a", x=250.0), Cell("fam", "size", "b", "b", x=1000.0,
                                                         is_base=True)]
    r = write_regimes(stats_rows, cells, [Factor("size", "size", log_x=True)], tmp_path,
                      intro=["Intro line."])
    for name in ("report.md", "regimes.csv", "results.csv"):
        assert (tmp_path / name).is_file()
    assert sorted(p.name for p in r["figures"].values()) == [
        "fam__kd__heatmap_gain.png", "fam__kd__heatmap_gap.png", "fam__kd__size.png"]
    report = (tmp_path / "report.md").read_text()
    assert "Intro line." in report and "(fam__kd__size.png)" in report
    csv_lines = (tmp_path / "regimes.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("family,distiller,factor,level")


# ---- the benchmark ------------------------------------------------------------------------------
TINY = """
seed: 0
device: cpu
data:
  name: known_truth
  options: {num_classes: 3, input_shape: [1, 8], latent_dim: 2, num_train: 48, num_test: 40,
            seed: 0, separation: 1.15}
  augment: false
teacher:
  method: soteacher
  options: {}
  model: {name: cnn1d, options: {widths: [4]}}
  train: {epochs: 2, batch_size: 16, milestones: [1], eval_every: 0}
student:
  model: {name: cnn1d, options: {widths: [2]}}
  train: {epochs: 1, batch_size: 16, milestones: [], eval_every: 0}
distill: {method: kd, options: {}}
experiment:
  teachers: [standard, soteacher]
  distillers: [kd]
  seeds: [0, 1]
regimes:
  oracle: ORACLE
  families: {known_truth: {}}
  factors:
    num_train: {label: Training-set size, key: data.options.num_train, values: [24, 48],
                log: true, hold: steps}
    teacher_widths: {label: Teacher width, key: teacher.model.options.widths,
                     values: [[4], [6]], x: teacher_params}
    consistency_weight: {label: lambda_CR, option: consistency_weight, values: [1.0, 3.0],
                         log: true}
"""


def _tiny_config(tmp_path: Path, oracle: str = "oracle") -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY).replace("ORACLE", oracle))
    return path


def test_the_plan_shares_the_base_and_scales_epochs(tmp_path):
    bench = _bench()
    # a stand-in for the oracle teacher that every version has, to check the plan's sharing
    spec = bench.load_spec(_tiny_config(tmp_path, oracle="label_smoothing"))
    plan = bench.build_plan(spec, tmp_path / "out")
    assert list(plan.experiments) == ["known_truth.base", "known_truth.num_train=24",
                                      "known_truth.teacher_widths=6"]
    base = plan.experiments["known_truth.base"]
    names = [t if isinstance(t, str) else t["name"] for t in base.experiment.teachers]
    assert names == ["standard", "soteacher", "label_smoothing",
                     "soteacher[consistency_weight=3]"]
    small = plan.experiments["known_truth.num_train=24"]
    # the steps held: half the samples, twice the epochs, milestones alike
    assert (small.teacher.train.epochs, small.teacher.train.milestones) == (4, [2])
    assert small.student.train.epochs == 2 and small.data.options["num_train"] == 24
    assert small.experiment.teachers == ["standard", "soteacher", "label_smoothing"]
    wide = plan.experiments["known_truth.teacher_widths=6"]
    assert wide.experiment.teachers == ["standard", "soteacher"]     # oracle from the base
    cells = {(c.factor, c.level): c for c in plan.cells}
    assert cells["num_train", "48"].dataset == "known_truth.base" and cells["num_train",
                                                                             "48"].is_base
    assert cells["num_train", "24"].note == "teacher 4 / student 2 epochs"
    assert cells["teacher_widths", "6"].oracle_dataset == "known_truth.base"
    assert cells["consistency_weight", "3"].treated == "soteacher[consistency_weight=3]"
    assert cells["consistency_weight", "1"].is_base
    assert cells["teacher_widths", "4"].x < cells["teacher_widths", "6"].x    # parameters
    est = bench.estimate(plan, tmp_path / "out", spec.cost)
    assert est["runs"] == 2 * (4 + 4) + 2 * (3 + 3) + 2 * (2 + 2) and est["done"] == 0
    assert est["seconds"] > 0


def test_the_plan_without_an_oracle_and_bad_configs(tmp_path):
    bench = _bench()
    spec = bench.load_spec(_tiny_config(tmp_path, oracle="no_such_teacher"))
    plan = bench.build_plan(spec, tmp_path / "out", factors=["num_train"])
    assert all(c.oracle is None for c in plan.cells)
    assert any("no 'no_such_teacher' teacher" in n for n in plan.notes)
    with pytest.raises(ConfigError, match="unknown factor 'nope'"):
        bench.build_plan(spec, tmp_path / "out", factors=["nope"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(_tiny_config(tmp_path).read_text().replace(
        "key: teacher.model.options.widths", "key: teacher.model.options.kernel_size"))
    with pytest.raises(ConfigError, match="does not set teacher.model.options.kernel_size"):
        bench.build_plan(bench.load_spec(bad), tmp_path / "out2")


def test_the_tiny_benchmark_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bench = _bench()
    out, docs = tmp_path / "out", tmp_path / "docs"
    r = bench.main(["--config", str(_tiny_config(tmp_path)), "--out", str(out), "--docs",
                    str(docs), "--backend", "local", "--threads", "1", "--factors", "num_train",
                    "consistency_weight"])
    printed = capsys.readouterr()
    assert "runs (0 finished already)" in printed.err and "CPU-hours" in printed.err
    stats = r["stats"]
    assert [(s["factor"], s["level"]) for s in stats] == [
        ("num_train", "24"), ("num_train", "48"), ("consistency_weight", "1"),
        ("consistency_weight", "3")]
    assert all(s["n"] == 2 for s in stats)
    cfg = r["plan"].experiments["known_truth.base"]
    if bench.oracle_available(cfg, "standard", "oracle"):       # the students of p* itself
        assert all(s["oracle_n"] == 2 and not math.isnan(s["oracle_gap"]) for s in stats)
    report = (docs / "report.md").read_text()
    assert [line.split(",")[0] for line in bench.conclusions(report)] == [
        "- Training-set size", "- lambda_CR"]
    assert (docs / "known_truth__kd__heatmap_gain.png").is_file()
    # a second start skips every finished run; --report-only remakes the same numbers
    again = bench.main(["--config", str(_tiny_config(tmp_path)), "--out", str(out), "--docs",
                        str(tmp_path / "docs2"), "--report-only", "--no-plots", "--factors",
                        "num_train", "consistency_weight"])
    assert [s["gain"] for s in again["stats"]] == [s["gain"] for s in stats]
    # a fresh --out with the first map's results.csv as --previous: the experiments it covers
    # (all of them) are not run again, and the report has the same numbers
    fresh = tmp_path / "fresh"
    third = bench.main(["--config", str(_tiny_config(tmp_path)), "--out", str(fresh), "--docs",
                        str(tmp_path / "docs3"), "--backend", "local", "--no-plots",
                        "--factors", "num_train", "consistency_weight",
                        "--previous", str(docs / "results.csv")])
    assert "not run again" in capsys.readouterr().err
    assert not list(fresh.rglob("summary.json"))
    assert [s["gain"] for s in third["stats"]] == [s["gain"] for s in stats]
    # with a factor the CSV does not cover, only that factor's experiment runs
    fourth = bench.main(["--config", str(_tiny_config(tmp_path)), "--out", str(fresh),
                         "--docs", str(tmp_path / "docs4"), "--backend", "local", "--no-plots",
                         "--threads", "1", "--factors", "num_train", "teacher_widths",
                         "--previous", str(docs / "results.csv")])
    ran = {p.relative_to(fresh).parts[0] for p in fresh.rglob("summary.json")}
    assert ran == {"known_truth.teacher_widths=6"}
    assert [s["gain"] for s in fourth["stats"]][:2] == [s["gain"] for s in stats][:2]


def test_min_epochs_floors_the_held_steps_and_is_checked(tmp_path):
    bench = _bench()
    spec = bench.load_spec(_tiny_config(tmp_path, oracle="label_smoothing"))
    base = bench.build_plan(spec, tmp_path / "out").experiments["known_truth.base"]
    f = next(f for f in spec.factors if f.name == "num_train")
    # twice the base's 48 samples: half the epochs, teacher 2 -> 1, student 1 -> max(1, 0) = 1
    over, note = bench._level_overrides(base, f, 96)
    assert "teacher.train.epochs=1" in over and note == "teacher 1 / student 1 epochs"
    floored = dataclasses.replace(f, min_epochs=(("student", 3), ("teacher", 2)))
    over, note = bench._level_overrides(base, floored, 96)
    assert "teacher.train.epochs=2" in over and "student.train.epochs=3" in over
    assert note.startswith("teacher 2 / student 3 epochs (the min_epochs floor")
    # a level whose scaled epochs reach the floor keeps them: 24 samples, teacher 4, student 2
    over, note = bench._level_overrides(base, dataclasses.replace(f, min_epochs=(
        ("student", 2), ("teacher", 2))), 24)
    assert "teacher.train.epochs=4" in over and "student.train.epochs=2" in over
    assert "floor" not in note
    bad = textwrap.dedent(TINY).replace("ORACLE", "oracle").replace(
        "values: [[4], [6]], x: teacher_params}",
        "values: [[4], [6]], x: teacher_params, min_epochs: {teacher: 2}}")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(ConfigError, match="min_epochs must go with hold: steps"):
        bench.load_spec(tmp_path / "bad.yaml")
