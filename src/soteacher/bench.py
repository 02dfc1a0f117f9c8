"""Throughput of the training step, measured side by side.

Three loops on the same model, batch size and device, interleaved over ``repeats`` rounds in an
order that rotates every round (the median of each is kept, so a noisy, shared machine affects
all three alike, and none always runs first):

* **pure**: the model stepping on a batch already on the device, already augmented and
  normalised: forward, cross-entropy, backward, SGD. The ceiling for this model.
* **standard**: the library's full training step (``Trainer``) with the standard objective:
  batching from uint8 images, augmentation and normalisation on the device, forward, backward,
  optimiser, logging sums.
* **soteacher**: the same with SoTeacher's objective (Lipschitz bound recomputed every step,
  consistency loss read from and written to the bank), in an epoch >= 2 so the bank is used.

``loop_efficiency = standard / pure`` images per second: what the loop costs over pure compute.
``soteacher_overhead = soteacher / standard`` step time: what the regularisers cost.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from .data.augment import Normalize, RandomCropPad, RandomFlip
from .data.cifar import ImageArrayDataset
from .engine.evaluate import resolve_device
from .engine.optim import TrainSettings, build_optimizer
from .engine.trainer import Trainer
from .models import create_model
from .teachers import build_teacher_objective


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(model: str, batch_size: int = 64, steps: int = 20, device: str = "cpu",
               num_classes: int = 100, input_shape: tuple[int, ...] = (3, 32, 32),
               amp: str = "off", channels_last: bool = False, repeats: int = 3,
               warmup_steps: int = 3, seed: int = 0) -> dict[str, Any]:
    """Images per second of the pure, standard and SoTeacher loops (see the module docstring)."""
    if steps < 1 or repeats < 1 or batch_size < 2:
        raise ValueError("need steps >= 1, repeats >= 1 and batch_size >= 2")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    base = create_model(model, num_classes=num_classes, input_shape=input_shape)
    n = batch_size * steps
    g = torch.Generator().manual_seed(seed)
    data = ImageArrayDataset(torch.randint(0, 256, (n, *input_shape), dtype=torch.uint8,
                                           generator=g),
                             torch.randint(0, num_classes, (n,), generator=g))
    augment = torch.nn.Sequential(RandomCropPad(4), RandomFlip())
    preprocess = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    settings = TrainSettings(epochs=2, batch_size=batch_size, lr=0.01, milestones=[],
                             eval_every=0, amp=amp, channels_last=channels_last)

    def trainer(method: str) -> Trainer:
        obj = build_teacher_objective(method, {}, num_samples=n, num_classes=num_classes,
                                      num_epochs=2)
        return Trainer(copy.deepcopy(base), obj, data, settings, augment=augment,
                       preprocess=preprocess, device=dev, seed=seed, progress=False)

    loops = {"standard": trainer("standard"), "soteacher": trainer("soteacher")}

    pure_model = copy.deepcopy(base).to(dev)
    if channels_last:
        pure_model.to(memory_format=torch.channels_last)
    pure_opt = build_optimizer(pure_model.parameters(), settings)
    x = preprocess.to(dev)(augment.to(dev)(data.x[:batch_size].to(dev)))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = data.y[:batch_size].to(dev)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")

    def pure(k: int) -> None:
        for _ in range(k):
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.cross_entropy(pure_model(x), y)
            pure_opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(pure_opt)
            scaler.update()

    def timed(fn) -> float:
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        return time.perf_counter() - t

    # Warm up: allocator, kernels, and epoch 1 of the bank (so it holds predictions).
    pure(warmup_steps)
    for t in loops.values():
        t.run_epoch(1)
    runs = {"pure": lambda: pure(steps),
            **{name: (lambda t=t: t.run_epoch(2)) for name, t in loops.items()}}
    times: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    for r in range(repeats):
        # Rotate the order every round: whichever loop runs first or after another pays or
        # gains from the allocator and cache state it finds, and no loop may always be the one.
        for name in order[r % len(order):] + order[:r % len(order)]:
            times[name].append(timed(runs[name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    # The per-round ratios show the noise the medians have to beat.
    per_round = [s / b for s, b in zip(times["soteacher"], times["standard"])]
    ips = {k: n / v for k, v in med.items()}
    return {
        "model": model, "batch_size": batch_size, "steps": steps, "repeats": repeats,
        "device": str(dev), "amp": amp, "channels_last": channels_last,
        "threads": torch.get_num_threads(),
        "pure_images_per_s": ips["pure"], "standard_images_per_s": ips["standard"],
        "soteacher_images_per_s": ips["soteacher"],
        "loop_efficiency": ips["standard"] / ips["pure"],
        "soteacher_overhead": med["soteacher"] / med["standard"],
        "soteacher_overhead_range": [min(per_round), max(per_round)],
    }
