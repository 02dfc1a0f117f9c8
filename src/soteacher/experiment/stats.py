"""Statistics of an experiment's rows (dicts as :func:`~.report.collect_rows` makes them).

Mean and *sample* standard deviation (n - 1) over seeds; with one seed the spread is left out.
Paired differences compare, seed by seed, the student of a teacher with the student of the
baseline teacher (same data, pair, distiller and seed), then give the mean and sample standard
deviation of those differences over the seeds both have.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Sequence

__all__ = ["mean_std", "paired_differences", "student_cells", "teacher_cells"]

GROUP = ("dataset", "pair")


def mean_std(values: Iterable[float]) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (``None`` for fewer than two values) and count."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, None, 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals)


def paired_differences(values: dict[int, float], baseline: dict[int, float]) -> list[float]:
    """``values[s] - baseline[s]`` for every seed ``s`` both have, in seed order."""
    return [values[s] - baseline[s] for s in sorted(set(values) & set(baseline))]


def _by_seed(rows: Iterable[dict[str, Any]], metric: str) -> dict[tuple, dict[int, float]]:
    cells: dict[tuple, dict[int, float]] = {}
    for r in rows:
        v = r.get(metric)
        if v is None or v == "":
            continue
        key = tuple(r[k] for k in GROUP) + (r["teacher"], r.get("distiller"))
        cells.setdefault(key, {})[int(r["seed"])] = float(v)
    return cells


def student_cells(rows: Sequence[dict[str, Any]], metric: str = "student_test_acc",
                  baseline: str = "standard") -> list[dict[str, Any]]:
    """Per (dataset, pair, teacher, distiller): ``n``, ``mean``, ``std`` of ``metric`` over
    seeds and, when the baseline teacher's students exist, ``diff_n``, ``diff_mean``,
    ``diff_std`` of the seed-paired differences and ``diff_ahead``, the number of seeds where
    the difference is positive (``None`` for the baseline itself)."""
    cells = _by_seed([r for r in rows if r["kind"] == "student"], metric)
    out = []
    for (dataset, pair, teacher, distiller), vals in cells.items():
        mean, std, n = mean_std(vals[s] for s in sorted(vals))
        cell = {"dataset": dataset, "pair": pair, "teacher": teacher, "distiller": distiller,
                "n": n, "mean": mean, "std": std, "diff_n": 0, "diff_mean": None,
                "diff_std": None, "diff_ahead": None}
        base = cells.get((dataset, pair, baseline, distiller))
        if base is not None and teacher != baseline:
            diffs = paired_differences(vals, base)
            d_mean, d_std, d_n = mean_std(diffs)
            if d_n:
                cell.update(diff_n=d_n, diff_mean=d_mean, diff_std=d_std,
                            diff_ahead=sum(d > 0 for d in diffs))
        out.append(cell)
    return out


def teacher_cells(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Per (dataset, pair, teacher): ``{metric: (mean, std, n)}`` over the teacher runs."""
    teacher_rows = [r for r in rows if r["kind"] == "teacher"]
    out: dict[tuple, dict[str, Any]] = {}
    for m in metrics:
        for (dataset, pair, teacher, _), vals in _by_seed(teacher_rows, m).items():
            cell = out.setdefault((dataset, pair, teacher),
                                  {"dataset": dataset, "pair": pair, "teacher": teacher})
            cell[m] = mean_std(vals[s] for s in sorted(vals))
    return list(out.values())
