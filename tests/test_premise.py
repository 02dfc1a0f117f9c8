"""The premise panel: correlations, bootstrap intervals, seed agreement, premise.md."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from soteacher.experiment.layout import PREDICTIONS, RUN_FORMAT, SUMMARY
from soteacher.experiment.premise import (_resampled_ranks, bootstrap_ci, format_premise,
                                          pearson, premise_sentence, premise_table,
                                          seed_agreement, spearman)
from soteacher.experiment.report import read_results_csv, write_report


# ---- correlations against hand-computed values ----------------------------------------------
def test_pearson_and_spearman_by_hand():
    x, y = [1, 2, 3, 4], [1, 3, 2, 5]
    # centred: x (-1.5, -.5, .5, 1.5), y (-1.75, .25, -.75, 2.25): 5.5 / sqrt(5 * 8.75)
    assert pearson(x, y) == pytest.approx(5.5 / math.sqrt(43.75))
    # ranks of y (1, 3, 2, 4): sum d^2 = 2, rho = 1 - 6 * 2 / (4 * 15)
    assert spearman(x, y) == pytest.approx(0.8)
    # a tie shares the mean rank: x ranks (1, 2.5, 2.5, 4); r = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert pearson([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)


def test_resampled_ranks_average_ties_within_each_row():
    values = np.array([10.0, 20.0, 30.0])
    idx = np.array([[0, 0, 2, 1], [2, 2, 2, 1]])
    # row 0: 10, 10, 30, 20 -> 1.5, 1.5, 4, 3; row 1: 30, 30, 30, 20 -> 3, 3, 3, 1
    np.testing.assert_allclose(_resampled_ranks(values, idx),
                               [[1.5, 1.5, 4, 3], [3, 3, 3, 1]])


def test_constant_or_too_few_points_give_nan():
    assert math.isnan(pearson([1, 1, 1, 1], [1, 2, 3, 4]))
    assert math.isnan(spearman([1, 2, 3, 4], [5, 5, 5, 5]))
    assert math.isnan(pearson([1, 2], [2, 1]))
    assert all(math.isnan(v) for v in bootstrap_ci([1, 2], [2, 1]))
    assert all(math.isnan(v) for v in bootstrap_ci([1, 1, 1, 1], [1, 2, 3, 4], "spearman"))


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="equal length"):
        pearson([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="available: pearson, spearman"):
        bootstrap_ci([1, 2, 3], [1, 2, 3], "kendall")
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1, 2, 3], [1, 2, 3], level=95)


def test_bootstrap_contains_the_estimate_shrinks_with_n_and_is_reproducible():
    rng = np.random.default_rng(1)
    widths = {}
    for n in (20, 400):
        x = rng.normal(size=n)
        y = 0.5 * x + rng.normal(size=n)
        for method, stat in (("pearson", pearson), ("spearman", spearman)):
            lo, hi = bootstrap_ci(x, y, method, n_boot=1000, seed=3)
            assert lo <= stat(x, y) <= hi
            assert (lo, hi) == bootstrap_ci(x, y, method, n_boot=1000, seed=3)
            widths[n, method] = hi - lo
    for method in ("pearson", "spearman"):
        assert widths[400, method] < 0.5 * widths[20, method]


# ---- the table and its sentence -------------------------------------------------------------
def _grid(dataset="known_truth", tv=True, distillers=("kd",), seeds=(0, 1, 2)):
    """Student rows of 4 teacher variants: the students' accuracy is 0.9 - 0.5 * train TV;
    val_nll rises with the accuracy (against its direction), train_nll is symmetric in it."""
    rows = []
    for i, t in enumerate(["a", "b", "c", "d"]):
        for s in seeds:
            dist = 0.1 + 0.1 * i + 0.01 * s
            acc = 0.9 - 0.5 * dist
            metrics = {"teacher_val_nll": 0.2 + acc, "teacher_train_nll": (dist - 0.26) ** 2,
                       "teacher_val_acc": 0.8, "teacher_val_ece": 0.05}
            if tv:
                metrics["teacher_train_tv_true"] = dist
            for d in distillers:
                rows.append({"kind": "student", "dataset": dataset, "pair": "p-q", "teacher": t,
                             "distiller": d, "seed": s, "teacher_dir": f"t/{t}/{s}",
                             "student_test_acc": acc, **metrics})
    return rows


def test_students_linear_in_the_distance_give_minus_one_and_the_sentence_says_so():
    table = premise_table(_grid(), n_boot=200)
    by = {e["measure"]: e for e in table}
    tv = by["train_tv_true"]
    assert tv["run_n"] == 12 and tv["method_n"] == 4
    for key in ("run_pearson", "run_spearman", "method_pearson", "method_spearman"):
        assert tv[key] == pytest.approx(-1.0)
    assert tv["r2"] == pytest.approx(1.0)
    assert "train_kl_true" not in by                 # no column: no row
    assert math.isnan(by["conf_gap"]["run_pearson"])  # its metrics are missing
    assert by["val_nll"]["run_pearson"] == pytest.approx(1.0)
    sentence = premise_sentence(table)
    assert sentence.startswith("On known_truth with `kd`, the teachers' distance to p* on their "
                               "training inputs explains 100% of the variance")
    assert "Pearson -1.00 [-1.00, -1.00]" in sentence
    # val_nll goes the wrong way and no proxy goes the right one: said as it is
    assert ("no proxy that needs no p* has the sign its direction predicts: the strongest, "
            "val_nll (lower is better), has Pearson +1.00") in sentence
    assert "comes closest" not in sentence


def test_closest_proxy_is_the_strongest_with_the_right_sign():
    rows = _grid()
    for r in rows:      # train_nll (higher is better) now rises with the accuracy, weakly
        r["teacher_train_nll"] = r["student_test_acc"] + 0.01 * (-1) ** r["seed"]
    table = premise_table(rows, n_boot=200)
    best = {e["measure"]: e for e in table}["train_nll"]
    assert 0.9 < best["run_pearson"] < 1.0
    sentence = premise_sentence(table)
    assert f"train_nll comes closest ({best['run_pearson']:+.2f} [" in sentence
    # val_nll (+1.00) is stronger but has the wrong sign: not "closest", but said
    assert "; val_nll is related against its direction (lower is better; Pearson +1.00" in sentence


def test_no_proxy_reliably_related_is_said():
    rows = _grid()
    for r in rows:
        r["teacher_val_nll"] = 0.3      # constant: no correlation
    table = premise_table(rows, n_boot=500)
    # train_nll is (dist - 0.26)^2: symmetric around the middle of the distances
    assert "no proxy that needs no p* is reliably related" in premise_sentence(table)


def test_without_p_star_the_panel_has_no_truth_rows_and_says_so():
    table = premise_table(_grid(dataset="real", tv=False), n_boot=100)
    assert table and all(e["kind"] == "proxy" for e in table)
    text = format_premise(table, n_boot=100)
    assert "p* is not known for this data set" in text
    assert "train_tv_true** (p*)" not in text
    assert "On real with `kd`, p* is not known" in text
    # metrics the runs lack are named, not silently dropped
    assert "`conf_gap` (needs teacher_train_conf, teacher_val_conf)" in text


def test_one_table_and_sentence_per_distiller():
    text = format_premise(premise_table(_grid(distillers=("kd", "dkd")), n_boot=100))
    assert text.count("### Distiller") == 2
    assert "On known_truth with `kd`" in text and "On known_truth with `dkd`" in text


# ---- seed agreement from predictions.pt -----------------------------------------------------
def _save_predictions(path: Path, classes: list[int], num_classes: int = 3) -> None:
    path.mkdir(parents=True, exist_ok=True)
    probs = torch.full((len(classes), num_classes), 0.1)
    probs[torch.arange(len(classes)), torch.tensor(classes)] = 0.8
    torch.save({"test": probs.half()}, path / PREDICTIONS)


def test_seed_agreement_is_the_mean_pairwise_top1_agreement(tmp_path):
    for s, classes in enumerate([[0, 1, 2, 0], [0, 1, 2, 1], [0, 1, 1, 1]]):
        _save_predictions(tmp_path / f"s{s}", classes)
    # pairs: (0,1) 3/4, (0,2) 2/4, (1,2) 3/4
    value, n = seed_agreement(tmp_path, ["s0", "s1", "s2", "missing"])
    assert n == 3 and value == pytest.approx(2 / 3)
    assert math.isnan(seed_agreement(tmp_path, ["s0", "missing"])[0])


def test_seed_agreement_enters_the_table_at_method_level(tmp_path):
    rows, agreements, accs = [], [], []
    patterns = {"a": [[0, 1, 2, 0], [0, 1, 2, 0]],          # agree 1
                "b": [[0, 1, 2, 0], [0, 1, 2, 1]],          # 3/4
                "c": [[0, 1, 2, 0], [1, 2, 0, 0]]}          # 1/4
    for t, (acc, seeds) in zip(patterns, [(0.8, patterns["a"]), (0.7, patterns["b"]),
                                          (0.75, patterns["c"])]):
        for s, classes in enumerate(seeds):
            _save_predictions(tmp_path / t / str(s), classes)
            rows.append({"kind": "student", "dataset": "d", "pair": "p", "teacher": t,
                         "distiller": "kd", "seed": s, "teacher_dir": f"{t}/{s}",
                         "student_test_acc": acc + 0.01 * s})
        agreements.append(seed_agreement(tmp_path, [f"{t}/0", f"{t}/1"])[0])
        accs.append(acc + 0.005)
    assert agreements == pytest.approx([1.0, 0.75, 0.25])
    entry = {e["measure"]: e for e in premise_table(rows, tmp_path, n_boot=100)}["seed_agreement"]
    assert entry["run_n"] == 0 and math.isnan(entry["run_pearson"])
    assert entry["method_n"] == 3
    assert entry["method_pearson"] == pytest.approx(pearson(agreements, accs))
    # without the run directories it is not measured
    no_dir = {e["measure"]: e for e in premise_table(rows, n_boot=100)}["seed_agreement"]
    assert no_dir["method_n"] == 0


# ---- write_report on a tiny experiment directory --------------------------------------------
def _write_run(out: Path, rel: str, meta: dict, metrics: dict) -> None:
    (out / rel).mkdir(parents=True, exist_ok=True)
    (out / rel / SUMMARY).write_text(json.dumps({"format": RUN_FORMAT, **meta,
                                                 "metrics": metrics}))


def _experiment(out: Path, truth: bool) -> None:
    for i, t in enumerate(["standard", "soteacher", "label_smoothing"]):
        for s in range(3):
            tdir = f"toy/p-q/seed{s}/teachers/{t}"
            dist = 0.3 - 0.08 * i + 0.01 * s
            tm = {"test_acc": 0.9, "val_nll": 0.4 + 0.1 * s, "train_nll": 0.05 * i + 0.01 * s,
                  "train_conf": 0.99, "val_conf": 0.9 - 0.02 * i}
            if truth:
                tm["train_tv_true"] = dist
            meta = {"dataset": "toy", "pair": "p-q", "teacher": t, "teacher_method": t,
                    "teacher_options": {}, "seed": s, "teacher_dir": tdir}
            _write_run(out, tdir, {**meta, "kind": "teacher", "distiller": None,
                                   "student_dir": None}, tm)
            # variant i disagrees between seeds on i of 5 inputs: agreement 1, 0.8, 0.6
            _save_predictions(out / tdir, [0, 1, 2] + [s if i >= 1 else 0, s if i >= 2 else 0])
            sdir = f"toy/p-q/seed{s}/students/{t}/kd"
            _write_run(out, sdir, {**meta, "kind": "student", "distiller": "kd",
                                   "distiller_method": "kd", "distiller_options": {},
                                   "student_dir": sdir},
                       {"test_acc": 0.95 - 0.5 * dist})


def test_write_report_writes_the_premise_panel_and_its_plot(tmp_path):
    _experiment(tmp_path, truth=True)
    rep = write_report(tmp_path, plots=True)
    text = (tmp_path / "premise.md").read_text()
    assert rep["premise_md"] == tmp_path / "premise.md"
    assert "## toy — p-q" in text and "| **train_tv_true** (p*) | lower | 9 |" in text
    assert "On toy with `kd`, the teachers' distance to p* on their training inputs explains " \
           "100% of the variance" in text
    by = {e["measure"]: e for e in rep["premise"]}
    assert by["train_tv_true"]["run_pearson"] == pytest.approx(-1.0)
    assert by["conf_gap"]["run_n"] == 9
    # from the predictions.pt files: agreement falls linearly as the students' accuracy rises
    assert by["seed_agreement"]["method_n"] == 3
    assert by["seed_agreement"]["method_pearson"] == pytest.approx(-1.0)
    plot = tmp_path / "plots" / "premise__toy__p-q__kd.png"
    assert plot in rep["plots"] and plot.stat().st_size > 0
    # the same numbers from results.csv (no run directories needed except for seed agreement)
    again = premise_table(read_results_csv(tmp_path / "results.csv"), tmp_path)
    assert [(e["measure"], e["run_pearson"]) for e in again] == \
        [(e["measure"], e["run_pearson"]) for e in rep["premise"]]


def test_write_report_without_p_star(tmp_path):
    _experiment(tmp_path, truth=False)
    rep = write_report(tmp_path, plots=False)
    text = rep["premise_md"].read_text()
    assert "p* is not known for this data set" in text
    assert "train_tv_true" not in {e["measure"] for e in rep["premise"]}
    assert not (tmp_path / "plots").exists()


def test_the_oracles_students_are_left_out_of_the_correlations():
    rows = _grid()
    # p* itself: distance 0 but, here, the worst students; counted, it would break the line
    rows += [{"kind": "student", "dataset": "known_truth", "pair": "p-q", "teacher": "oracle",
              "teacher_method": "oracle", "distiller": "kd", "seed": s, "teacher_dir": f"o/{s}",
              "student_test_acc": 0.1, "teacher_train_tv_true": 0.0, "teacher_val_nll": 1.0,
              "teacher_train_nll": 1.0, "teacher_val_acc": 0.8, "teacher_val_ece": 0.05}
             for s in (0, 1, 2)]
    tv = {e["measure"]: e for e in premise_table(rows, n_boot=50)}["train_tv_true"]
    assert tv["run_n"] == 12 and tv["run_pearson"] == pytest.approx(-1.0)
