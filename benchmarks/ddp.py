"""Multi-process training: consistency-bank memory per process, and 2 vs 1 process wall time.

1. Bank memory per process (the bank is replicated: every process holds all of it) for CIFAR-100
   (50,000 x 100) and ImageNet (1,281,167 x 1000) in each storage mode (``bank_dtype`` float32 /
   float16 / bfloat16; ``bank_device`` auto = the training device, or cpu = pinned host memory on
   CUDA machines). Computed from the element size (rows + the int32 update counts), and measured
   by allocating a ``ConsistencyBank``: for CIFAR by default, for ImageNet with
   ``--measure-imagenet`` (needs about 5 GB of free memory): storage bytes, the growth of the
   process's resident memory, and on CUDA machines the growth of allocated GPU memory.
2. Wall time of a small SoTeacher run (an MLP on synthetic data, fixed global batch) on the CPU
   with 2 processes (DDP, gloo, loopback) against 1 process, each process with ``--threads``
   threads; the ratio is 2-process / 1-process time of ``Trainer.fit()`` (startup excluded; the
   whole wall time including process start is printed too).

    .venv/bin/python benchmarks/ddp.py
    .venv/bin/python benchmarks/ddp.py --samples 8192 --epochs 3 --threads 1 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

SIZES = {"CIFAR-100": (50_000, 100), "ImageNet": (1_281_167, 1000)}
DTYPES = ("float32", "float16", "bfloat16")
ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2}


def computed_bytes(n: int, c: int, dtype: str) -> int:
    return n * c * ELEMENT[dtype] + n * 4          # rows + int32 counts


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(n: int, c: int, dtype: str, device: str) -> dict[str, float]:
    """Allocate a bank in a fresh process (so that freed memory of an earlier allocation cannot
    hide the growth) and report what it takes."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import ddp; "
            "print(json.dumps(ddp.measure_here(*[int(a) for a in sys.argv[2:4]], *sys.argv[4:])))")
    got = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)),
                          str(n), str(c), dtype, device], capture_output=True, text=True)
    if got.returncode != 0:
        raise RuntimeError(f"measuring a bank failed:\n{got.stderr}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def measure_here(n: int, c: int, dtype: str, device: str) -> dict[str, float]:
    from soteacher.regularizers import ConsistencyBank
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.zeros(1, device="cuda")      # the CUDA context is not the bank's
    out: dict[str, float] = {}
    rss0 = rss_bytes()
    gpu0 = torch.cuda.memory_allocated() if cuda else 0
    bank = ConsistencyBank(n, c, dtype=dtype, device=device)
    if device == "auto" and cuda:
        bank.to("cuda")
        torch.cuda.synchronize()
    out["storage"] = (bank.bank.untyped_storage().nbytes()
                      + bank.count.untyped_storage().nbytes())
    out["rss_growth"] = rss_bytes() - rss0
    if cuda:
        out["gpu_growth"] = torch.cuda.memory_allocated() - gpu0
        out["pinned"] = float(bank.bank.is_pinned())
    del bank
    return out


def fmt(b: float) -> str:
    return f"{b / 1e9:8.3f} GB" if abs(b) >= 1e8 else f"{b / 1e6:8.1f} MB"


def memory_report(measure_imagenet: bool) -> dict:
    cuda = torch.cuda.is_available()
    devices = ("auto", "cpu")
    print("Consistency bank per process (replicated; rows + int32 counts)")
    print(f"{'dataset':<10} {'dtype':<9} {'device':<6} {'computed':>11} {'storage':>11} "
          f"{'RSS growth':>11}" + (f" {'GPU growth':>11}" if cuda else ""))
    rows = []
    for name, (n, c) in SIZES.items():
        for dtype in DTYPES:
            for device in devices:
                row = {"dataset": name, "samples": n, "classes": c, "dtype": dtype,
                       "device": device, "computed_bytes": computed_bytes(n, c, dtype)}
                if name == "CIFAR-100" or measure_imagenet:
                    row.update(measure(n, c, dtype, device))
                rows.append(row)
                cells = [fmt(row["computed_bytes"])]
                for key in ("storage", "rss_growth") + (("gpu_growth",) if cuda else ()):
                    cells.append(fmt(row[key]) if key in row else f"{'-':>11}")
                where = ("GPU" if cuda else "CPU") if device == "auto" else (
                    "pinned" if cuda else "CPU")
                print(f"{name:<10} {dtype:<9} {device:<6} " + " ".join(f"{x:>11}" for x in cells)
                      + f"   ({where})")
    print("(auto = the training device; cpu = host memory, pinned on CUDA machines. RSS growth "
          "of a CPU allocation counts the pages touched by zero-filling.)\n")
    return {"memory": rows}


# ---- timing -----------------------------------------------------------------------------------
CHILD = r"""
import json, sys, time
import torch
from torch import nn
threads, samples, epochs, batch = (int(a) for a in sys.argv[1:5])
torch.set_num_threads(threads)
from soteacher import ArrayDataset, Trainer, TrainSettings
from soteacher.engine import distributed
from soteacher.teachers import build_teacher_objective

with distributed.process_group():
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(samples, 64, generator=g),
                        torch.randint(0, 100, (samples,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 100))
    obj = build_teacher_objective("soteacher", {}, num_samples=samples, num_classes=100,
                                  num_epochs=epochs)
    t = Trainer(model, obj, data, TrainSettings(epochs=epochs, batch_size=batch, lr=0.05),
                seed=0, progress=False)
    distributed.barrier()
    t0 = time.perf_counter()
    t.fit()
    distributed.barrier()
    fit_s = time.perf_counter() - t0
    if distributed.is_main():
        print(json.dumps({"fit_s": fit_s, "world": distributed.world_size(),
                          "loss": t.history[-1]["loss"]}))
"""


CAPACITY = r"""
import sys, time
import torch
from torch import nn
torch.set_num_threads(int(sys.argv[1]))
batch, steps = int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                  nn.Linear(1024, 100))
x = torch.randn(batch, 64)
for _ in range(2):
    m(x).sum().backward()
t0 = time.perf_counter()
for _ in range(steps):
    m(x).sum().backward()
print(time.perf_counter() - t0)
"""


def capacity(a) -> float:
    """Time of two concurrent compute-only processes (half batch each, no communication) over
    one alone with the half batch: 1.0 when the CPU has a free core for each process, 2.0 when
    they share one (e.g. other jobs are running)."""
    args = [str(a.threads), str(a.batch_size // 2), "20"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "CUDA_VISIBLE_DEVICES": ""}
    run = lambda: subprocess.Popen([sys.executable, "-c", CAPACITY, *args], env=env,
                                   stdout=subprocess.PIPE, text=True)
    alone = float(run().communicate()[0])
    pair = [run(), run()]
    together = max(float(p.communicate()[0]) for p in pair)
    return together / alone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_procs(nproc: int, args: list[str]) -> tuple[dict, float]:
    port = str(free_port())
    t0 = time.perf_counter()
    procs = []
    for r in range(nproc):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r),
               "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc), "GLOO_SOCKET_IFNAME": "lo",
               "OMP_NUM_THREADS": args[0], "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"a benchmark process failed:\n{err}")
    return json.loads(outs[0][0].strip().splitlines()[-1]), wall


def timing_report(a) -> dict:
    args = [str(a.threads), str(a.samples), str(a.epochs), str(a.batch_size)]
    print(f"Wall time on the CPU: SoTeacher MLP 64-1024-1024-100, {a.samples} samples, "
          f"{a.epochs} epochs, global batch {a.batch_size}, {a.threads} thread(s) per process, "
          f"{os.cpu_count()} CPU cores, median of {a.repeats}")
    res: dict = {}
    for nproc in (1, 2):
        fits, walls, losses = [], [], []
        for _ in range(a.repeats):
            r, wall = run_procs(nproc, args)
            fits.append(r["fit_s"])
            walls.append(wall)
            losses.append(r["loss"])
        res[nproc] = {"fit_s": statistics.median(fits), "wall_s": statistics.median(walls),
                      "final_loss": losses[-1]}
        print(f"  {nproc} process(es): fit {res[nproc]['fit_s']:7.2f} s   whole run "
              f"{res[nproc]['wall_s']:7.2f} s   final loss {losses[-1]:.5f}")
    ratio = res[2]["fit_s"] / res[1]["fit_s"]
    print(f"  ratio 2-process / 1-process fit time: {ratio:.3f}  (0.5 would be perfect scaling)")
    cap = capacity(a)
    print(f"  CPU contention: two concurrent compute-only processes (half batch each) take "
          f"{cap:.2f}x the time of one alone (1.0: a free core for each; 2.0: they share one, "
          f"so no speed-up is possible here)")
    return {"timing": {"processes": res, "ratio_2_over_1": ratio, "contention": cap,
                       "threads": a.threads,
                       "samples": a.samples, "epochs": a.epochs, "batch_size": a.batch_size,
                       "cpu_count": os.cpu_count()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512, help="the global batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--measure-imagenet", action="store_true",
                   help="also allocate the ImageNet-sized banks (about 5 GB)")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = memory_report(a.measure_imagenet)
    if not a.skip_timing:
        out.update(timing_report(a))
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
