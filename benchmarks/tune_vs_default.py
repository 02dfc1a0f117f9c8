"""Does a teacher tuned on the validation split make better students than the defaults?

For each small data set and seed: ``soteacher tune`` chooses the teacher's settings by a proxy on
the validation split (10% of the training set, as in ``benchmarks/teacher_methods.yaml``); then
KD students are distilled from the tuned teacher, from the default SoTeacher teacher (the paper's
lambda_LR = 1e-5, lambda_CR = 1, linear schedule) and from the standard teacher, all trained on
the same 90%, and compared on the held-out test set, seed by seed: how often the tuned teacher's
student is ahead, the paired mean difference and its 95% t-interval. On known-truth data the
students of the oracle teacher (logits log p*) are trained too, and the table gives the fraction
of the standard-to-oracle student gap that each teacher closes, (acc - standard) / (oracle -
standard), of the means over seeds.

The data sets and models are those of ``benchmarks/teacher_methods.py`` (known_truth: 50 teacher
epochs, 30 student epochs; known_truth_long: the demo's 100 and 60; mnist1d; digits with 2-D
CNNs). Every run goes into ``--out``; finished runs are read back when the script is started
again. Markdown tables go to stdout, the numbers to ``OUT/results.json``.

    .venv/bin/python benchmarks/tune_vs_default.py --out runs/bench/tune_vs_default
    .venv/bin/python benchmarks/tune_vs_default.py --tiny --out /tmp/tvd     # a smoke run

``--tune-once`` runs one study, on seed 0's split, and trains every seed's tuned teacher with
the settings it chose (what a user does: tune once, then train with the result); without it
every seed has its own study (how reliable the selection itself is). The trials can run on
Ray (``--backend ray``), and seeds can be shared among processes (``--first-seed``): each seed
writes ``OUT/<data>/seed<S>/result.json``, and the tables cover every seed finished so far
(``--report-only`` rewrites them). The known_truth_long goal, 10 paired seeds:

    .venv/bin/python benchmarks/tune_vs_default.py --datasets known_truth_long --tune-once \
        --seeds 1 --backend ray --out runs/bench/tvd_ktl          # the study, 2 trials at once
    .venv/bin/python benchmarks/tune_vs_default.py --datasets known_truth_long --tune-once \
        --seeds 5 --first-seed 0 --threads 1 --out runs/bench/tvd_ktl &   # and, beside it,
    .venv/bin/python benchmarks/tune_vs_default.py --datasets known_truth_long --tune-once \
        --seeds 5 --first-seed 5 --threads 1 --out runs/bench/tvd_ktl

Full scale is 4 data sets x seeds x (trials + 2 teachers and 3-4 students): with the defaults
(3 seeds, 20 trials of a teacher and a student each) several hundred teacher trainings, many
CPU-core hours; it has not been run at that scale here.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from soteacher.experiment.regimes import bootstrap_ratio, t_interval

ROOT = Path(__file__).resolve().parent.parent

DATASETS = {                     # overrides of benchmarks/teacher_methods.yaml, as there
    "known_truth": [],
    "known_truth_long": ["teacher.train.epochs=100", "teacher.train.milestones=[60, 85]",
                         "student.train.epochs=60", "student.train.milestones=[40, 52]"],
    "mnist1d": ["data.name=mnist1d", "data.options={num_samples: 2000, train_split: 0.5}"],
    "digits": ["data.name=digits", "data.options={}",
               "teacher.model={name: cnn2d, options: {widths: [32, 64, 128]}}",
               "student.model={name: cnn2d, options: {widths: [8, 16, 32]}}"],
}
TINY = {
    "common": ["teacher.train.epochs=2", "teacher.train.milestones=[]",
               "teacher.train.eval_every=0", "student.train.epochs=1",
               "student.train.milestones=[]", "student.train.eval_every=0",
               "teacher.model.options.widths=[8, 16]", "student.model.options.widths=[4, 8]"],
    "known_truth": ["data.options.num_train=120", "data.options.num_test=80"],
    "known_truth_long": ["data.options.num_train=120", "data.options.num_test=80",
                         "teacher.train.epochs=3"],
    "mnist1d": ["data.options.num_samples=300"],
    "digits": ["data.options.test_fraction=0.5"],
}
TEACHERS = ("tuned", "soteacher", "standard")

def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Seed-paired ``a - b``: ``n``, ``mean``, 95% t-interval ``low``/``high`` (None for one
    pair) and ``wins`` (pairs where ``a > b``)."""
    d = [x - y for x, y in zip(a, b)]
    ci = t_interval(d)
    low, high = (ci["lo"], ci["hi"]) if len(d) > 1 else (None, None)
    return {"n": len(d), "mean": ci["mean"], "low": low, "high": high,
            "wins": sum(x > 0 for x in d)}


def gap_closed(acc: float, standard: float, oracle: float) -> float | None:
    """The fraction of the standard-to-oracle gap that ``acc`` closes (None without a gap)."""
    gap = oracle - standard
    return None if abs(gap) < 1e-12 else (acc - standard) / gap


def _student(cfg, data, name: str, teacher_fn, root: Path, log) -> float:
    """Test accuracy of the KD student of teacher ``name`` (trained unless finished before)."""
    from soteacher.engine.io import atomic_write_json
    from soteacher.pipeline import model_report, prepare_run_dir, run_student
    summary = root / f"student_{name}" / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())["test_acc"]
    teacher = teacher_fn()
    log(f"student of the {name} teacher")
    run_dir = prepare_run_dir(root / f"student_{name}", overwrite=True)
    student = run_student(cfg, data, teacher, run_dir, progress=False, name=f"student[{name}]")
    report = model_report(student, data, cfg.device)
    atomic_write_json(summary, report)
    return report["test_acc"]


def _teacher(cfg, data, method: str, root: Path, log):
    from soteacher.pipeline import load_model, prepare_run_dir, run_teacher
    run_dir = root / f"teacher_{method}"
    if (run_dir / "model.pt").is_file():
        return load_model(run_dir)
    log(f"{method} teacher")
    run_dir = prepare_run_dir(run_dir, overwrite=True)
    return run_teacher(cfg, data, run_dir, method=method, options={}, progress=False)


def default_soteacher(cfg):
    """``cfg`` with the default SoTeacher teacher: the method's own defaults, whatever the
    config's options."""
    import dataclasses
    return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, method="soteacher",
                                                                options={}))


def study(cfg, out: Path, trials: int, proxy: str, backend: str, log) -> dict[str, Any]:
    """The best trial of the study in ``out`` (run, or continued, until ``trials`` completed).

    Its choice is kept in ``out/chosen.json`` with the config, proxy and number of trials it was
    made for, so that processes sharing a finished study read it without taking the study's
    lock; a file made for anything else is ignored, and ``tune`` (which refuses a study of
    another config) decides."""
    from soteacher.config import config_to_dict
    from soteacher.engine.io import atomic_write_json
    from soteacher.tune import tune
    cfg = default_soteacher(cfg)
    key = json.loads(json.dumps({"config": config_to_dict(cfg), "proxy": proxy,
                                 "trials": trials}))
    chosen = out / "chosen.json"
    if chosen.is_file():
        saved = json.loads(chosen.read_text())
        if saved.get("for") == key:
            return saved["best"]
    result = tune(cfg, out, n_trials=trials, proxy=proxy, backend=backend,
                  log=lambda m: log(f"tune: {m}"))
    if result["best"] is None:
        raise RuntimeError(f"no trial completed in {out}")
    atomic_write_json(chosen, {"for": key, "best": result["best"]})
    return result["best"]


def _tuned_teacher(cfg, data, settings: dict, root: Path, log):
    """This seed's teacher trained with a shared study's chosen ``settings``."""
    from soteacher.pipeline import load_model, prepare_run_dir, run_teacher
    from soteacher.tune import trial_config
    run_dir = root / "teacher_tuned"
    if (run_dir / "model.pt").is_file():
        return load_model(run_dir)
    log(f"tuned teacher ({settings})")
    tcfg = trial_config(cfg, settings)
    run_dir = prepare_run_dir(run_dir, overwrite=True)
    return run_teacher(tcfg, data, run_dir, method=tcfg.teacher.method,
                       options=tcfg.teacher.options, progress=False)


def run_seed(cfg, root: Path, trials: int, proxy: str, log, *, best: dict | None = None,
             backend: str = "local") -> dict[str, Any]:
    """Tune, then the students of the tuned, default SoTeacher, standard (and oracle) teachers.

    ``best``: the best trial of a study shared by every seed, whose settings train this seed's
    tuned teacher; ``None``: this seed's own study (in ``root/tune``), whose best teacher is the
    tuned one."""
    from soteacher.data import oracle_teacher
    from soteacher.engine.evaluate import resolve_device
    from soteacher.pipeline import build_data, load_model
    cfg = default_soteacher(cfg)
    data = build_data(cfg)          # the trials' training split; the test split for the students
    device = resolve_device(cfg.device)
    if best is None:
        best = study(cfg, root / "tune", trials, proxy, backend, log)
        tuned = lambda: load_model(best["run_dir"]).to(device)     # noqa: E731
    else:
        tuned = lambda: _tuned_teacher(cfg, data, best["settings"], root, log)  # noqa: E731
    acc = {"tuned": _student(cfg, data, "tuned", tuned, root, log)}
    for method in ("soteacher", "standard"):
        acc[method] = _student(cfg, data, method,
                               lambda m=method: _teacher(cfg, data, m, root, log), root, log)
    if data.truth is not None:
        acc["oracle"] = _student(cfg, data, "oracle", lambda: oracle_teacher(data.truth), root,
                                 log)
    return {"students_test_acc": acc, "best": {k: best[k] for k in ("number", "value",
                                                                     "settings")}}


def summarise(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    seeds = sorted(per_seed)
    acc = {n: [per_seed[s]["students_test_acc"][n] for s in seeds]
           for n in per_seed[seeds[0]]["students_test_acc"]}
    out: dict[str, Any] = {"seeds": seeds,
                           "mean_test_acc": {n: statistics.fmean(v) for n, v in acc.items()},
                           "tuned_vs_soteacher": paired(acc["tuned"], acc["soteacher"]),
                           "tuned_vs_standard": paired(acc["tuned"], acc["standard"]),
                           "chosen": [per_seed[s]["best"]["settings"] for s in seeds]}
    if "oracle" in acc:
        m = out["mean_test_acc"]
        out["gap_closed"] = {n: gap_closed(m[n], m["standard"], m["oracle"])
                             for n in ("tuned", "soteacher")}
        gaps = [o - s for o, s in zip(acc["oracle"], acc["standard"])]
        out["gap_closed_interval"] = {
            n: bootstrap_ratio([a - s for a, s in zip(acc[n], acc["standard"])], gaps)
            for n in ("tuned", "soteacher")}
    return out


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def table(results: dict[str, Any], proxy: str) -> str:
    head = ["data", "seeds", "tuned %", "SoTeacher %", "standard %", "oracle %",
            "tuned - SoTeacher (points, 95% CI, seeds ahead)",
            "tuned - standard (points, 95% CI, seeds ahead)",
            "gap closed: tuned / SoTeacher (paired bootstrap 95%)"]
    lines = [f"Students' test accuracy (KD); teacher tuned by `{proxy}` on the validation split",
             "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for ds, r in results.items():
        m = r["mean_test_acc"]

        def diff(p: dict) -> str:
            ci = (f" [{_pct(p['low'], True)}, {_pct(p['high'], True)}]"
                  if p["low"] is not None else "")
            return f"{_pct(p['mean'], True)}{ci} ({p['wins']}/{p['n']})"
        gap, ci = r.get("gap_closed"), r.get("gap_closed_interval") or {}

        def closed(n: str) -> str:
            if gap[n] is None:
                return "-"
            lo, hi = ci.get(n, {}).get("lo"), ci.get(n, {}).get("hi")
            known = lo is not None and not math.isnan(lo)     # nan: fewer than two seeds
            return f"{gap[n]:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if known else "")
        gap_text = " / ".join(closed(n) for n in ("tuned", "soteacher")) if gap else "-"
        lines.append("| " + " | ".join([
            ds, str(len(r["seeds"])), _pct(m["tuned"]), _pct(m["soteacher"]),
            _pct(m["standard"]), _pct(m.get("oracle")), diff(r["tuned_vs_soteacher"]),
            diff(r["tuned_vs_standard"]), gap_text]) + " |")
    lines.append("")
    for ds, r in results.items():
        chosen = ", ".join(f"{c['method']}" + (f" (lambda_CR {c['consistency_weight']:.3g}, "
                                               f"lambda_LR {c['lipschitz_weight']:.2g}, "
                                               f"{c['consistency_schedule']})"
                                               if "consistency_weight" in c else "")
                           + (f", {c['epochs']} epochs" if "epochs" in c else "")
                           for c in r["chosen"])
        lines.append(f"- {ds}: chosen per seed: {chosen}")
    return "\n".join(lines)


def main() -> None:
    from soteacher.config import apply_overrides, load_experiment_config
    from soteacher.engine.allocator import tune_cpu_allocator
    from soteacher.engine.io import atomic_write_json, atomic_write_text
    from soteacher.tune import proxy_names
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "benchmarks" / "teacher_methods.yaml")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "tune_vs_default")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--seeds", type=int, default=3, help="N seeds, from --first-seed")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--tune-once", action="store_true",
                   help="one study (seed 0's split) whose choice trains every seed's teacher")
    p.add_argument("--backend", default="local", choices=("local", "ray"),
                   help="where the study's trials run")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the tables from the seeds finished in --out; train nothing")
    p.add_argument("--trials", type=int, default=20, help="completed trials per study")
    p.add_argument("--proxy", default="student_val_acc", choices=proxy_names())
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--tiny", action="store_true",
                   help="toy scale (2 seeds, 3 trials, 1-3 epochs), to check that it all runs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    tune_cpu_allocator()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.seeds, args.trials = min(args.seeds, 2), min(args.trials, 3)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.0f}s] {msg}", file=sys.stderr,
                            flush=True)
    base = load_experiment_config(args.config).base()
    results: dict[str, Any] = {}
    for ds in args.datasets:
        overrides = list(DATASETS[ds])
        if args.tiny:
            overrides += TINY["common"] + TINY[ds]
        if args.device:
            overrides.append(f"device={args.device}")
        cfg = apply_overrides(base, overrides + args.overrides, notes=[])
        seeds = [] if args.report_only else range(args.first_seed,
                                                   args.first_seed + args.seeds)
        best = None
        if args.tune_once and seeds:
            log(f"== {ds}, the study (seed 0's split)")
            best = study(apply_overrides(cfg, ["seed=0"], notes=[]), args.out / ds / "tune",
                         args.trials, args.proxy, args.backend, lambda m: log(f"{ds}: {m}"))
        for seed in seeds:
            log(f"== {ds}, seed {seed}")
            result = run_seed(apply_overrides(cfg, [f"seed={seed}"], notes=[]),
                              args.out / ds / f"seed{seed}", args.trials, args.proxy,
                              lambda m, ds=ds, s=seed: log(f"{ds} seed {s}: {m}"),
                              best=best, backend=args.backend)
            atomic_write_json(args.out / ds / f"seed{seed}" / "result.json", result)
        per_seed = {int(f.parent.name[4:]): json.loads(f.read_text())
                    for f in (args.out / ds).glob("seed*/result.json")}
        if per_seed:
            results[ds] = {**summarise(per_seed), "per_seed": per_seed}
    text = table(results, args.proxy)
    atomic_write_json(args.out / "results.json",
                      {"proxy": args.proxy, "trials": args.trials, "tiny": args.tiny,
                       "wall_time_s": time.perf_counter() - t0, "datasets": results})
    atomic_write_text(args.out / "summary.md", text + "\n")
    print(text)
    print(f"\nresults: {args.out / 'results.json'} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
