"""One grid of 16 small runs on the local backend and on Ray with 2 workers, side by side.

The grid: known_truth (1,000 training samples), teachers standard and soteacher x distillers KD,
DKD and DIST x seeds 0 and 1 = 4 teachers and 12 students. Each mode is the ``soteacher
experiment`` command in a fresh process (imports, Ray's start, the report: what a user waits
for), into its own directory, in this order:

* ``local-1``: the local backend, 1 torch thread;
* ``ray-2x1``: a local Ray instance (started by the command), 2 runs at once, 1 thread each;
* ``local-2``: the local backend, 2 torch threads (the default on a 2-core machine).

Before and after, the machine's load and a CPU-capacity probe: two concurrent busy processes
against one alone (2.0x speed-up possible when each gets a free core, 1.0x when they share one).
The metrics of ``local-1`` and ``ray-2x1`` must be identical (same seed and threads per run).

    .venv/bin/python benchmarks/ray_grid.py --out /tmp/ray_grid           # the table and JSON
    .venv/bin/python benchmarks/ray_grid.py --out /tmp/rg --scale 0.25    # a quick look
    .venv/bin/python benchmarks/ray_grid.py --out /tmp/rg3 --scale 3      # runs of ~11 s, where
                                                  # Ray's fixed start-up is under 10%
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

GRID = {
    "seed": 0,
    "data": {"name": "known_truth",
             "options": {"num_classes": 10, "input_shape": [1, 32], "num_train": 1000,
                         "num_test": 1000, "seed": 0}},
    "teacher": {"model": {"name": "cnn1d", "options": {"widths": [32, 64, 128]}},
                "train": {"epochs": 20, "batch_size": 64, "milestones": [], "eval_every": 0}},
    "student": {"model": {"name": "cnn1d", "options": {"widths": [16, 32, 64]}},
                "train": {"epochs": 15, "batch_size": 64, "milestones": [], "eval_every": 0}},
    "experiment": {"teachers": ["standard", "soteacher"], "distillers": ["kd", "dkd", "dist"],
                   "seeds": [0, 1]},
}

MODES = {
    "local-1": ["--backend", "local", "--threads", "1"],
    "ray-2x1": ["--backend", "ray", "--threads", "1", "--set", "experiment.resources={cpus: 1}"],
    "local-2": ["--backend", "local", "--threads", "2"],
}

BUSY = "import sys, time\nt = time.perf_counter()\nx = 0\nfor i in range(int(sys.argv[1])): x += i\nprint(time.perf_counter() - t)"


def load() -> dict:
    with open("/proc/loadavg") as f:
        parts = f.read().split()
    others = subprocess.run(["pgrep", "-f", "teacher_methods|distillers.py"], capture_output=True,
                            text=True).stdout.split()
    return {"loadavg_1m": float(parts[0]), "runnable": int(parts[3].split("/")[0]),
            "benchmark_processes": len(others)}


def capacity(n: int = 30_000_000) -> float:
    """Speed-up two concurrent CPU-bound processes get over one alone, here and now."""
    run = lambda: subprocess.Popen([sys.executable, "-c", BUSY, str(n)], stdout=subprocess.PIPE,
                                   text=True)
    alone = float(run().communicate()[0])
    pair = [run(), run()]
    together = max(float(p.communicate()[0]) for p in pair)
    return 2 * alone / together


def run_mode(name: str, config: Path, out: Path, extra: list[str]) -> dict:
    before = load()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "soteacher", "experiment", str(config),
                           "--out", str(out), "--quiet", "--no-plots", *extra],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    status = json.loads((out / "known_truth" / "status.json").read_text())
    runs = status["runs"]
    first = min(r["start_s"] for r in runs)
    return {"mode": name, "wall_s": wall, "grid_s": status["elapsed_s"],
            "startup_s": status["startup_s"], "first_start_s": first,
            "run_seconds_sum": sum(r["seconds"] for r in runs), "runs": len(runs),
            "nodes": sorted({r.get("host", "here") for r in runs}),
            "load_before": before, "load_after": load()}


def metrics(out: Path) -> dict:
    return {(r["kind"], r["teacher"], r["distiller"], r["seed"]):
            {k: v for k, v in r.items() if k.startswith(("teacher_", "student_"))
             and not k.endswith("_dir")}
            for r in csv.DictReader((out / "results.csv").open())}


def scaled(scale: float) -> dict:
    grid = json.loads(json.dumps(GRID))
    for phase in ("teacher", "student"):
        grid[phase]["train"]["epochs"] = max(1, round(grid[phase]["train"]["epochs"] * scale))
    return grid


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="scratch directory (emptied)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the epochs")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args()
    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    config = a.out / "grid.yaml"
    config.write_text(yaml.safe_dump(scaled(a.scale), sort_keys=False))
    print(f"{os.cpu_count()} CPUs; machine before: {load()}", flush=True)
    cap_before = capacity()
    print(f"capacity probe: 2 busy processes run {cap_before:.2f}x as fast as 1", flush=True)
    rows = []
    for name in a.modes:
        r = run_mode(name, config, a.out / name, MODES[name])
        rows.append(r)
        print(json.dumps(r), flush=True)
    cap_after = capacity()
    print(f"capacity probe after: {cap_after:.2f}x", flush=True)
    by = {r["mode"]: r for r in rows}
    result = {"rows": rows, "capacity_before": cap_before, "capacity_after": cap_after,
              "cpu_count": os.cpu_count(), "scale": a.scale}
    if "local-1" in by and "ray-2x1" in by:
        result["identical_local1_ray"] = (metrics(a.out / "local-1")
                                          == metrics(a.out / "ray-2x1"))
    print("\n| mode | command wall s | grid s | Ray start s | first run starts at s | "
          "sum of run s | load before -> after |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        st = "-" if r["startup_s"] is None else f"{r['startup_s']:.1f}"
        print(f"| {r['mode']} | {r['wall_s']:.1f} | {r['grid_s']:.1f} | {st} | "
              f"{r['first_start_s']:.1f} | {r['run_seconds_sum']:.1f} | "
              f"{r['load_before']['loadavg_1m']:.1f} -> {r['load_after']['loadavg_1m']:.1f} |")
    for base in ("local-1", "local-2"):
        if base in by and "ray-2x1" in by:
            result[f"speedup_vs_{base}"] = by[base]["wall_s"] / by["ray-2x1"]["wall_s"]
            print(f"speed-up of ray-2x1 over {base} (command wall): "
                  f"{result[f'speedup_vs_{base}']:.2f}x")
    if "ray-2x1" in by:
        r = by["ray-2x1"]
        result["startup_share"] = r["first_start_s"] / r["wall_s"]
        print(f"Ray start-up (until the first run starts): {r['first_start_s']:.1f} s = "
              f"{100 * result['startup_share']:.1f}% of the command's wall time")
    if "identical_local1_ray" in result:
        print(f"local-1 and ray-2x1 metrics identical: {result['identical_local1_ray']}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
