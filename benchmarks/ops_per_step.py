"""Kernel-launching operators and host reads per training step (issue 15), counted.

On a GPU, CIFAR-size models at batch 64-128 are bound by kernel launches, not arithmetic, so a
step's cost is close to the number of kernels it launches and the times it waits on the host.
This counts both with ``soteacher.bench.OpCounter`` (a ``TorchDispatchMode``: every aten operator
of the forward and backward pass; views, detaching, allocation and profiler markers not counted;
host reads are ``.item()``/``float()``/``bool()`` of a tensor, ``.tolist()``, and operators whose
output size depends on the data) through the library's ``Trainer``, one steady-state step of epoch
2 (after a warm-up epoch), SGD stepping with ``foreach`` as on CUDA. Counts do not depend on the
device or the batch size (batch 8 here), and are deterministic.

Tables (markdown on stdout; every count in ``--out``):

1. the loop: a bare step (forward, cross-entropy, backward, SGD on a ready batch) against the
   library's standard teacher step on float inputs without augmentation (the loop's own
   operations: batching, metrics), and with the CIFAR recipe's uint8 inputs, normalisation and
   random crop + flip on the device;
2. the Lipschitz bound's operations (forward and backward, weighting and adding to the loss
   included), per layer against fused, on the teacher models;
3. every teacher method on the teacher models of the shipped pairs, against the standard step;
4. every distiller on the shipped pairs (default options; AB, FSP and FT counted in their main
   stage), against the student trained without a teacher; "own" is what the distiller adds
   beyond that step and the teacher's forward pass (AB and FSP run no teacher pass there).

    .venv/bin/python benchmarks/ops_per_step.py                 # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/ops_per_step.py --out runs/bench/ops/counts.json --sections 1 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from soteacher.bench import OpCounter, count_forward, step_ops
from soteacher.distillers import list_distillers
from soteacher.models import create_model
from soteacher.regularizers.lipschitz import lipschitz_bound
from soteacher.teachers import list_teachers

#: The shipped CIFAR-100 pairs (configs/cifar100).
PAIRS = [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"),
         ("resnet56", "resnet20"), ("resnet110", "resnet32"), ("vgg13", "vgg8"),
         ("vgg13", "mobilenetv2")]
TEACHERS = list(dict.fromkeys(t for t, _ in PAIRS))
STUDENTS = {t: s for t, s in reversed(PAIRS)}          # the first pair of each teacher
LOOP_MODELS = ["resnet8x4", "wrn_40_2", "resnet32x4"]


def lipschitz_ops(name: str, impl: str | None) -> int:
    model = create_model(name, 100)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    counts = []
    for term in (None, impl, impl):            # the second fused call is the steady state
        model.zero_grad(set_to_none=True)
        counter = OpCounter()
        with counter:
            loss = F.cross_entropy(model(x), y)
            if term is not None:
                loss = loss + 1e-5 * lipschitz_bound(model, impl=term)
            loss.backward()
        counts.append(sum(counter.ops[0].values()))
    return counts[2] - counts[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("runs/bench/ops/counts.json"))
    p.add_argument("--sections", nargs="+", type=int, default=[1, 2, 3, 4])
    args = p.parse_args()
    torch.set_num_threads(1)
    counts: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}
    b = args.batch_size
    t0 = time.perf_counter()

    def cell(key: str, fn):
        """A count, from ``--out`` when an earlier run has it."""
        if key not in counts:
            try:
                r = fn()
            except ValueError as e:         # a distiller that cannot pair the two networks
                r = {"not_applicable": str(e)}
            counts[key] = r if isinstance(r, (int, dict)) else {
                "ops": r.ops, "reads": r.host_reads, "reads_by_op": r.reads_by_op}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(counts, indent=1))
        return counts[key]

    if 1 in args.sections:
        print("| model | bare step | loop (float inputs, no augmentation) | loop / bare | "
              "CIFAR recipe loop (uint8, normalise, crop + flip) | host reads |")
        print("|---|---:|---:|---:|---:|---:|")
        for m in LOOP_MODELS:
            bare = cell(f"bare/{m}", lambda: step_ops("bare", m, method="", batch_size=b,
                                                       normalize=False))
            loop = cell(f"loop/{m}", lambda: step_ops("teacher", m, method="standard",
                                                       batch_size=b, augment=False,
                                                       normalize=False))
            cifar = cell(f"teacher/standard/{m}", lambda: step_ops("teacher", m,
                                                                     method="standard",
                                                                     batch_size=b))
            print(f"| {m} | {bare['ops']} | {loop['ops']} | {loop['ops'] / bare['ops']:.3f} | "
                  f"{cifar['ops']} | {max(loop['reads'], cifar['reads'])} |")
        print()
    if 2 in args.sections:
        print("| model | Lipschitz bound, per layer | fused |")
        print("|---|---:|---:|")
        for m in ["resnet8x4"] + TEACHERS:
            per = cell(f"lipschitz/per_layer/{m}", lambda: lipschitz_ops(m, "per_layer"))
            fused = cell(f"lipschitz/fused/{m}", lambda: lipschitz_ops(m, "fused"))
            print(f"| {m} | {per} | {fused} |")
        print()
    if 3 in args.sections:
        methods = list_teachers()
        print("| teacher method | " + " | ".join(TEACHERS) + " | host reads |")
        print("|---|" + "---:|" * len(TEACHERS) + "---:|")
        for method in methods:
            row, worst = [], 0
            for m in TEACHERS:
                opts = {"student_model": STUDENTS[m]} if method == "sftn" else None
                c = cell(f"teacher/{method}/{m}", lambda: step_ops(
                    "teacher", m, method=method, options=opts, batch_size=b))
                std = cell(f"teacher/standard/{m}", lambda: step_ops(
                    "teacher", m, method="standard", batch_size=b))
                row.append(f"{c['ops']} ({c['ops'] / std['ops']:.2f})")
                worst = max(worst, c["reads"])
            print(f"| {method} | " + " | ".join(row) + f" | {worst} |")
        print()
    if 4 in args.sections:
        print("| distiller | " + " | ".join(f"{t} -> {s}" for t, s in PAIRS) + " | host reads |")
        print("|---|" + "---:|" * len(PAIRS) + "---:|")
        base = {}
        for t, s in PAIRS:
            alone = cell(f"teacher/standard/{s}", lambda: step_ops(
                "teacher", s, method="standard", batch_size=b))
            fwd = cell(f"forward/{t}", lambda: count_forward(
                create_model(t, 100), torch.randn(b, 3, 32, 32)))
            base[t, s] = (alone["ops"], fwd["ops"])
        print("| (student without teacher; teacher forward) | " + " | ".join(
            f"{base[t, s][0]}; {base[t, s][1]}" for t, s in PAIRS) + " | 0 |")
        for method in list_distillers():
            row, worst = [], 0
            for t, s in PAIRS:
                c = cell(f"student/{method}/{t}/{s}", lambda: step_ops(
                    "student", s, teacher=t, method=method, batch_size=b))
                if "ops" not in c:
                    row.append("n/a")
                    continue
                alone, fwd = base[t, s]
                own = c["ops"] - alone - fwd
                # AB and FSP train without the teacher after their preliminary stage
                own_txt = f"own {own}" if own >= 0 else f"no teacher pass, own {own + fwd}"
                row.append(f"{c['ops']} ({c['ops'] / alone:.2f}; {own_txt})")
                worst = max(worst, c["reads"])
            print(f"| {method} | " + " | ".join(row) + f" | {worst} |")
        print()
    print(f"({time.perf_counter() - t0:.0f} s; counts in {args.out})")


if __name__ == "__main__":
    main()
