"""The premise panel: do teachers closer to p* make better students, and which proxy tells?

For every (data set, pair, distiller) with student runs, each measure of a teacher, the
p*-distances of :data:`~.proxies.TRUTH` (data sets that know p*), the proxies of
:data:`~.proxies.PROXIES` and ``seed_agreement`` (below), is correlated with the test accuracy
of the teacher's students:

* run level: one point per student run (its teacher's measure, its own test accuracy);
* method level: one point per teacher variant, both coordinates averaged over seeds.

Each correlation (Pearson and Spearman) comes with a 95% percentile-bootstrap interval: the
points (runs, or variants at method level) are resampled with replacement, 2000 times by
default, from a fixed RNG seed so that a report is reproducible. A correlation of fewer than
three points, or of a constant coordinate, is NaN. For a p*-distance, ``r2`` is the share of the
students' variance that its run-level linear fit explains (Pearson squared).

``seed_agreement`` is a method-level proxy that reads no label and no metric: for a teacher
variant, the mean over pairs of seeds of the share of test inputs on which the two teachers
predict the same class (from their ``predictions.pt``). A teacher that recovers p* does not
depend on its seed, so higher should be better. It needs the run directories.

:func:`premise_table` returns the numbers, :func:`format_premise` the Markdown and
:func:`write_premise` writes ``premise.md`` (and, given a directory, the scatter plots).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..engine.io import atomic_write_text
from .layout import PREDICTIONS, slug
from .proxies import PROXIES, TRUTH, proxy_value

__all__ = ["PREMISE", "SEED_AGREEMENT", "best_proxy", "bootstrap_ci", "format_premise",
           "pearson", "plot_premise", "premise_sentence", "premise_table", "seed_agreement",
           "spearman", "write_premise"]

PREMISE = "premise.md"
SEED_AGREEMENT = "seed_agreement"
_TARGET = "student_test_acc"


@dataclass(frozen=True)
class _Measure:
    name: str
    kind: str                       # "truth" or "proxy"
    direction: str                  # "lower" or "higher" is better
    description: str
    run_level: bool = True


def _measures() -> list[_Measure]:
    return ([_Measure(p.name, "truth", p.direction, p.description) for p in TRUTH.values()]
            + [_Measure(p.name, "proxy", p.direction, p.description) for p in PROXIES.values()]
            + [_Measure(SEED_AGREEMENT, "proxy", "higher",
                        "top-1 agreement on test inputs between teachers of different seeds "
                        "(no labels; method level only)", run_level=False)])


# ---- correlations -------------------------------------------------------------------------------
def _as_pair(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be two sequences of equal length; got shapes "
                         f"{x.shape} and {y.shape}")
    return x, y


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r of each row of ``x`` (B, n) with the same row of ``y``; NaN where a row is
    constant."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    # a constant row: its centred values are rounding noise (or 0), so the ratio is meaningless
    constant = (np.ptp(x, axis=1) == 0) | (np.ptp(y, axis=1) == 0) | (den == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=1) / np.where(constant, 1.0, den)
    return np.where(constant, np.nan, np.clip(r, -1.0, 1.0))


def _resampled_ranks(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties share the mean of their positions) of ``values[idx[b]]``
    within each row ``b`` of ``idx`` (B, n); every row is ranked at once through the counts of
    each distinct value in it."""
    distinct, code = np.unique(values, return_inverse=True)
    rows, k = idx.shape[0], len(distinct)
    codes = code[idx]                                                     # (B, n)
    counts = np.zeros((rows, k), dtype=np.int64)
    np.add.at(counts, (np.arange(rows)[:, None], codes), 1)
    at_most = np.cumsum(counts, axis=1)                                   # values <= each
    below = at_most - counts                                              # values < each
    # the tied values occupy positions below+1 .. at_most; their rank is the mean of those
    avg = (below + at_most + 1) / 2.0
    return np.take_along_axis(avg, codes, axis=1)


def _statistic_rows(x: np.ndarray, y: np.ndarray, idx: np.ndarray, method: str) -> np.ndarray:
    if method == "pearson":
        return _pearson_rows(x[idx], y[idx])
    if method == "spearman":
        return _pearson_rows(_resampled_ranks(x, idx), _resampled_ranks(y, idx))
    raise ValueError(f"unknown correlation {method!r}; available: pearson, spearman")


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation of ``x`` and ``y``; NaN for fewer than 3 points or a constant
    coordinate."""
    x, y = _as_pair(x, y)
    if len(x) < 3:
        return math.nan
    return float(_pearson_rows(x[None], y[None])[0])


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's of the average ranks, ties averaged); NaN for
    fewer than 3 points or a constant coordinate."""
    x, y = _as_pair(x, y)
    if len(x) < 3:
        return math.nan
    return float(_statistic_rows(x, y, np.arange(len(x))[None], "spearman")[0])


def bootstrap_ci(x: Sequence[float], y: Sequence[float], method: str = "pearson",
                 n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the ``method`` (``"pearson"`` or ``"spearman"``)
    correlation of the points ``(x[i], y[i])``: the points are resampled with replacement
    ``n_boot`` times from ``numpy.random.default_rng(seed)``; resamples with a constant
    coordinate are left out, and the interval is NaN when more than half are (or for fewer
    than 3 points). The same ``seed`` gives the same resamples for both methods."""
    x, y = _as_pair(x, y)
    if method not in ("pearson", "spearman"):
        raise ValueError(f"unknown correlation {method!r}; available: pearson, spearman")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1 (0.95 for a 95% interval), "
                         f"got {level}")
    n = len(x)
    if n < 3:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    stats = _statistic_rows(x, y, idx, method)
    stats = stats[np.isfinite(stats)]
    if 2 * len(stats) < n_boot:
        return math.nan, math.nan
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(stats, [tail, 100.0 - tail])
    return float(lo), float(hi)


# ---- seed agreement -----------------------------------------------------------------------------
def _top1(path: Path) -> np.ndarray | None:
    from ..engine.io import CheckpointError, safe_torch_load
    if not path.is_file():
        return None
    try:
        saved = safe_torch_load(path)
    except CheckpointError:
        return None                 # a damaged file counts as missing, the report goes on
    probs = saved.get("test") if isinstance(saved, dict) else None
    if probs is None or getattr(probs, "ndim", 0) != 2:
        return None
    return probs.float().argmax(dim=1).numpy()


def seed_agreement(out_dir: str | Path, teacher_dirs: Sequence[str]) -> tuple[float, int]:
    """The mean over pairs of teacher runs (``teacher_dirs``, relative to ``out_dir``; one per
    seed) of the share of test inputs on which both predict the same class, read from their
    ``predictions.pt``; and the number of runs that had one. NaN with fewer than two; runs whose
    test sets differ in size from the first one's are left out."""
    preds = [p for p in (_top1(Path(out_dir) / d / PREDICTIONS) for d in teacher_dirs)
             if p is not None]
    preds = [p for p in preds if p.shape == preds[0].shape] if preds else []
    if len(preds) < 2:
        return math.nan, len(preds)
    return float(np.mean([np.mean(a == b) for a, b in combinations(preds, 2)])), len(preds)


# ---- the table ----------------------------------------------------------------------------------
def _num(v: Any) -> float:
    if v is None or v == "":
        return math.nan
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _teacher_metrics(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k[len("teacher_"):]: v for k, v in row.items()
            if k.startswith("teacher_") and k not in ("teacher_method", "teacher_options",
                                                      "teacher_dir")}


def _has_column(rows: Sequence[Mapping[str, Any]], metric: str) -> bool:
    return any(math.isfinite(_num(r.get(f"teacher_{metric}"))) for r in rows)


def _correlations(x: list[float], y: list[float], n_boot: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(x)}
    for method in ("pearson", "spearman"):
        point = pearson(x, y) if method == "pearson" else spearman(x, y)
        lo, hi = bootstrap_ci(x, y, method, n_boot, seed) if math.isfinite(point) \
            else (math.nan, math.nan)
        out.update({method: point, f"{method}_lo": lo, f"{method}_hi": hi})
    return out


def _flatten(level: str, stats: dict[str, Any]) -> dict[str, Any]:
    return {f"{level}_{k}": v for k, v in stats.items()}


def premise_table(rows: Sequence[Mapping[str, Any]], out_dir: str | Path | None = None,
                  n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """The premise panel's numbers for ``rows`` (as :func:`~.report.collect_rows` or
    :func:`~.report.read_results_csv` give them): one dict per (data set, pair, distiller,
    measure) with ``dataset``, ``pair``, ``distiller``, ``measure``, ``kind`` (``"truth"`` or
    ``"proxy"``), ``direction``, ``description``; ``run_n``, ``run_pearson``,
    ``run_pearson_lo``, ``run_pearson_hi``, ``run_spearman`` (and its ``_lo``, ``_hi``); the same
    with ``method_``; and ``r2``, the run-level Pearson squared (NaN where undefined).

    p*-distances appear only where some teacher has them; every proxy appears (NaN where its
    metrics are missing). ``seed_agreement`` needs ``out_dir``, the experiment directory the
    rows' ``teacher_dir`` are relative to; without it, or without ``predictions.pt`` files, it is
    NaN. Every bootstrap uses ``seed``: the same rows give the same table. The students of the
    ``oracle`` teacher (p* itself, a reference, not a training method) are left out."""
    table: list[dict[str, Any]] = []
    students = [r for r in rows if r.get("kind") == "student" and r.get("distiller")
                and r.get("teacher_method") != "oracle"
                and math.isfinite(_num(r.get(_TARGET)))]
    groups = sorted({(str(r["dataset"]), str(r["pair"]), str(r["distiller"])) for r in students})
    agreement: dict[tuple, tuple[float, int]] = {}
    for dataset, pair, distiller in groups:
        sel = [r for r in students
               if (str(r["dataset"]), str(r["pair"]), str(r["distiller"])) == (dataset, pair,
                                                                               distiller)]
        variants = sorted({str(r["teacher"]) for r in sel})
        for m in _measures():
            if m.kind == "truth" and not _has_column(sel, m.name):
                continue
            entry: dict[str, Any] = {"dataset": dataset, "pair": pair, "distiller": distiller,
                                     "measure": m.name, "kind": m.kind,
                                     "direction": m.direction, "description": m.description}
            run_x: list[float] = []
            run_y: list[float] = []
            per_variant: dict[str, tuple[float, float]] = {}     # variant -> (measure, acc)
            if m.run_level:
                points: dict[str, list[tuple[float, float]]] = {}
                for r in sel:
                    v = proxy_value(m.name, _teacher_metrics(r))
                    if math.isfinite(v):
                        run_x.append(v)
                        run_y.append(_num(r[_TARGET]))
                        points.setdefault(str(r["teacher"]), []).append((v, run_y[-1]))
                per_variant = {t: (float(np.mean([p[0] for p in pts])),
                                   float(np.mean([p[1] for p in pts])))
                               for t, pts in points.items()}
            elif out_dir is not None:
                for t in variants:
                    key = (dataset, pair, t)
                    if key not in agreement:
                        dirs = sorted({str(r["teacher_dir"]) for r in rows
                                       if (str(r.get("dataset")), str(r.get("pair")),
                                           str(r.get("teacher"))) == key and r.get("teacher_dir")})
                        agreement[key] = seed_agreement(out_dir, dirs)
                    a = agreement[key][0]
                    if math.isfinite(a):
                        accs = [_num(r[_TARGET]) for r in sel if str(r["teacher"]) == t]
                        per_variant[t] = (a, float(np.mean(accs)))
            entry.update(_flatten("run", _correlations(run_x, run_y, n_boot, seed)))
            mx = [per_variant[t][0] for t in sorted(per_variant)]
            my = [per_variant[t][1] for t in sorted(per_variant)]
            entry.update(_flatten("method", _correlations(mx, my, n_boot, seed)))
            entry["r2"] = entry["run_pearson"] ** 2 if math.isfinite(entry["run_pearson"]) \
                else math.nan
            table.append(entry)
    return table


# ---- the report ---------------------------------------------------------------------------------
_TRUTH_WORDS = {"train_tv_true": "distance to p*", "train_kl_true": "KL divergence from p*"}


def _contains_zero(e: Mapping[str, Any], key: str) -> bool:
    lo, hi = e[f"{key}_lo"], e[f"{key}_hi"]
    return not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0.0 <= hi


def _fmt_r(e: Mapping[str, Any], key: str) -> str:
    r = e[key]
    if not math.isfinite(r):
        return "-"
    lo, hi = e[f"{key}_lo"], e[f"{key}_hi"]
    ci = f"[{lo:+.2f}, {hi:+.2f}]" if math.isfinite(lo) and math.isfinite(hi) else "[-]"
    return f"{r:+.2f} {ci}"


def _agrees(e: Mapping[str, Any], key: str = "run_pearson") -> bool:
    """Whether the correlation has the sign the measure's direction predicts: a measure where
    lower is better should correlate negatively with the students' accuracy."""
    r = e[key]
    return math.isfinite(r) and (r < 0 if e["direction"] == "lower" else r > 0)


def _reliable(e: Mapping[str, Any]) -> bool:
    return any(math.isfinite(e[k]) and not _contains_zero(e, k)
               for k in ("run_pearson", "run_spearman", "method_pearson", "method_spearman"))


def _truth_entry(entries: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    truth = [e for e in entries if e["kind"] == "truth"]
    truth.sort(key=lambda e: list(TRUTH).index(e["measure"]))
    return truth[0] if truth else None


def best_proxy(entries: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any] | None, bool]:
    """The run-level proxy closest to the students among ``entries`` (one group of
    :func:`premise_table`): the largest |run-level Pearson| among those whose sign matches
    their direction, and ``True``; else the largest of any sign, and ``False``; ``(None,
    False)`` when no proxy has a run-level correlation."""
    found = [e for e in entries if e["kind"] == "proxy" and math.isfinite(e["run_pearson"])]
    agreeing = [e for e in found if _agrees(e)]
    pool = agreeing or found
    if not pool:
        return None, False
    return max(pool, key=lambda e: abs(e["run_pearson"])), bool(agreeing)


def premise_sentence(entries: Sequence[Mapping[str, Any]]) -> str:
    """One plain sentence for one (data set, pair, distiller) of :func:`premise_table`, made
    from its numbers."""
    if not entries:
        raise ValueError("premise_sentence needs the entries of one (data set, pair, distiller) "
                         "of premise_table; got none")
    dataset, distiller = entries[0]["dataset"], entries[0]["distiller"]
    head = f"On {dataset} with `{distiller}`, "
    truth = _truth_entry(entries)
    if truth is None:
        s = head + "p* is not known"
    elif not math.isfinite(truth["run_pearson"]):
        s = (head + f"the teachers' {_TRUTH_WORDS.get(truth['measure'], truth['measure'])} "
             f"gives no correlation (fewer than 3 runs, or the same value for every run)")
    else:
        s = (head + f"the teachers' {_TRUTH_WORDS.get(truth['measure'], truth['measure'])} on "
             f"their training inputs explains {100 * truth['r2']:.0f}% of the variance of the "
             f"students' test accuracy (Pearson {_fmt_r(truth, 'run_pearson')}")
        if _contains_zero(truth, "run_pearson"):
            s += ", an interval that contains 0"
        s += ")"
        if not _agrees(truth):
            s += (", but against the premise: the students of teachers farther from p* did "
                  "better")
    proxies = [e for e in entries if e["kind"] == "proxy"]
    best, agrees = best_proxy(entries)
    if best is None and not any(math.isfinite(e["method_pearson"]) for e in proxies):
        s += "; no proxy that needs no p* could be computed from these runs"
    elif not any(_reliable(e) for e in proxies):
        s += ("; no proxy that needs no p* is reliably related to the students' accuracy "
              "(every interval contains 0)")
    elif best is not None and agrees:
        s += (f"; of the proxies that need no p*, {best['measure']} comes closest "
              f"({_fmt_r(best, 'run_pearson')}")
        s += ", though its interval contains 0)" if _contains_zero(best, "run_pearson") else ")"
    elif best is not None:
        s += (f"; no proxy that needs no p* has the sign its direction predicts: the strongest, "
              f"{best['measure']} ({best['direction']} is better), has Pearson "
              f"{_fmt_r(best, 'run_pearson')}")
    # a proxy reliably related the wrong way is worth saying when one of the right sign is named
    against = [e for e in proxies if math.isfinite(e["run_pearson"]) and not _agrees(e)
               and not _contains_zero(e, "run_pearson")]
    if against and agrees:
        worst = max(against, key=lambda e: abs(e["run_pearson"]))
        s += (f"; {worst['measure']} is related against its direction ({worst['direction']} is "
              f"better; Pearson {_fmt_r(worst, 'run_pearson')})")
    agreement = next((e for e in proxies if e["measure"] == SEED_AGREEMENT), None)
    if agreement is not None and math.isfinite(agreement["method_pearson"]) \
            and not _contains_zero(agreement, "method_pearson"):
        s += (f"; across teacher variants, their agreement between seeds correlates "
              f"{_fmt_r(agreement, 'method_pearson')} with it")
    return s + "."


def _groups(table: Sequence[Mapping[str, Any]]) -> dict[tuple, list[Mapping[str, Any]]]:
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for e in table:
        groups.setdefault((e["dataset"], e["pair"], e["distiller"]), []).append(e)
    return groups


def format_premise(table: Sequence[Mapping[str, Any]], n_boot: int = 2000,
                   seed: int = 0) -> str:
    """``premise.md`` for the entries of :func:`premise_table` (``n_boot`` and ``seed`` are
    only quoted)."""
    lines = ["# The premise: do teachers closer to p* make better students?", "",
             "Each measure of a teacher against the test accuracy of its students. Run level: one "
             "point per student run. Method level: one point per teacher variant (means over "
             "seeds). Pearson and Spearman correlations with 95% percentile-bootstrap intervals "
             f"({n_boot} resamples of the points, RNG seed {seed}); `-`: fewer than 3 points or "
             "a constant measure. `better`: the direction in which the measure should point to "
             "better students, so a measure that works correlates negatively when lower is "
             "better and positively when higher is.", "",
             "Measures: " + "; ".join(f"`{m.name}`: {m.description}" for m in _measures()) + ".",
             ""]
    if not table:
        return "\n".join(lines + ["No student runs with a test accuracy yet.", ""])
    groups = _groups(table)
    for dataset, pair in sorted({k[:2] for k in groups}):
        lines += [f"## {dataset} — {pair}", ""]
        keys = [k for k in sorted(groups) if k[:2] == (dataset, pair)]
        everything = [e for k in keys for e in groups[k]]
        if not any(e["kind"] == "truth" for e in everything):
            lines += ["p* is not known for this data set: the distances to p* "
                      f"({', '.join(f'`{t}`' for t in TRUTH)}) are not in the panel, only the "
                      "proxies that need no p*.", ""]
        for key in keys:
            entries = groups[key]
            n_runs = max(e["run_n"] for e in entries)
            n_var = max(e["method_n"] for e in entries)
            lines += [f"### Distiller `{key[2]}` ({n_runs} student runs, {n_var} teacher "
                      "variants)", "",
                      "| measure | better | runs | run Pearson [95% CI] | run Spearman [95% CI] "
                      "| variants | method Pearson [95% CI] | method Spearman [95% CI] |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for e in entries:
                name = f"**{e['measure']}** (p*)" if e["kind"] == "truth" else e["measure"]
                lines.append(
                    f"| {name} | {e['direction']} | {e['run_n'] or '-'} | "
                    f"{_fmt_r(e, 'run_pearson')} | {_fmt_r(e, 'run_spearman')} | "
                    f"{e['method_n'] or '-'} | {_fmt_r(e, 'method_pearson')} | "
                    f"{_fmt_r(e, 'method_spearman')} |")
            lines += ["", premise_sentence(entries), ""]
        missing = sorted({e["measure"] for e in everything} - {
            e["measure"] for e in everything if e["run_n"] or e["method_n"]})
        if missing:
            why = {SEED_AGREEMENT: f"needs the teachers' {PREDICTIONS} in the run directories"}
            why.update({p.name: "needs " + ", ".join(f"teacher_{n}" for n in p.needs)
                        for p in PROXIES.values()})
            lines += ["Not measured in these runs: " + "; ".join(
                f"`{m}` ({why.get(m, 'no values')})" for m in missing) + ".", ""]
    return "\n".join(lines)


def plot_premise(Figure: Any, rows: Sequence[Mapping[str, Any]],
                 entries: Sequence[Mapping[str, Any]], title: str, path: Path) -> Path | None:
    """Student test accuracy against the teacher's distance to p* (when known) and against the
    proxy of :func:`best_proxy`: one colour per teacher variant, small points for runs, large
    ones for the variants' means over seeds."""
    from .plots import _colors, _save
    shown = [e for e in (_truth_entry(entries), best_proxy(entries)[0]) if e is not None
             and e["run_n"]]
    if not shown:
        return None
    dataset, pair, distiller = entries[0]["dataset"], entries[0]["pair"], entries[0]["distiller"]
    sel = [r for r in rows if r.get("kind") == "student" and r.get("teacher_method") != "oracle"
           and (str(r.get("dataset")), str(r.get("pair")), str(r.get("distiller")))
           == (dataset, pair, distiller) and math.isfinite(_num(r.get(_TARGET)))]
    teachers = sorted({str(r["teacher"]) for r in sel})
    colors = _colors(len(teachers))
    fig = Figure(figsize=(5.2 * len(shown) + 2.2, 4.2), layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, e in zip(axes, shown):
        for i, t in enumerate(teachers):
            pts = [(proxy_value(e["measure"], _teacher_metrics(r)), 100 * _num(r[_TARGET]))
                   for r in sel if str(r["teacher"]) == t]
            pts = [p for p in pts if math.isfinite(p[0])]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, color=colors[i], s=14, alpha=0.55)
            ax.scatter([np.mean(xs)], [np.mean(ys)], color=colors[i], s=90, edgecolors="black",
                       linewidths=0.8, label=t if ax is axes[-1] else None, zorder=3)
        tag = "p*" if e["kind"] == "truth" else "proxy"
        ax.set_xlabel(f"teacher {e['measure']} ({tag}; {e['direction']} is better)", fontsize=8)
        ax.set_ylabel("student test accuracy (%)", fontsize=8)
        ax.set_title(f"run-level Pearson {_fmt_r(e, 'run_pearson')}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                    title="teacher (large: mean)", title_fontsize=7)
    fig.suptitle(f"{title}: teacher measure vs student accuracy (one point per run)", fontsize=9)
    return _save(fig, path)


def write_premise(out: str | Path, rows: Sequence[Mapping[str, Any]],
                  plots_dir: str | Path | None = None, n_boot: int = 2000,
                  seed: int = 0) -> dict[str, Any]:
    """Write ``out/premise.md`` for ``rows`` (run directories under ``out``) and, given
    ``plots_dir``, one figure ``premise__<data>__<pair>__<distiller>.png`` per group there
    (needs matplotlib). Returns ``path``, ``text``, ``table`` and ``plots``."""
    out = Path(out)
    table = premise_table(rows, out, n_boot=n_boot, seed=seed)
    text = format_premise(table, n_boot=n_boot, seed=seed)
    atomic_write_text(out / PREMISE, text + "\n")
    written: list[Path] = []
    if plots_dir is not None and table:
        from .plots import require_matplotlib
        Figure = require_matplotlib()
        for (dataset, pair, distiller), entries in sorted(_groups(table).items()):
            name = f"premise__{slug(dataset)}__{slug(pair)}__{slug(distiller)}.png"
            p = plot_premise(Figure, rows, entries, f"{dataset} / {pair} / {distiller}",
                             Path(plots_dir) / name)
            if p is not None:
                written.append(p)
    return {"path": out / PREMISE, "text": text, "table": table, "plots": written}
