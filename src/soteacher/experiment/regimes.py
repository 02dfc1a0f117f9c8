"""The regime map: when does a SoTeacher teacher give better students than a standard one?

Pure statistics over the rows of ``results.csv`` (dicts as :func:`~.report.collect_rows` or
:func:`~.report.read_results_csv` make them), plus the figures and the markdown report built
from them. ``benchmarks/regimes.py`` plans and runs the grids; this module only reads results.

A *cell* (:class:`Cell`) is one level of one factor (training-set size, Bayes error, teacher
width, ...): the experiment whose rows hold its students (``dataset``, the experiment's name)
and the names of the three teachers compared there. Per cell and distiller, paired by seed:

* **gain** = student(treated) - student(baseline) for every seed both have; its mean and the
  paired 95% t-interval ``mean ± t(0.975, n-1) * sd / sqrt(n)`` (sample sd, n - 1);
* the **sign tally**: seeds on which the gain is positive, negative and zero;
* **oracle gap** = student(oracle) - student(baseline), the room there is: students distilled
  from the exact p*(y|x) against students of the standard teacher (t-interval as above);
* **gap closed** = mean(gain) / mean(oracle gap) over the seeds where all three students exist,
  with a paired bootstrap 95% interval: the seeds are resampled with replacement (numerator and
  denominator together), the ratio recomputed, and the 2.5 and 97.5 percentiles taken. When the
  oracle gap's mean is not positive the ratio is undefined (``nan``); when more than 2.5% of the
  resamples have a non-positive oracle gap the interval is unbounded (-inf, inf).

The verdict of a cell is ``helps`` only when the gain's interval lies above 0, ``hurts`` when it
lies below, else ``no detectable effect`` (also with fewer than two seeds: no interval).

The t quantiles come from a table (df 1-30 exact to 4 decimals, then 40, 50, 60, 80, 100, 120,
interpolated linearly in 1/df, and 1.96 beyond): no scipy needed.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..engine.io import atomic_write_bytes, atomic_write_text
from .layout import slug

__all__ = ["Cell", "Factor", "VERDICTS", "bootstrap_ratio", "cell_stats", "factor_sentence",
           "format_regimes_report", "make_regime_figures", "regime_stats", "seed_values",
           "t_interval", "t_quantile", "verdict", "write_regime_csv", "write_regimes"]

#: 97.5% quantiles of Student's t distribution (two-sided 95%), by degrees of freedom.
_T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646,
         8: 2.3060, 9: 2.2622, 10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448,
         15: 2.1314, 16: 2.1199, 17: 2.1098, 18: 2.1009, 19: 2.0930, 20: 2.0860, 21: 2.0796,
         22: 2.0739, 23: 2.0687, 24: 2.0639, 25: 2.0595, 26: 2.0555, 27: 2.0518, 28: 2.0484,
         29: 2.0452, 30: 2.0423, 40: 2.0211, 50: 2.0086, 60: 2.0003, 80: 1.9901, 100: 1.9840,
         120: 1.9799}
_Z975 = 1.9600

HELPS, HURTS, NONE = "helps", "hurts", "no detectable effect"
VERDICTS = (HELPS, HURTS, NONE)


# ---- statistics ---------------------------------------------------------------------------------
def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if isinstance(df, bool) or int(df) != df or df < 1:
        raise ValueError(f"degrees of freedom must be a whole number >= 1, got {df!r}")
    df = int(df)
    if df in _T975:
        return _T975[df]
    known = sorted(_T975)
    if df > known[-1]:
        lo, hi, q_lo, q_hi = known[-1], math.inf, _T975[known[-1]], _Z975
    else:
        hi = next(k for k in known if k > df)
        lo = max(k for k in known if k < df)
        q_lo, q_hi = _T975[lo], _T975[hi]
    # linear in 1/df, the usual way to read between the rows of a t table
    w = (1 / lo - 1 / df) / (1 / lo - (0.0 if hi == math.inf else 1 / hi))
    return q_lo + w * (q_hi - q_lo)


def t_interval(values: Iterable[float]) -> dict[str, float]:
    """Mean and 95% t-interval of ``values`` (for paired differences: the paired interval).

    Returns ``{"n", "mean", "sd", "lo", "hi"}``; ``sd``, ``lo`` and ``hi`` are ``nan`` for fewer
    than two values, everything but ``n`` for none."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": math.nan, "sd": math.nan, "lo": math.nan, "hi": math.nan}
    mean = float(v.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "sd": math.nan, "lo": math.nan, "hi": math.nan}
    sd = float(v.std(ddof=1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def bootstrap_ratio(numerator: Sequence[float], denominator: Sequence[float],
                    n_boot: int = 4000, seed: int = 0) -> dict[str, float]:
    """``mean(numerator) / mean(denominator)`` over paired items, with a paired percentile
    bootstrap 95% interval (items resampled with replacement, both series together).

    Returns ``{"n", "ratio", "lo", "hi", "undefined"}``: ``undefined`` is the fraction of
    resamples whose denominator mean is <= 0. ``ratio`` is ``nan`` when the denominator's mean
    is <= 0; the interval is ``nan`` for fewer than two items and (-inf, inf) when more than
    2.5% of the resamples are undefined (the ratio is then unbounded at 95%)."""
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"numerator and denominator must be paired 1-D series of one length; "
                         f"got shapes {num.shape} and {den.shape}")
    n = len(num)
    out = {"n": n, "ratio": math.nan, "lo": math.nan, "hi": math.nan, "undefined": math.nan}
    if n == 0:
        return out
    if den.mean() > 0:
        out["ratio"] = float(num.mean() / den.mean())
    if n < 2:
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    num_m, den_m = num[idx].mean(1), den[idx].mean(1)
    bad = den_m <= 0
    out["undefined"] = float(bad.mean())
    if out["undefined"] > 0.025:
        out["lo"], out["hi"] = -math.inf, math.inf
    else:
        ratios = num_m[~bad] / den_m[~bad]
        out["lo"], out["hi"] = (float(q) for q in np.percentile(ratios, [2.5, 97.5]))
    return out


def verdict(lo: float, hi: float) -> str:
    """``helps`` when the interval lies above 0, ``hurts`` below, else no detectable effect."""
    if lo > 0:                  # comparisons with nan are False: no interval, no claim
        return HELPS
    if hi < 0:
        return HURTS
    return NONE


# ---- cells --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Factor:
    """One factor of the map: ``name`` (the key cells carry), a readable ``label``, the x-axis
    label of its figure and whether that axis is logarithmic."""
    name: str
    label: str
    x_label: str = ""
    log_x: bool = False


@dataclass(frozen=True)
class Cell:
    """One level of one factor: where its students are and which teachers to compare.

    ``dataset`` is the ``dataset`` column (the experiment's name) of the treated and baseline
    teachers' students; ``oracle_dataset`` that of the oracle's (default: ``dataset``; a factor
    that changes only the teacher shares the oracle students of the base setting). ``x`` places
    the level on its figure (``None``: by position). ``note``: what the report says of the level
    (e.g. the Bayes accuracy of its data)."""
    family: str
    factor: str
    level: str
    dataset: str
    treated: str = "soteacher"
    baseline: str = "standard"
    oracle: str | None = "oracle"
    oracle_dataset: str | None = None
    x: float | None = None
    is_base: bool = False
    note: str = ""


def seed_values(rows: Iterable[dict[str, Any]], dataset: str, teacher: str, distiller: str,
                metric: str = "student_test_acc") -> dict[int, float]:
    """``{seed: metric}`` of the students of ``teacher`` by ``distiller`` in ``dataset``
    (rows without the metric are skipped). Two rows of one seed are an error: the cell is
    ambiguous (several model pairs in one experiment)."""
    out: dict[int, float] = {}
    for r in rows:
        if (r.get("kind") != "student" or r.get("dataset") != dataset
                or r.get("teacher") != teacher or r.get("distiller") != distiller):
            continue
        v = r.get(metric)
        if v is None or v == "":
            continue
        seed = int(r["seed"])
        if seed in out:
            raise ValueError(f"two {metric} rows for the students of {teacher!r} by {distiller!r} "
                             f"in {dataset!r}, seed {seed} (several model pairs?); give every "
                             f"cell its own experiment name")
        out[seed] = float(v)
    return out


def cell_stats(rows: Sequence[dict[str, Any]], cell: Cell, distiller: str = "kd",
               metric: str = "student_test_acc", n_boot: int = 4000,
               boot_seed: int = 0) -> dict[str, Any]:
    """The statistics of one cell for one distiller (see the module docstring); values in the
    metric's units (accuracy: a fraction)."""
    treated = seed_values(rows, cell.dataset, cell.treated, distiller, metric)
    base = seed_values(rows, cell.dataset, cell.baseline, distiller, metric)
    oracle = (seed_values(rows, cell.oracle_dataset or cell.dataset, cell.oracle, distiller,
                          metric) if cell.oracle else {})
    paired = sorted(set(treated) & set(base))
    gains = [treated[s] - base[s] for s in paired]
    g = t_interval(gains)
    with_oracle = sorted(set(paired) & set(oracle))
    gaps = [oracle[s] - base[s] for s in with_oracle]
    o = t_interval(gaps)
    closed = bootstrap_ratio([treated[s] - base[s] for s in with_oracle], gaps, n_boot,
                             boot_seed)
    return {
        "family": cell.family, "factor": cell.factor, "level": cell.level, "x": cell.x,
        "is_base": cell.is_base, "note": cell.note, "dataset": cell.dataset,
        "distiller": distiller, "metric": metric, "treated": cell.treated,
        "baseline": cell.baseline, "oracle": cell.oracle,
        "n": g["n"],
        "treated_mean": float(np.mean([treated[s] for s in paired])) if paired else math.nan,
        "baseline_mean": float(np.mean([base[s] for s in paired])) if paired else math.nan,
        "gain": g["mean"], "gain_sd": g["sd"], "gain_lo": g["lo"], "gain_hi": g["hi"],
        "ahead": sum(d > 0 for d in gains), "behind": sum(d < 0 for d in gains),
        "tied": sum(d == 0 for d in gains),
        "verdict": verdict(g["lo"], g["hi"]),
        "oracle_n": o["n"], "oracle_gap": o["mean"], "oracle_gap_lo": o["lo"],
        "oracle_gap_hi": o["hi"],
        "gap_closed": closed["ratio"], "gap_closed_lo": closed["lo"],
        "gap_closed_hi": closed["hi"], "gap_undefined": closed["undefined"],
    }


def regime_stats(rows: Sequence[dict[str, Any]], cells: Sequence[Cell],
                 distillers: Sequence[str] | None = None, metric: str = "student_test_acc",
                 n_boot: int = 4000, boot_seed: int = 0) -> list[dict[str, Any]]:
    """:func:`cell_stats` for every cell and distiller (default: every distiller of the
    students in ``rows``), in the order of ``distillers`` then ``cells``."""
    if distillers is None:
        distillers = list(dict.fromkeys(r["distiller"] for r in rows
                                        if r.get("kind") == "student" and r.get("distiller")))
    return [cell_stats(rows, c, d, metric, n_boot, boot_seed)
            for d in distillers for c in cells]


# ---- words --------------------------------------------------------------------------------------
def _points(metric: str) -> tuple[float, str]:
    """Scale and unit of a metric's differences in the report."""
    return (100.0, "points") if metric.endswith(("acc", "agreement")) else (1.0, "")


def _signed(v: float, scale: float, digits: int = 2) -> str:
    return "-" if v is None or math.isnan(v) else f"{v * scale:+.{digits}f}"


def _pct(v: float) -> str:
    if v is None or math.isnan(v):
        return "-"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return f"{v * 100:.0f}%"


def _listing(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _level_phrase(s: dict[str, Any]) -> str:
    scale, unit = _points(s["metric"])
    text = (f"{s['level']} ({_signed(s['gain'], scale)} {unit}, 95% CI "
            f"{_signed(s['gain_lo'], scale)} to {_signed(s['gain_hi'], scale)}").replace("  ", " ")
    if not math.isnan(s["gap_closed"]):
        text += f"; {_pct(s['gap_closed'])} of the gap to oracle-taught students"
        if math.isinf(s["gap_closed_lo"]):
            text += ", interval unbounded"
        elif not math.isnan(s["gap_closed_lo"]):
            text += f", CI {_pct(s['gap_closed_lo'])} to {_pct(s['gap_closed_hi'])}"
    return text + ")"


def factor_sentence(stats: Sequence[dict[str, Any]], label: str,
                    treated_label: str = "SoTeacher") -> str:
    """One plain sentence on one factor (its cells' stats for one family and distiller): at
    which levels the treated teacher helps, hurts, or has no detectable effect."""
    have = [s for s in stats if s["n"] > 0]
    missing = [s["level"] for s in stats if s["n"] == 0]
    if not have:
        return f"{label}: no finished paired runs yet."
    ns = sorted({s["n"] for s in have})
    seeds = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    distiller = have[0]["distiller"]
    head = (f"{label}, {distiller.upper()} students, {seeds} paired "
            f"seed{'s' if ns[-1] != 1 else ''} per level: ")
    helps = [s for s in have if s["verdict"] == HELPS]
    hurts = [s for s in have if s["verdict"] == HURTS]
    none = [s for s in have if s["verdict"] == NONE]
    parts = []
    if helps:
        parts.append(f"{treated_label} helps at " + _listing([_level_phrase(s) for s in helps]))
    if hurts:
        verb = "hurts at " if helps else f"{treated_label} hurts at "
        parts.append(verb + _listing([_level_phrase(s) for s in hurts]))
    if none and (helps or hurts):
        parts.append("has no detectable effect at " + _listing([s["level"] for s in none]))
    elif none:
        scale, unit = _points(have[0]["metric"])
        gains = [s["gain"] for s in none]
        spread = (f"gain {_signed(gains[0], scale)} {unit}" if len(gains) == 1 else
                  f"gains from {_signed(min(gains), scale)} to {_signed(max(gains), scale)} "
                  f"{unit}").replace("  ", " ").rstrip()
        where = "at any level tested" if len(none) > 1 else "at the level tested"
        parts.append(f"{treated_label} has no detectable effect {where} "
                     f"({_listing([s['level'] for s in none])}; {spread})")
    sentence = head + _listing(parts)
    if missing:
        sentence += f"; no finished paired runs at {_listing(missing)}"
    return sentence + "."


def _num(v: float, scale: float = 1.0, digits: int = 2, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v * scale:+.{digits}f}" if signed else f"{v * scale:.{digits}f}"


def _interval(lo: float, hi: float, scale: float, digits: int = 2) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "-"
    return f"[{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]"


def _groups(stats: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((s["family"], s["distiller"]) for s in stats))


def format_regimes_report(stats: Sequence[dict[str, Any]], factors: Sequence[Factor],
                          title: str = "When does SoTeacher help? The regime map",
                          intro: Sequence[str] = (), treated_label: str = "SoTeacher",
                          figures: dict[str, str] | None = None) -> str:
    """The markdown report: per data family and distiller, one conclusion sentence per factor
    (:func:`factor_sentence`) and its table. ``figures``: ``{factor name or "heatmap_gain"...:
    relative path}`` to link."""
    figures = figures or {}
    metric = stats[0]["metric"] if stats else "student_test_acc"
    scale, unit = _points(metric)
    u = f" ({unit})" if unit else ""
    lines = [f"# {title}", ""] + list(intro) + ([""] if intro else []) + [
        f"Metric: `{metric}` of the students. Gain: {treated_label}'s student minus the standard "
        "teacher's student, paired by seed; mean and paired 95% t-interval. Ahead/behind: seeds "
        "with a positive/negative gain. Oracle gap: the student of the exact-p* teacher minus the "
        "standard teacher's student. Gap closed: mean gain / mean oracle gap, with a paired "
        "bootstrap 95% interval over seeds. A level counts as *helps* only when the gain's "
        "interval lies above 0, *hurts* when below, else *no detectable effect*.", ""]
    if not stats:
        return "\n".join(lines + ["No cells to report yet.", ""])
    by_factor = {f.name: f for f in factors}
    for family, distiller in _groups(stats):
        group = [s for s in stats if (s["family"], s["distiller"]) == (family, distiller)]
        lines += [f"## {family}: {distiller} students", "", "### Conclusions", ""]
        names = [f.name for f in factors if any(s["factor"] == f.name for s in group)]
        names += [n for n in dict.fromkeys(s["factor"] for s in group) if n not in names]
        for name in names:
            label = by_factor[name].label if name in by_factor else name
            lines.append("- " + factor_sentence([s for s in group if s["factor"] == name],
                                                label, treated_label))
        lines.append("")
        for key in ("heatmap_gain", "heatmap_gap"):
            if f"{family}/{distiller}/{key}" in figures:
                lines += [f"![{key}]({figures[f'{family}/{distiller}/{key}']})", ""]
        for name in names:
            label = by_factor[name].label if name in by_factor else name
            rows = [s for s in group if s["factor"] == name]
            lines += [f"### {label}", ""]
            if f"{family}/{distiller}/{name}" in figures:
                lines += [f"![{name}]({figures[f'{family}/{distiller}/{name}']})", ""]
            lines += [f"| level | n | standard % | {treated_label} % | gain{u} | 95% CI | "
                      f"ahead/behind | oracle gap{u} | 95% CI | gap closed | 95% CI | verdict |",
                      "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | ---: | --- | "
                      "--- |"]
            for s in rows:
                level = f"**{s['level']}** (base)" if s["is_base"] else s["level"]
                if s["note"]:
                    level += f" <br>{s['note']}"
                gap_ci = ("unbounded" if math.isinf(s["gap_closed_lo"])
                          else f"[{_pct(s['gap_closed_lo'])}, {_pct(s['gap_closed_hi'])}]"
                          if not math.isnan(s["gap_closed_lo"]) else "-")
                lines.append(
                    f"| {level} | {s['n']} | {_num(s['baseline_mean'], 100)} | "
                    f"{_num(s['treated_mean'], 100)} | {_num(s['gain'], scale, signed=True)} | "
                    f"{_interval(s['gain_lo'], s['gain_hi'], scale)} | "
                    f"{s['ahead']}/{s['behind']} | {_num(s['oracle_gap'], scale, signed=True)} | "
                    f"{_interval(s['oracle_gap_lo'], s['oracle_gap_hi'], scale)} | "
                    f"{_pct(s['gap_closed'])} | {gap_ci} | {s['verdict'] if s['n'] else '-'} |")
            lines.append("")
    return "\n".join(lines)


# ---- files --------------------------------------------------------------------------------------
CSV_COLUMNS = ["family", "distiller", "factor", "level", "x", "is_base", "dataset", "treated",
               "baseline", "oracle", "metric", "n", "baseline_mean", "treated_mean", "gain",
               "gain_sd", "gain_lo", "gain_hi", "ahead", "behind", "tied", "verdict",
               "oracle_n", "oracle_gap", "oracle_gap_lo", "oracle_gap_hi", "gap_closed",
               "gap_closed_lo", "gap_closed_hi", "gap_undefined", "note"]


def write_regime_csv(stats: Sequence[dict[str, Any]], path: str | Path) -> None:
    """The cells' statistics as CSV (metric units; empty where undefined)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for s in stats:
        w.writerow({k: ("" if s.get(k) is None or (isinstance(s.get(k), float)
                                                    and math.isnan(s[k])) else s[k])
                    for k in CSV_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _positions(cells: list[dict[str, Any]], log_x: bool) -> tuple[list[float], bool]:
    xs = [s["x"] for s in cells]
    numeric = all(isinstance(x, (int, float)) and math.isfinite(x)
                  and (x > 0 or not log_x) for x in xs) and len(set(xs)) == len(xs)
    return ([float(x) for x in xs] if numeric else list(range(len(cells)))), numeric


def _errorbar(ax: Any, xs: list[float], mid: list[float], lo: list[float], hi: list[float],
              color: str, label: str, bounds: tuple[float, float] | None = None) -> None:
    m = np.asarray(mid, dtype=float)
    low, high = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    if bounds is not None:          # unbounded intervals drawn to the edge of the panel
        low = np.where(np.isneginf(low), bounds[0], low)
        high = np.where(np.isposinf(high), bounds[1], high)
    ok = ~np.isnan(low) & ~np.isnan(high) & ~np.isnan(m)
    ax.plot(xs, m, "o-", color=color, label=label)
    if ok.any():
        x = np.asarray(xs, dtype=float)[ok]
        ax.errorbar(x, m[ok], yerr=[m[ok] - low[ok], high[ok] - m[ok]], fmt="none",
                    ecolor=color, capsize=4)


def _tick(s: dict[str, Any]) -> str:
    """A level's tick label: its name, and its position when that is another quantity (the
    Bayes error of a class separation, the parameters of a width)."""
    x = s["x"]
    try:
        same = x is None or float(s["level"]) == x
    except ValueError:
        same = False
    return s["level"] if same else f"{s['level']}\n({x:.3g})"


def _factor_figure(new_figure: Any, cells: list[dict[str, Any]], factor: Factor,
                   treated_label: str, path: Path) -> Path:
    scale, unit = _points(cells[0]["metric"])
    xs, numeric = _positions(cells, factor.log_x)
    fig = new_figure(figsize=(10, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    _errorbar(ax1, xs, [s["gain"] * scale for s in cells],
              [s["gain_lo"] * scale for s in cells], [s["gain_hi"] * scale for s in cells],
              "tab:blue", f"{treated_label} - standard")
    _errorbar(ax1, xs, [s["oracle_gap"] * scale for s in cells],
              [s["oracle_gap_lo"] * scale for s in cells],
              [s["oracle_gap_hi"] * scale for s in cells], "tab:gray", "oracle - standard")
    ax1.axhline(0.0, color="black", lw=0.8)
    ax1.set_ylabel(f"student gain ({unit or cells[0]['metric']})")
    ax1.set_title("paired gain, 95% t-interval")
    ax1.legend(fontsize=8)
    finite = [v for s in cells for v in (s["gap_closed"], s["gap_closed_lo"], s["gap_closed_hi"])
              if isinstance(v, float) and math.isfinite(v)]
    span = (min(finite + [-0.5]) - 0.25, max(finite + [1.5]) + 0.25)
    _errorbar(ax2, xs, [s["gap_closed"] for s in cells], [s["gap_closed_lo"] for s in cells],
              [s["gap_closed_hi"] for s in cells], "tab:green", "gap closed", bounds=span)
    ax2.axhline(0.0, color="black", lw=0.8)
    ax2.axhline(1.0, color="tab:gray", lw=0.8, ls="--")
    ax2.set_ylim(*span)
    ax2.set_ylabel("fraction of the oracle gap closed")
    ax2.set_title("gap closed, paired bootstrap 95%")
    for ax in (ax1, ax2):
        if numeric and factor.log_x:
            ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([_tick(s) for s in cells], rotation=30, fontsize=8)
        ax.minorticks_off()
        for x, s in zip(xs, cells):
            if s["is_base"]:
                ax.axvline(x, color="tab:orange", lw=0.8, ls=":")
        ax.set_xlabel(factor.x_label or factor.label)
    fig.suptitle(f"{cells[0]['family']}, {cells[0]['distiller']} students: {factor.label} "
                 f"(dotted: base)")
    fig.tight_layout()
    return _save(fig, path)


def _heatmap(new_figure: Any, group: list[dict[str, Any]], factors: list[Factor], key: str,
             treated_label: str, path: Path) -> Path:
    rows = [[s for s in group if s["factor"] == f.name] for f in factors]
    width = max(len(r) for r in rows)
    scale, unit = _points(group[0]["metric"]) if key == "gain" else (100.0, "%")
    grid = np.full((len(rows), width), np.nan)
    for i, cells in enumerate(rows):
        for j, s in enumerate(cells):
            v = s["gain" if key == "gain" else "gap_closed"]
            grid[i, j] = v * scale if isinstance(v, float) and math.isfinite(v) else np.nan
    fig = new_figure(figsize=(1.6 * width + 3, 0.7 * len(rows) + 1.5))
    ax = fig.subplots()
    lim = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for i, cells in enumerate(rows):
        for j, s in enumerate(cells):
            if key == "gain":
                mark = {HELPS: " +", HURTS: " −"}.get(s["verdict"], "")
                text = f"{s['level']}\n{_num(s['gain'], scale, 2, True)}{mark}"
            else:
                text = f"{s['level']}\n{_pct(s['gap_closed'])}"
            dark = np.isfinite(grid[i, j]) and abs(grid[i, j]) > 0.6 * lim
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f.label for f in factors], fontsize=8)
    ax.set_xticks([])
    what = (f"{treated_label} - standard student ({unit}); +/− : 95% interval excludes 0"
            if key == "gain" else "fraction of the oracle gap closed (%)")
    ax.set_title(f"{group[0]['family']}, {group[0]['distiller']} students: {what}", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return _save(fig, path)


def make_regime_figures(stats: Sequence[dict[str, Any]], factors: Sequence[Factor],
                        out_dir: str | Path, treated_label: str = "SoTeacher") -> dict[str, Path]:
    """Per family and distiller: one figure per factor (gain and oracle gap; gap closed; with
    their intervals, against the factor's levels) and two heatmaps of all factors (gain, gap
    closed). Returns ``{"<family>/<distiller>/<factor or heatmap_gain/heatmap_gap>": path}``.
    Needs matplotlib."""
    from .plots import require_matplotlib
    new_figure = require_matplotlib()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    for family, distiller in _groups(stats):
        group = [s for s in stats if (s["family"], s["distiller"]) == (family, distiller)]
        present = [f for f in factors if any(s["factor"] == f.name for s in group)]
        stem = f"{slug(family)}__{slug(distiller)}"
        for f in present:
            cells = [s for s in group if s["factor"] == f.name]
            made[f"{family}/{distiller}/{f.name}"] = _factor_figure(
                new_figure, cells, f, treated_label, out_dir / f"{stem}__{slug(f.name)}.png")
        if present:
            for key in ("gain", "gap"):
                made[f"{family}/{distiller}/heatmap_{key}"] = _heatmap(
                    new_figure, group, present, key, treated_label,
                    out_dir / f"{stem}__heatmap_{key}.png")
    return made


def write_regimes(rows: Sequence[dict[str, Any]], cells: Sequence[Cell],
                  factors: Sequence[Factor], out_dir: str | Path, *,
                  distillers: Sequence[str] | None = None, metric: str = "student_test_acc",
                  plots: bool = True, intro: Sequence[str] = (),
                  treated_label: str = "SoTeacher") -> dict[str, Any]:
    """Write ``report.md``, ``regimes.csv`` (the cells' statistics), ``results.csv`` (the rows)
    and, with ``plots``, the figures into ``out_dir``. Returns the paths and the statistics."""
    from .report import write_results_csv
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = regime_stats(rows, cells, distillers, metric)
    figures: dict[str, Path] = {}
    if plots and stats:
        figures = make_regime_figures(stats, factors, out_dir, treated_label)
    text = format_regimes_report(stats, factors, intro=intro, treated_label=treated_label,
                                 figures={k: p.name for k, p in figures.items()})
    atomic_write_text(out_dir / "report.md", text + "\n")
    write_regime_csv(stats, out_dir / "regimes.csv")
    write_results_csv(rows, out_dir / "results.csv")
    return {"stats": stats, "report": text, "report_md": out_dir / "report.md",
            "regimes_csv": out_dir / "regimes.csv", "results_csv": out_dir / "results.csv",
            "figures": figures}
