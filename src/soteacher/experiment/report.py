"""Results of an experiment directory: ``results.csv`` (one row per run), ``summary.md`` and
``premise.md`` (see :mod:`.premise`).

Everything here reads the ``summary.json`` files under the directory, so the report covers every
finished run there (several grids written into one ``--out`` are reported together) and can be
remade at any time (``soteacher experiment --report-only --out DIR``).

The statistics (mean and sample standard deviation over seeds, seed-paired differences to the
baseline teacher) are :mod:`.stats`; they are re-exported here.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..engine.io import atomic_write_text
from .layout import RUN_FORMAT, SUMMARY
from .stats import mean_std, paired_differences, student_cells, teacher_cells

__all__ = ["collect_rows", "format_summary", "mean_std", "merge_rows", "paired_differences",
           "read_results_csv", "student_cells", "teacher_cells", "write_report",
           "write_results_csv"]

META_COLUMNS = ["kind", "dataset", "pair", "teacher", "teacher_method", "teacher_options",
                "distiller", "distiller_method", "distiller_options", "seed", "teacher_dir",
                "student_dir"]
METRIC_ORDER = ["test_acc", "test_nll", "test_ece", "train_acc", "train_nll", "train_ece",
                "train_tv_true", "train_kl_true", "test_tv_true", "test_kl_true", "val_acc",
                "val_nll", "val_ece", "val_tv_true", "val_kl_true", "test_agreement", "temperature"]


# ---- collecting --------------------------------------------------------------------------------
def _summaries(out: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(Path(out).rglob(SUMMARY)):
        try:
            s = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(s, dict) and s.get("format") == RUN_FORMAT:
            found.append(s)
    return found


def collect_rows(out: str | Path) -> list[dict[str, Any]]:
    """One row per finished run under ``out``: teacher rows carry ``teacher_<metric>``; student
    rows also ``student_<metric>`` and their teacher's metrics. Sorted by data, pair, kind,
    teacher, distiller, seed."""
    summaries = _summaries(Path(out))
    teachers = {s["teacher_dir"]: s for s in summaries if s["kind"] == "teacher"}
    rows = []
    for s in summaries:
        row = {k: s.get(k) for k in META_COLUMNS}
        teacher = teachers.get(s["teacher_dir"]) if s["kind"] == "student" else s
        if teacher is not None:
            row.update({f"teacher_{k}": v for k, v in teacher["metrics"].items()})
        if s["kind"] == "student":
            row.update({f"student_{k}": v for k, v in s["metrics"].items()})
        rows.append(row)
    rows.sort(key=lambda r: (str(r["dataset"]), str(r["pair"]), r["kind"] != "teacher",
                             str(r["teacher"]), str(r["distiller"] or ""), int(r["seed"])))
    return rows


def _metric_rank(col: str) -> tuple:
    who, _, metric = col.partition("_")
    order = METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER)
    return (who != "teacher", order, metric)


def write_results_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """``rows`` as CSV: the meta columns, then teacher and student metrics (empty when unknown);
    option dicts as JSON."""
    metrics = sorted({k for r in rows for k in r if k not in META_COLUMNS}, key=_metric_rank)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=META_COLUMNS + metrics, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v, sort_keys=True) if isinstance(v, dict)
                        else "" if v is None else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def read_results_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``results.csv`` written by :func:`write_results_csv`: metrics as floats
    (``None`` where empty), ``seed`` as int, option columns as dicts."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if k in ("teacher_options", "distiller_options"):
                    row[k] = json.loads(v) if v else None
                elif k == "seed":
                    row[k] = int(v)
                elif k in META_COLUMNS:
                    row[k] = v or None
                else:
                    row[k] = float(v) if v != "" else None
            rows.append(row)
    return rows


def run_key(row: dict[str, Any]) -> tuple:
    """What names a run across result tables: kind, data, pair, teacher, distiller, seed."""
    return (row["kind"], row["dataset"], row["pair"], row["teacher"], row["distiller"] or None,
            int(row["seed"]))


def merge_rows(rows: Sequence[dict[str, Any]],
               previous: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` plus the rows of ``previous`` for runs that ``rows`` does not have (same kind,
    data, pair, teacher, distiller and seed): a partial rerun keeps the older runs' results."""
    have = {run_key(r) for r in rows}
    merged = list(rows) + [r for r in previous if run_key(r) not in have]
    merged.sort(key=lambda r: (str(r["dataset"]), str(r["pair"]), r["kind"] != "teacher",
                               str(r["teacher"]), str(r["distiller"] or ""), int(r["seed"])))
    return merged


def read_previous(paths: Sequence[str | Path],
                  drop: Sequence[dict[str, str]] = ()) -> list[dict[str, Any]]:
    """The rows of earlier ``results.csv`` files, for ``write_report(previous=...)``: a run that
    several hold takes the first file's row; a row whose every column named in one of the
    ``drop`` rules equals the rule's value (compared as text) is left out, e.g.
    ``{"dataset": "mnist1d", "distiller": "fitnet"}`` for runs made stale by a change and not
    rerun. A rule naming a column the files do not have is an error, not a silent no-op."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows = merge_rows(rows, read_results_csv(path))
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    for rule in drop:
        unknown = sorted(set(rule) - columns)
        if rows and unknown:
            raise ValueError(f"drop rule {rule}: no column {', '.join(unknown)} in "
                             f"{', '.join(map(str, paths))}; columns: {', '.join(sorted(columns))}")
        rows = [r for r in rows if any(str(r.get(k)) != str(v) for k, v in rule.items())]
    return rows


# ---- markdown ----------------------------------------------------------------------------------
_PERCENT = ("acc", "agreement")
_LABELS = {"test_acc": "test acc %", "test_nll": "test NLL", "test_ece": "test ECE",
           "train_acc": "train acc %", "train_ece": "train ECE", "train_nll": "train NLL",
           "train_tv_true": "train TV(p*)", "test_tv_true": "test TV(p*)",
           "train_kl_true": "train KL(p*)", "temperature": "temperature"}


def _fmt(mean: float | None, std: float | None, metric: str, signed: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    pct = metric.endswith(_PERCENT)
    scale, digits = (100.0, 2) if pct else (1.0, 4)
    s = f"{mean * scale:+.{digits}f}" if signed else f"{mean * scale:.{digits}f}"
    if std is not None:
        s += f" ± {std * scale:.{digits}f}"
    return s


def _order(names: Iterable[str], baseline: str) -> list[str]:
    names = sorted(set(names))
    return ([baseline] if baseline in names else []) + [n for n in names if n != baseline]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def format_summary(rows: Sequence[dict[str, Any]], baseline: str = "standard") -> str:
    """``summary.md``: per data set and pair, the teachers' metrics, the students' test accuracy
    (mean ± std over seeds) and its seed-paired difference to the baseline teacher's students."""
    lines = ["# Experiment summary", "",
             "Mean ± sample standard deviation over seeds; `n` is the number of seeds. Paired "
             f"differences: for every seed, the student's test accuracy minus that of the student "
             f"of the `{baseline}` teacher (same data, pair, distiller and seed), then mean ± "
             "standard deviation of those differences (percentage points; n pairs).", ""]
    if not rows:
        return "\n".join(lines + ["No finished runs yet.", ""])
    metrics = [m for m in ("test_acc", "test_nll", "test_ece", "train_ece", "train_tv_true",
                           "temperature")
               if any(r.get(f"teacher_{m}") not in (None, "") for r in rows)]
    t_cells = teacher_cells(rows, [f"teacher_{m}" for m in metrics])
    s_cells = student_cells(rows, "student_test_acc", baseline)
    groups = sorted({(r["dataset"], r["pair"]) for r in rows})
    for dataset, pair in groups:
        lines += [f"## {dataset} — {pair}", ""]
        tc = {c["teacher"]: c for c in t_cells if (c["dataset"], c["pair"]) == (dataset, pair)}
        if tc:
            lines += ["### Teachers", ""]
            body = []
            for t in _order(tc, baseline):
                c = tc[t]
                n = max((c[k][2] for k in c if k.startswith("teacher_")), default=0)
                body.append([f"`{t}`", str(n)] + [
                    _fmt(c[f"teacher_{m}"][0], c[f"teacher_{m}"][1], m)
                    if f"teacher_{m}" in c else "-" for m in metrics])
            lines += _table(["teacher", "n"] + [_LABELS.get(m, m) for m in metrics], body) + [""]
        sc = [c for c in s_cells if (c["dataset"], c["pair"]) == (dataset, pair)]
        if not sc:
            continue
        distillers = sorted({c["distiller"] for c in sc})
        by = {(c["teacher"], c["distiller"]): c for c in sc}
        teachers = _order({c["teacher"] for c in sc}, baseline)
        lines += ["### Students: test accuracy %", ""]
        body = [[f"`{t}`"] + [
            f"{_fmt(by[t, d]['mean'], by[t, d]['std'], 'acc')} ({by[t, d]['n']})"
            if (t, d) in by else "-" for d in distillers] for t in teachers]
        lines += _table(["teacher"] + distillers, body) + [""]
        if any(c["diff_n"] for c in sc):
            lines += [f"### Difference to the `{baseline}` teacher (points, paired by seed)", ""]
            body = [[f"`{t}`"] + [
                f"{_fmt(by[t, d]['diff_mean'], by[t, d]['diff_std'], 'acc', signed=True)} "
                f"({by[t, d]['diff_n']})" if (t, d) in by and by[t, d]["diff_n"] else "-"
                for d in distillers] for t in teachers if t != baseline]
            lines += _table(["teacher"] + distillers, body) + [""]
        elif baseline not in teachers:
            lines += [f"(no `{baseline}` teacher in this grid: no paired differences)", ""]
    return "\n".join(lines)


def write_report(out: str | Path, baseline: str = "standard", plots: bool = True,
                 plots_dir: str | Path | None = None,
                 previous: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Write ``results.csv``, ``summary.md`` and ``premise.md`` (the premise panel: how each
    teacher measure correlates with its students' test accuracy, :mod:`.premise`) into ``out``
    and, with ``plots``, the figures (into ``plots_dir``, default ``out/plots``). Returns the
    paths, the rows and the premise panel's numbers (``premise``). ``previous`` (rows of an
    earlier ``results.csv``) fills in the runs that ``out`` does not hold, for a partial rerun
    (see :func:`merge_rows`); what reads run directories (reliability diagrams, the agreement
    between teacher seeds) uses the runs in ``out`` only."""
    from .premise import write_premise
    out = Path(out)
    rows = merge_rows(collect_rows(out), previous)
    write_results_csv(rows, out / "results.csv")
    summary = format_summary(rows, baseline)
    atomic_write_text(out / "summary.md", summary + "\n")
    result: dict[str, Any] = {"rows": rows, "results_csv": out / "results.csv",
                              "summary_md": out / "summary.md", "summary": summary, "plots": []}
    figures = Path(plots_dir) if plots_dir else out / "plots"
    if plots and rows:
        from .plots import make_plots
        result["plots"] = make_plots(out, rows, figures, baseline=baseline)
    premise = write_premise(out, rows, plots_dir=figures if plots and rows else None)
    result.update(premise_md=premise["path"], premise=premise["table"])
    result["plots"] += premise["plots"]
    return result
