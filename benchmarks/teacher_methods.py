"""Every teacher-training method x KD, DKD and FitNet x 5 seeds on known_truth, mnist1d and
digits: results.csv, summary.md, premise.md and figures, all copied to ``docs/teacher_methods/``.

The grid is ``benchmarks/teacher_methods.yaml`` (the known-truth settings); mnist1d keeps its
models (on 2,000 generated sequences, half for training) and digits swaps in 2-D CNNs. All runs
go into one experiment directory, so the report covers the three data sets. Finished runs are
skipped when the script is started again (kill it at any time and restart), and processes
given different ``--datasets`` (or ``--set experiment.seeds=[...]``) share the directory.

    .venv/bin/python benchmarks/teacher_methods.py                  # about 10 CPU-core hours
    .venv/bin/python benchmarks/teacher_methods.py --device auto    # on a GPU if there is one
    .venv/bin/python benchmarks/teacher_methods.py --tiny --out /tmp/tm --plots /tmp/tm/plots

A partial rerun (e.g. only the FitNet students after a change to FitNet) reruns what it is told
into a new directory and takes every other run from the committed results.csv:

    .venv/bin/python benchmarks/teacher_methods.py --out runs/bench/tm_fitnet \
        --set "experiment.distillers=[fitnet]" --plots /tmp/unused
    .venv/bin/python benchmarks/teacher_methods.py --out runs/bench/tm_fitnet --report-only \
        --previous docs/teacher_methods/results.csv
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from soteacher.config import load_experiment_config
from soteacher.engine.allocator import tune_cpu_allocator
from soteacher.experiment import run_experiment, write_report
from soteacher.experiment.report import read_previous, student_cells, teacher_cells

ROOT = Path(__file__).resolve().parent.parent

DATASETS = {
    "known_truth": [],
    # 1,000 training and 1,000 test sequences (the generator's default 4,000 make every method
    # score 98-99%, and cost four times as much)
    "mnist1d": ["data.name=mnist1d", "data.options={num_samples: 2000, train_split: 0.5}"],
    "digits": ["data.name=digits", "data.options={}",
               "teacher.model={name: cnn2d, options: {widths: [32, 64, 128]}}",
               "student.model={name: cnn2d, options: {widths: [8, 16, 32]}}"],
    # the demo's own length (teacher 100 epochs, student 60), where the standard teacher has
    # time to overfit its training labels: the regime SoTeacher is meant for
    "known_truth_long": ["experiment.name=known_truth_long",
                         "teacher.train.epochs=100", "teacher.train.milestones=[60, 85]",
                         "student.train.epochs=60", "student.train.milestones=[40, 52]"],
}

# A smoke test: the whole grid at toy scale (about a minute on a laptop CPU).
TINY = {
    "common": ["teacher.train.epochs=2", "teacher.train.milestones=[]",
               "teacher.train.eval_every=0", "student.train.epochs=1",
               "student.train.milestones=[]", "student.train.eval_every=0",
               "teacher.model.options.widths=[8, 16]", "student.model.options.widths=[4, 8]",
               "experiment.seeds=[0, 1]"],
    "known_truth": ["data.options.num_train=120", "data.options.num_test=80"],
    "mnist1d": ["data.options.num_samples=300"],
    "digits": ["data.options.test_fraction=0.5"],
    "known_truth_long": ["data.options.num_train=120", "data.options.num_test=80"],
}


def _cell(mean: float, std: float | None, digits: int = 2, scale: float = 1.0,
          signed: bool = False) -> str:
    text = f"{mean * scale:+.{digits}f}" if signed else f"{mean * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def _names(entries: list) -> list[str]:
    return [e if isinstance(e, str) else e.get("name") or e["method"] for e in entries]


def _ordered(names: list[str], order: list[str]) -> list[str]:
    rank = {n: i for i, n in enumerate(order)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def overview(rows: list[dict], baseline: str, teachers_order: list[str] = (),
             distillers_order: list[str] = ()) -> str:
    """One table per data set from the report's rows: each teacher method's own test accuracy,
    training-input ECE (and distance to p* on known-truth data), and for every distiller its
    students' test accuracy and their seed-paired difference to the students of the
    ``baseline`` teacher, with the number of seeds where it is ahead. One teacher/student pair
    per data set, as in this grid."""
    metrics = ["teacher_test_acc", "teacher_train_ece", "teacher_train_tv_true"]
    teachers = {(c["dataset"], c["teacher"]): c for c in teacher_cells(rows, metrics)}
    students = {(c["dataset"], c["teacher"], c["distiller"]): c
                for c in student_cells(rows, baseline=baseline)}
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        methods = _ordered([t for d, t in teachers if d == ds], list(teachers_order))
        distillers = _ordered(list(dict.fromkeys(d for s, _, d in students if s == ds)),
                              list(distillers_order))
        seeds = max(teachers[ds, t]["teacher_test_acc"][2] for t in methods)
        truth = any("teacher_train_tv_true" in teachers[ds, t] for t in methods)
        head = ["teacher", "teacher test acc %", "teacher train ECE"]
        head += ["teacher train TV(p*)"] if truth else []
        for d in distillers:
            head += [f"{d} student %", f"{d} vs {baseline} (points, seeds ahead)"]
        out += [f"### {ds} ({seeds} seeds)", "", "| " + " | ".join(head) + " |",
                "|" + " --- |" * len(head)]
        # a data set may lack the baseline teacher (a partial rerun): its rows keep no diffs
        for t in [m for m in methods if m == baseline] + [m for m in methods if m != baseline]:
            own = teachers[ds, t]
            cells = [f"`{t}`", _cell(*own["teacher_test_acc"][:2], scale=100),
                     _cell(*own["teacher_train_ece"][:2], digits=3)]
            if truth:
                cells.append(_cell(*own["teacher_train_tv_true"][:2], digits=3))
            for d in distillers:
                c = students.get((ds, t, d))
                if c is None:
                    cells += ["-", "-"]
                    continue
                cells.append(_cell(c["mean"], c["std"], scale=100))
                if not c["diff_n"]:
                    cells.append("-")
                    continue
                diff = _cell(c["diff_mean"], c["diff_std"] or 0.0, scale=100, signed=True)
                cells.append(f"{diff} ({c['diff_ahead']}/{c['diff_n']})")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "benchmarks" / "teacher_methods.yaml")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "teacher_methods")
    p.add_argument("--plots", type=Path, default=ROOT / "docs" / "teacher_methods")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--seeds", type=int, default=None, help="use seeds 0..N-1 (default: the "
                                                           "config's, 0..4)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, auto, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--tiny", action="store_true", help="toy scale, to check that it all runs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing; remake the report from --out (and --previous)")
    p.add_argument("--previous", type=Path, action="append", default=[], metavar="CSV",
                   help="a results.csv of an earlier run: its rows fill in the runs this "
                        "invocation does not (re)run, e.g. after rerunning only the FitNet "
                        "students with --set 'experiment.distillers=[fitnet]'; repeatable, "
                        "a run found in several takes the first CSV's row")
    p.add_argument("--drop-previous", action="append", default=[],
                   metavar="COLUMN=VALUE[,COLUMN=VALUE...]",
                   help="leave out the --previous rows whose every COLUMN equals its VALUE (runs "
                        "whose method changed and that were not rerun), e.g. "
                        "'dataset=mnist1d,distiller=fitnet'; repeatable")
    args = p.parse_args()
    tune_cpu_allocator()                # as the soteacher command does (see engine/allocator.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    drop = []
    for rule in args.drop_previous:
        terms = [term.partition("=") for term in rule.split(",")]
        if not all(col and eq for col, eq, _ in terms):
            p.error(f"--drop-previous {rule!r}: give COLUMN=VALUE terms joined by commas")
        drop.append({col: value for col, _, value in terms})
    try:                                        # before anything runs: a rule must name columns
        previous = read_previous(args.previous, drop)
    except (OSError, ValueError) as e:
        p.error(f"--previous / --drop-previous: {e}")
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.0f}s] {msg}", file=sys.stderr,
                            flush=True)
    baseline = "standard"
    for ds in args.datasets:
        overrides = list(DATASETS[ds])
        if args.tiny:
            overrides += TINY["common"] + TINY[ds]
        if args.seeds is not None:
            overrides.append(f"experiment.seeds={list(range(args.seeds))}")
        if args.device:
            overrides.append(f"device={args.device}")
        cfg = load_experiment_config(args.config, overrides + args.overrides)
        baseline = cfg.experiment.baseline
        if args.report_only:
            continue
        log(f"== {ds}")
        run_experiment(cfg, args.out, log=lambda m, ds=ds: log(f"{ds} {m}"))
    report = write_report(args.out, baseline=baseline, plots_dir=args.plots, previous=previous)
    args.plots.mkdir(parents=True, exist_ok=True)
    for name in ("summary_md", "results_csv", "premise_md"):    # the tables go with the figures
        shutil.copyfile(report[name], args.plots / Path(report[name]).name)
    table = overview(report["rows"], baseline, _names(cfg.experiment.teachers),
                     _names(cfg.experiment.distillers))
    (args.plots / "overview.md").write_text(table)
    print(report["summary"])
    print(table)
    print(f"\nresults: {report['results_csv']}; summary: {report['summary_md']}; "
          f"{len(report['plots'])} figures in {args.plots} "
          f"({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
