"""Figures of an experiment directory (PNG, matplotlib's Agg renderer, no display needed).

Per data set and pair:

* ``student_acc__<data>__<pair>.png``: student test accuracy per teacher variant, one bar per
  distiller, mean ± std over seeds with the single seeds as dots;
* ``teacher_vs_student__<data>__<pair>.png``: teacher test accuracy against its students' test
  accuracy, one point per run;
* ``reliability__<data>__<pair>.png``: reliability diagram of each teacher on its training
  inputs and on test inputs (accuracy against mean confidence per confidence bin, the bins of
  all seeds pooled), with the mean ECE over seeds;
* ``truth_distance__<data>__<pair>.png`` (data with known p* only): each teacher's total-variation
  distance to p* on training and on test inputs.

matplotlib is an optional dependency: ``pip install 'soteacher[plot]'``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from .layout import slug
from .stats import mean_std

__all__ = ["make_plots", "require_matplotlib"]


def require_matplotlib():
    """A figure factory drawing with matplotlib's Agg renderer (pyplot and its global backend
    are never touched), or an ``ImportError`` saying how to install matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'soteacher[plot]' (or pass "
                          "--no-plots)") from None

    def new_figure(**kwargs: Any) -> Any:
        fig = Figure(**kwargs)
        FigureCanvasAgg(fig)
        return fig

    return new_figure


def _teachers(rows: Sequence[dict], baseline: str) -> list[str]:
    names = sorted({r["teacher"] for r in rows})
    return ([baseline] if baseline in names else []) + [n for n in names if n != baseline]


def _wrap(name: str, width: int = 40) -> str:
    """A variant name on several lines: the options after ``[`` wrapped at commas."""
    if len(name) <= width:
        return name
    import textwrap
    head, bracket, rest = name.partition("[")
    return head + "\n" + "\n".join(textwrap.wrap(bracket + rest.replace(",", ", "), width))


def _colors(n: int) -> list[Any]:
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    from matplotlib import colormaps
    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _values(rows: Sequence[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def plot_student_accuracy(Figure, rows: Sequence[dict], title: str, path: Path,
                          baseline: str) -> Path | None:
    students = [r for r in rows if r["kind"] == "student"]
    if not students:
        return None
    teachers = _teachers(students, baseline)
    distillers = sorted({r["distiller"] for r in students})
    width = 0.8 / len(distillers)
    fig = Figure(figsize=(max(5.0, 0.9 * len(teachers) * max(1, len(distillers) / 2) + 2), 4))
    ax = fig.subplots()
    for j, d in enumerate(distillers):
        xs, means, stds = [], [], []
        for i, t in enumerate(teachers):
            vals = _values([r for r in students if r["teacher"] == t and r["distiller"] == d],
                           "student_test_acc")
            if not vals:
                continue
            m, s, _ = mean_std(vals)
            x = i - 0.4 + width * (j + 0.5)
            xs.append(x)
            means.append(100 * m)
            stds.append(100 * (s or 0.0))
            ax.plot([x] * len(vals), [100 * v for v in vals], "k.", markersize=3, alpha=0.6)
        ax.bar(xs, means, width=width * 0.9, yerr=stds, capsize=3, label=d, alpha=0.8)
    ax.set_xticks(range(len(teachers)))
    ax.set_xticklabels(teachers, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(title + ": students by teacher (mean ± std over seeds)", fontsize=9)
    allv = [100 * v for v in _values(students, "student_test_acc")]
    lo, hi = min(allv), max(allv)
    pad = max(1.0, 0.25 * (hi - lo))
    ax.set_ylim(max(0.0, lo - 2 * pad), min(100.0, hi + pad))
    ax.legend(title="distiller", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_teacher_vs_student(Figure, rows: Sequence[dict], title: str, path: Path,
                            baseline: str) -> Path | None:
    students = [r for r in rows if r["kind"] == "student"
                and r.get("teacher_test_acc") not in (None, "")
                and r.get("student_test_acc") not in (None, "")]
    if not students:
        return None
    teachers = _teachers(students, baseline)
    distillers = sorted({r["distiller"] for r in students})
    markers = "os^Dv<>pP*X"
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    colors = _colors(len(teachers))
    for i, t in enumerate(teachers):
        for j, d in enumerate(distillers):
            sel = [r for r in students if r["teacher"] == t and r["distiller"] == d]
            if sel:
                ax.scatter([100 * float(r["teacher_test_acc"]) for r in sel],
                           [100 * float(r["student_test_acc"]) for r in sel],
                           color=colors[i], marker=markers[j % len(markers)], s=22, alpha=0.8,
                           label=t if j == 0 else None)
    for j, d in enumerate(distillers):
        ax.scatter([], [], color="gray", marker=markers[j % len(markers)], label=f"({d})")
    ax.set_xlabel("teacher test accuracy (%)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(title + ": teacher vs student accuracy (one point per run)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _pooled_bins(out: Path, rows: Sequence[dict], split: str) -> dict[str, Any] | None:
    counts = correct = conf = None
    edges = None
    for r in rows:
        path = out / r["teacher_dir"] / "reliability.json"
        if not path.is_file():
            continue
        b = json.loads(path.read_text()).get(split)
        if not b:
            continue
        c = b["counts"]
        acc = [0.0 if math.isnan(a) else a for a in b["accuracies"]]
        cf = [0.0 if math.isnan(a) else a for a in b["confidences"]]
        if counts is None:
            edges, counts = b["edges"], [0] * len(c)
            correct, conf = [0.0] * len(c), [0.0] * len(c)
        for i in range(len(c)):
            counts[i] += c[i]
            correct[i] += acc[i] * c[i]
            conf[i] += cf[i] * c[i]
    if counts is None:
        return None
    return {"edges": edges, "counts": counts,
            "acc": [correct[i] / counts[i] if counts[i] else math.nan for i in range(len(counts))],
            "conf": [conf[i] / counts[i] if counts[i] else math.nan for i in range(len(counts))]}


def plot_reliability(Figure, out: Path, rows: Sequence[dict], title: str, path: Path,
                     baseline: str) -> Path | None:
    teachers_rows = [r for r in rows if r["kind"] == "teacher"]
    teachers = _teachers(teachers_rows, baseline)
    if not teachers:
        return None
    ncols = min(4, len(teachers))
    nrows = math.ceil(len(teachers) / ncols)
    fig = Figure(figsize=(3.1 * ncols, 3.0 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    drawn = False
    for i, t in enumerate(teachers):
        ax = axes[i // ncols][i % ncols]
        sel = [r for r in teachers_rows if r["teacher"] == t]
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        parts = []
        for j, split in enumerate(("train", "test")):
            bins = _pooled_bins(out, sel, split)
            if bins is not None:
                drawn = True
                ok = [k for k in range(len(bins["counts"])) if bins["counts"][k] > 0]
                ax.plot([bins["conf"][k] for k in ok], [bins["acc"][k] for k in ok],
                        marker="os"[j], markersize=3.5, linewidth=1.2, color=f"C{j}",
                        label=f"{split} inputs")
            ece = _values(sel, f"teacher_{split}_ece")
            if ece:
                parts.append(f"{split} {mean_std(ece)[0]:.3f}")
        ax.set_title(_wrap(t) + ("\nECE " + ", ".join(parts) if parts else ""), fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        if i % ncols == 0:
            ax.set_ylabel("accuracy", fontsize=8)
        if i // ncols == nrows - 1:
            ax.set_xlabel("confidence (bin mean)", fontsize=8)
        if i == 0:
            ax.legend(fontsize=7, loc="upper left")
    for k in range(len(teachers), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    if not drawn:
        return None
    fig.suptitle(title + ": teacher reliability on training and test inputs (seeds pooled)",
                 fontsize=9)
    return _save(fig, path)


def plot_truth_distance(Figure, rows: Sequence[dict], title: str, path: Path,
                        baseline: str) -> Path | None:
    teachers_rows = [r for r in rows if r["kind"] == "teacher"
                     and r.get("teacher_train_tv_true") not in (None, "")]
    if not teachers_rows:
        return None
    teachers = _teachers(teachers_rows, baseline)
    fig = Figure(figsize=(max(5.0, 0.8 * len(teachers) + 2), 4))
    ax = fig.subplots()
    for j, split in enumerate(("train", "test")):
        xs, means, stds = [], [], []
        for i, t in enumerate(teachers):
            vals = _values([r for r in teachers_rows if r["teacher"] == t],
                           f"teacher_{split}_tv_true")
            if not vals:
                continue
            m, s, _ = mean_std(vals)
            x = i - 0.2 + 0.4 * j
            xs.append(x)
            means.append(m)
            stds.append(s or 0.0)
            ax.plot([x] * len(vals), vals, "k.", markersize=3, alpha=0.6)
        ax.bar(xs, means, width=0.38, yerr=stds, capsize=3, alpha=0.8,
               label=f"{split} inputs", color=f"C{j}")
    ax.set_xticks(range(len(teachers)))
    ax.set_xticklabels(teachers, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean TV distance to p*(y|x)")
    ax.set_title(title + ": teacher's distance to the true label distribution", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def make_plots(out: str | Path, rows: Sequence[dict], plots_dir: str | Path,
               baseline: str = "standard") -> list[Path]:
    """Every figure for every (data set, pair) in ``rows``; returns the files written."""
    Figure = require_matplotlib()
    out, plots_dir = Path(out), Path(plots_dir)
    written: list[Path] = []
    for dataset, pair in sorted({(r["dataset"], r["pair"]) for r in rows}):
        sel = [r for r in rows if (r["dataset"], r["pair"]) == (dataset, pair)]
        title = f"{dataset} / {pair}"
        tag = f"{slug(dataset)}__{slug(pair)}"
        for p in (
            plot_student_accuracy(Figure, sel, title, plots_dir / f"student_acc__{tag}.png",
                                  baseline),
            plot_teacher_vs_student(Figure, sel, title,
                                    plots_dir / f"teacher_vs_student__{tag}.png", baseline),
            plot_reliability(Figure, out, sel, title, plots_dir / f"reliability__{tag}.png",
                             baseline),
            plot_truth_distance(Figure, sel, title, plots_dir / f"truth_distance__{tag}.png",
                                baseline),
        ):
            if p is not None:
                written.append(p)
    return written
