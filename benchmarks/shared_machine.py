"""Training speed on a shared CPU: idle against one competing CPU-bound process, side by side.

A shared workstation or laptop usually has something else busy on it. On a machine with few
cores, that is where PyTorch's CPU defaults go wrong: one thread per core, and OpenMP worker
threads that spin while they wait for work. This script measures, in one run, how long the same
work takes with and without one competing CPU-bound process (a pure-Python busy loop this
script starts and stops itself), alternating the two in every round, and reports the ratios.

Part ``epochs``: teacher epochs of the demo (the SoTeacher teacher: cnn1d 64/128/256, 2,000
samples, batch 64) in a fresh process per measurement, for each thread count and OpenMP wait
policy in ``--settings``; the policy must be in the environment before torch is imported, so
every measurement is its own process. One warm-up epoch, then ``--epochs`` timed ones.

Part ``demo``: the wall time of ``soteacher demo --quick`` (and with ``--full`` the full
``soteacher demo``) with the command's own defaults, idle and competing.

Every measurement records the 1-minute load average before it starts and the number of runnable
processes, so background load on the machine shows in the results.

    .venv/bin/python benchmarks/shared_machine.py --part epochs --rounds 3 --json runs/bench/shared_epochs.json
    .venv/bin/python benchmarks/shared_machine.py --part demo --rounds 2 --full --json runs/bench/shared_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (label, threads, environment): "default" leaves OMP_WAIT_POLICY unset (OpenMP's spin-then-sleep)
SETTINGS = {
    "2-spin": (2, {}),
    "1-spin": (1, {}),
    "2-passive": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "1-passive": (1, {"OMP_WAIT_POLICY": "PASSIVE"}),
}

# The child: torch is imported only after the parent has set the environment.
EPOCH_CHILD = r"""
import json, sys, time
import torch
threads, epochs = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
from soteacher.config import load_config
from soteacher.engine.allocator import tune_cpu_allocator
from soteacher.engine.trainer import Trainer
from soteacher.pipeline import build_data, build_model
from soteacher.teachers import build_teacher_objective
tune_cpu_allocator()
cfg = load_config()
data = build_data(cfg)
torch.manual_seed(0)
model = build_model(cfg.teacher.model, data)
obj = build_teacher_objective("soteacher", cfg.teacher.options, num_samples=len(data.train),
                              num_classes=data.num_classes, num_epochs=cfg.teacher.train.epochs)
t = Trainer(model, obj, data.train, cfg.teacher.train, augment=data.augment, progress=False)
t.run_epoch(1)
t0 = time.perf_counter()
for e in range(2, 2 + epochs):
    t.run_epoch(e)
print(json.dumps({"seconds_per_epoch": (time.perf_counter() - t0) / epochs,
                  "threads": torch.get_num_threads()}))
"""


def load() -> dict:
    with open("/proc/loadavg") as f:
        parts = f.read().split()
    running = int(parts[3].split("/")[0])
    return {"loadavg_1m": float(parts[0]), "runnable": running}


class Competitor:
    """One CPU-bound process (a busy loop), started and stopped by this script."""

    def __init__(self, on: bool) -> None:
        self.on, self.proc = on, None

    def __enter__(self):
        if self.on:
            self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, **extra}


def epoch_run(threads: int, extra_env: dict, epochs: int) -> dict:
    out = subprocess.run([sys.executable, "-c", EPOCH_CHILD, str(threads), str(epochs)],
                         env=clean_env(extra_env), capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"the measurement failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def demo_run(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "soteacher", "demo", "--quiet", "--out",
                        str(Path(d) / "demo"), *args], env=clean_env({}), cwd=ROOT, check=True,
                       capture_output=True)
        return {"seconds": time.perf_counter() - t0}


def measure(label: str, fn, rounds: int, log) -> dict:
    rows = {"idle": [], "competing": []}
    for r in range(rounds):
        # alternate which condition goes first, so drift in background load hits both alike
        order = ["idle", "competing"] if r % 2 == 0 else ["competing", "idle"]
        for cond in order:
            before = load()
            with Competitor(cond == "competing"):
                res = fn()
            res.update(before)
            rows[cond].append(res)
            log(f"{label} round {r + 1} {cond}: {json.dumps(res)}")
    return rows


def summarise(rows: dict, key: str) -> dict:
    idle = [r[key] for r in rows["idle"]]
    comp = [r[key] for r in rows["competing"]]
    ratios = [c / i for c, i in zip(comp, idle)]
    return {"idle_median": statistics.median(idle), "competing_median": statistics.median(comp),
            "ratio": statistics.median(comp) / statistics.median(idle),
            "ratio_range": [min(ratios), max(ratios)],
            "loadavg_range": [min(r["loadavg_1m"] for v in rows.values() for r in v),
                              max(r["loadavg_1m"] for v in rows.values() for r in v)],
            "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["epochs", "demo"], required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1, help="timed teacher epochs per measurement")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--full", action="store_true", help="also time the full demo (part demo)")
    p.add_argument("--no-quick", action="store_true",
                   help="part demo: skip 'demo --quick' (time only the full demo)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    a = p.parse_args()
    log = lambda m: print(m, file=sys.stderr, flush=True)
    results: dict = {"part": a.part, "cpus": os.cpu_count(),
                     "affinity": len(os.sched_getaffinity(0)), "started": time.ctime(),
                     "load_at_start": load()}
    if a.part == "epochs":
        for name in a.settings:
            threads, env = SETTINGS[name]
            rows = measure(name, lambda: epoch_run(threads, env, a.epochs), a.rounds, log)
            results[name] = summarise(rows, "seconds_per_epoch")
    else:
        if not a.no_quick:
            results["demo --quick"] = summarise(
                measure("demo --quick", lambda: demo_run(["--quick"]), a.rounds, log), "seconds")
        if a.full:
            results["demo"] = summarise(measure("demo", lambda: demo_run([]), 1, log), "seconds")
    results["load_at_end"] = load()
    print(f"{'what':<14} {'idle s':>8} {'competing s':>12} {'ratio':>6}  rounds      load(1m)")
    for k, v in results.items():
        if isinstance(v, dict) and "ratio" in v:
            lo, hi = v["ratio_range"]
            print(f"{k:<14} {v['idle_median']:8.2f} {v['competing_median']:12.2f} "
                  f"{v['ratio']:6.2f}  {lo:.2f}-{hi:.2f}  {v['loadavg_range'][0]:.1f}-"
                  f"{v['loadavg_range'][1]:.1f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
