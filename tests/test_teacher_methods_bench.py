"""benchmarks/teacher_methods.py's condensed table, on rows built by hand."""

from __future__ import annotations

from conftest import load_benchmark


def _rows(dataset: str, teachers: dict[str, tuple[list[float], list[float]]]) -> list[dict]:
    """``teachers``: name -> (teacher test accuracies, KD student test accuracies), by seed."""
    rows = []
    for name, (own, students) in teachers.items():
        for seed, (t_acc, s_acc) in enumerate(zip(own, students)):
            common = {"dataset": dataset, "pair": "a-b", "teacher": name, "seed": seed}
            rows.append({**common, "kind": "teacher", "distiller": None,
                         "teacher_test_acc": t_acc, "teacher_train_ece": 0.01})
            rows.append({**common, "kind": "student", "distiller": "kd",
                         "student_test_acc": s_acc})
    return rows


def test_overview_pairs_with_the_baseline_and_survives_a_data_set_without_it():
    bench = load_benchmark("teacher_methods")
    rows = (_rows("full", {"soteacher": ([0.60, 0.62], [0.55, 0.51]),
                           "standard": ([0.58, 0.60], [0.50, 0.52])})
            # a partial rerun: this data set has no standard teacher
            + _rows("partial", {"crl": ([0.90, 0.92], [0.80, 0.84])}))
    table = bench.overview(rows, "standard", ["standard", "soteacher", "crl"], ["kd"])
    lines = table.splitlines()
    full = lines[lines.index("### full (2 seeds)"):lines.index("### partial (2 seeds)")]
    body = [line for line in full if line.startswith("| `")]
    # the baseline first, whatever the rows' order; differences by hand:
    # seed 0 +0.05, seed 1 -0.01 -> mean +0.02 points x 100 = +2.00, std 0.0424 -> 4.24, 1 ahead
    assert body[0].startswith("| `standard` | 59.00 ± 1.41 |")
    assert body[1] == ("| `soteacher` | 61.00 ± 1.41 | 0.010 ± 0.000 | 53.00 ± 2.83 | "
                       "+2.00 ± 4.24 (1/2) |")
    partial = lines[lines.index("### partial (2 seeds)"):]
    assert [line for line in partial if line.startswith("| `")] == [
        "| `crl` | 91.00 ± 1.41 | 0.010 ± 0.000 | 82.00 ± 2.83 | - |"]
