"""Every registered distiller with a standard and a SoTeacher teacher, several seeds.

For each dataset and seed: train the two teachers once (the demo config's teacher), then distil
the demo config's student from each with every distiller (its default options; KD keeps the
config's; CRD uses ``nce_k=1024`` negatives, as its default of 16384 exceeds these training
sets and makes every step contrast against the whole set). A method that cannot pair the two
networks (e.g. FSP needs equal channel numbers) is reported as not applicable. Prints a markdown
table of student test accuracy (mean +- std over seeds) and writes ``OUT/results.json``.
Finished runs are skipped when the script is run again; processes given different
``--first-seed`` share ``--out`` (a run that another live process is training is an error,
never trained twice).

    .venv/bin/python benchmarks/distillers.py --seeds 3 --out runs/bench/distillers
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from soteacher.config import apply_overrides, load_config
from soteacher.distillers import list_distillers
from soteacher.engine.allocator import tune_cpu_allocator
from soteacher.engine.evaluate import evaluate
from soteacher.engine.io import atomic_write_json
from soteacher.experiment.layout import LOCK
from soteacher.experiment.lock import RunLock
from soteacher.pipeline import build_data, load_model, run_student, run_teacher

METHOD_OPTIONS = {"crd": ["distill.options={nce_k: 1024}"]}

DATASET_OVERRIDES = {
    "known_truth": [],
    "mnist1d": ["data.name=mnist1d", "data.options={}"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench/distillers"))
    p.add_argument("--datasets", nargs="+", default=list(DATASET_OVERRIDES))
    p.add_argument("--methods", nargs="+", default=list_distillers())
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args()
    tune_cpu_allocator()                # as the soteacher command does (see engine/allocator.py)
    torch.set_num_threads(args.threads)
    results: dict = {}
    t0 = time.perf_counter()
    for ds in args.datasets:
        base = load_config(None, DATASET_OVERRIDES[ds] + args.overrides)
        data = build_data(base)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            cfg = apply_overrides(base, [f"seed={seed}"])
            root = args.out / ds / f"seed{seed}"
            teachers = {}
            for tm in ("standard", "soteacher"):
                tdir = root / f"teacher_{tm}"
                if not (tdir / "model.pt").is_file():
                    tdir.mkdir(parents=True, exist_ok=True)
                    with RunLock(tdir / LOCK):  # processes sharing --out: one trains a run
                        if not (tdir / "model.pt").is_file():
                            run_teacher(cfg, data, tdir, method=tm,
                                        options=cfg.teacher.options if tm == "soteacher" else {},
                                        progress=False)
                teachers[tm] = load_model(tdir)
                acc = evaluate(teachers[tm], data.test)["acc"]
                results.setdefault(ds, {}).setdefault("teacher", {}).setdefault(tm, []).append(acc)
            for method in args.methods:
                mcfg = apply_overrides(cfg, [f"distill.method={method}"]
                                       + ([] if method == "kd" else ["distill.options={}"])
                                       + METHOD_OPTIONS.get(method, []))
                for tm, teacher in teachers.items():
                    sdir = root / f"student_{method}_{tm}"
                    summary = sdir / "summary.json"
                    if not summary.is_file():
                        sdir.mkdir(parents=True, exist_ok=True)
                        with RunLock(sdir / LOCK):
                            try:
                                if not summary.is_file():
                                    student = run_student(mcfg, data, teacher, sdir,
                                                          progress=False)
                                    atomic_write_json(summary, evaluate(student, data.test))
                            except ValueError as e:
                                results[ds].setdefault("not applicable", {})[method] = str(e)
                                break
                    acc = json.loads(summary.read_text())["acc"]
                    results[ds].setdefault(method, {}).setdefault(tm, []).append(acc)
                print(f"[{time.perf_counter() - t0:6.0f}s] {ds} seed {seed} {method} done",
                      flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def fmt(vals: list[float]) -> str:
    m = 100 * statistics.fmean(vals)
    return f"{m:.2f} ± {100 * statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{m:.2f}"


def table(results: dict) -> str:
    lines = []
    for ds, rows in results.items():
        lines += [f"\n{ds}: student test accuracy % (mean ± std over seeds)\n",
                  "| distiller | standard teacher | SoTeacher teacher | difference (paired) |",
                  "| --- | ---: | ---: | ---: |"]
        for method, r in rows.items():
            if method == "teacher":
                lines.append(f"| (the teachers) | {fmt(r['standard'])} | {fmt(r['soteacher'])} | "
                             f"{fmt([b - a for a, b in zip(r['standard'], r['soteacher'])])} |")
                continue
            if method == "not applicable":
                lines += [f"| {m} | n/a | n/a | {why.splitlines()[0][:60]}... |"
                          for m, why in r.items()]
                continue
            diff = [b - a for a, b in zip(r["standard"], r["soteacher"])]
            lines.append(f"| {method} | {fmt(r['standard'])} | {fmt(r['soteacher'])} | "
                         f"{fmt(diff)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
