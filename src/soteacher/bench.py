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

:func:`cuda_grid` runs these loops over the settings that matter on a GPU (bf16 autocast and
channels-last, two models, two batch sizes, with and without ``torch.compile``); it refuses to
run without CUDA.

:class:`OpCounter` and :func:`step_ops` count instead of timing: the kernel-launching operators
and the host reads of one training step, which decide a GPU step's cost for small models and
can be counted exactly on any machine (``benchmarks/ops_per_step.py`` prints the table).
"""

from __future__ import annotations

import copy
import inspect
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .data.augment import Normalize, RandomCropPad, RandomFlip
from .data.base import ArrayDataset
from .data.cifar import ImageArrayDataset
from .distillers import DISTILLERS, build_distiller
from .engine.evaluate import resolve_device
from .engine.optim import TrainSettings, build_optimizer
from .engine.trainer import NonFiniteLossError, Trainer
from .models import create_model
from .teachers import build_teacher_objective


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(model: str, batch_size: int = 64, steps: int = 20, device: str = "cpu",
               num_classes: int = 100, input_shape: tuple[int, ...] = (3, 32, 32),
               amp: str = "off", channels_last: bool = False, repeats: int = 3,
               warmup_steps: int = 3, seed: int = 0, compile: bool = False) -> dict[str, Any]:
    """Images per second of the pure, standard and SoTeacher loops (see the module docstring).

    ``compile=True`` compiles the model with ``torch.compile`` in all three loops (the warm-up
    epoch then includes the compilation)."""
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
                             eval_every=0, amp=amp, channels_last=channels_last, compile=compile)

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
    pure_forward = torch.compile(pure_model) if compile else pure_model
    x = preprocess.to(dev)(augment.to(dev)(data.x[:batch_size].to(dev)))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = data.y[:batch_size].to(dev)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")

    def pure(k: int) -> None:
        for _ in range(k):
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.cross_entropy(pure_forward(x), y)
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
        "device": str(dev), "amp": amp, "channels_last": channels_last, "compile": compile,
        "threads": torch.get_num_threads(),
        "pure_images_per_s": ips["pure"], "standard_images_per_s": ips["standard"],
        "soteacher_images_per_s": ips["soteacher"],
        "loop_efficiency": ips["standard"] / ips["pure"],
        "soteacher_overhead": med["soteacher"] / med["standard"],
        "soteacher_overhead_range": [min(per_round), max(per_round)],
    }


# ---- the GPU grid ---------------------------------------------------------------------------------
#: What ``soteacher bench grid`` measures by default: two CIFAR models of different shape (a wide
#: shallow ResNet and a deep WRN), the paper's batch 64 and 128.
GRID_MODELS = ("resnet8x4", "wrn_40_2")
GRID_BATCH_SIZES = (64, 128)


def cuda_grid(models: Sequence[str] = GRID_MODELS,
              batch_sizes: Sequence[int] = GRID_BATCH_SIZES,
              compile_modes: Sequence[bool] = (False, True), device: str = "cuda",
              amp: str = "bf16", channels_last: bool = True, steps: int = 50,
              repeats: int = 3) -> list[dict[str, Any]]:
    """:func:`throughput` for every model x batch size x compile mode, on a CUDA device, with bf16
    autocast and channels-last by default: loop efficiency (the library's step against a bare
    step) and SoTeacher's overhead (against the standard step) where kernel launches, not the
    CPU, decide the cost. Raises ``ValueError`` without CUDA."""
    if not str(device).startswith("cuda"):
        raise ValueError(f"the GPU grid runs on a CUDA device, got device {device!r}; on the "
                         f"CPU use soteacher bench throughput")
    if not torch.cuda.is_available():
        raise ValueError("the GPU grid needs CUDA, which is not available here: run it on a "
                         "machine with an NVIDIA GPU, or measure the CPU with soteacher bench "
                         "throughput")
    dev = resolve_device(device)
    if not models or not batch_sizes or not compile_modes:
        raise ValueError("the grid needs at least one model, batch size and compile mode")
    return [throughput(m, batch_size=b, steps=steps, device=str(dev), amp=amp,
                       channels_last=channels_last, repeats=repeats, compile=c,
                       warmup_steps=max(3, steps // 5))
            for m in models for b in batch_sizes for c in compile_modes]


def grid_table(rows: Sequence[dict[str, Any]]) -> str:
    """The grid's results as a markdown table."""
    lines = ["| model | batch | compile | amp | channels-last | bare img/s | standard img/s | "
             "SoTeacher img/s | loop efficiency | SoTeacher / standard step time |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch_size']} | {'yes' if r['compile'] else 'no'} | "
                     f"{r['amp']} | {'yes' if r['channels_last'] else 'no'} | "
                     f"{r['pure_images_per_s']:.0f} | {r['standard_images_per_s']:.0f} | "
                     f"{r['soteacher_images_per_s']:.0f} | {r['loop_efficiency']:.3f} | "
                     f"{r['soteacher_overhead']:.3f} |")
    return "\n".join(lines)

# ---- kernel launches and host reads per step, counted ---------------------------------------------
# On a GPU, CIFAR-size models at batch 64-128 are bound by kernel launches, not arithmetic: what a
# step costs is close to the number of kernels it launches and the times it waits for the device.
# Both can be counted on any machine, deterministically, by watching the operators a step
# dispatches (TorchDispatchMode sees every aten call, in the forward and the backward pass).

_aten = torch.ops.aten
#: Operators that launch no kernel although they are not views: allocation and aliasing.
NO_KERNEL = frozenset({
    _aten.detach.default, _aten.alias.default, _aten.lift_fresh.default,
    _aten.empty.memory_format, _aten.empty_like.default, _aten.empty_strided.default,
    _aten.new_empty.default, _aten.new_empty_strided.default, _aten._unsafe_view.default,
    _aten.resize_.default, _aten.set_.source_Storage_storage_offset,
})
#: Operators whose result the host must wait for (a device-to-host read): ``.item()``,
#: ``float(t)``, ``bool(t)``, and operators whose output size depends on the data.
HOST_READS = frozenset({
    _aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.equal.default,
    _aten.nonzero.default, _aten.masked_select.default, _aten._unique2.default,
    _aten.unique_consecutive.default, _aten.unique_dim.default, _aten.argwhere.default,
})


def _reads_host(func, args: tuple, kwargs: dict) -> bool:
    if func in HOST_READS:
        return True
    if func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default):
        # a boolean mask as an index: the result's size is the mask's count
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in (args[1] if len(args) > 1 else ()) if i is not None)
    if func is _aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    return False


class OpCounter(TorchDispatchMode):
    """Counts, while active, the operators that launch a kernel (``ops``; views, detaching,
    allocation and the profiler's markers excluded) and the host reads (``host_reads``: ``.item()``, ``float(t)``,
    ``bool(t)``, ``.tolist()``, data-dependent shapes such as ``nonzero`` or a boolean index),
    by operator name, in segments: :meth:`mark` starts a new one (e.g. at every step).

    Counts are deterministic and device independent: the CPU counts what the GPU would launch
    (one multi-tensor ``_foreach_*`` operator counts once, as it launches a few kernels for all
    its tensors). Operators that run inside another (a kernel's own helpers) are not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Counter[str]] = [Counter()]
        self.host_reads: list[Counter[str]] = [Counter()]
        self._patched: list[tuple[str, Any]] = []

    def mark(self) -> None:
        self.ops.append(Counter())
        self.host_reads.append(Counter())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_host(func, args, kwargs):
            self.host_reads[-1][str(func)] += 1
        elif not (func.is_view or func in NO_KERNEL or func.namespace == "profiler"):
            self.ops[-1][str(func)] += 1
        return func(*args, **kwargs)

    # .tolist() and .numpy() read the data without dispatching an operator on the CPU
    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)

            def read(t, *a, _original=original, _name=name, **k):
                self.host_reads[-1][f"Tensor.{_name}"] += 1
                return _original(t, *a, **k)

            self._patched.append((name, torch.Tensor.__dict__.get(name)))
            setattr(torch.Tensor, name, read)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, own in self._patched:
                if own is None:         # inherited from the C base class: uncover it again
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, own)
            self._patched.clear()


@dataclass
class StepCount:
    """Kernel-launching operators and host reads of one training step, with their names."""

    ops: int
    host_reads: int
    by_op: dict[str, int]
    reads_by_op: dict[str, int]

    @classmethod
    def of(cls, ops: Counter, reads: Counter) -> "StepCount":
        return cls(sum(ops.values()), sum(reads.values()), dict(ops.most_common()),
                   dict(reads.most_common()))


def use_foreach(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer`` step with the multi-tensor (``foreach``) implementation, as PyTorch
    chooses by default for CUDA tensors (on the CPU it defaults to a loop over parameters)."""
    for group in optimizer.param_groups:
        group["foreach"] = True


def count_trainer_step(trainer: Trainer, epoch: int = 2, warmup_epochs: int = 1) -> StepCount:
    """The operators of one steady-state step of ``trainer``: epochs ``1..warmup_epochs`` run
    uncounted (so that the consistency bank holds predictions, memories are filled, ...), then
    epoch ``epoch`` is counted step by step and the median of its inner steps is returned (the
    first step of an epoch sets things up, the last one closes the epoch). Needs at least 3 steps
    per epoch. The optimisers step with ``foreach``, as on CUDA."""
    if trainer.steps_per_epoch() < 3:
        raise ValueError(f"counting needs at least 3 steps per epoch, the trainer has "
                         f"{trainer.steps_per_epoch()}; use a larger training set")
    for opt in (trainer.optimizer, trainer.init_optimizer):
        if opt is not None:
            use_foreach(opt)
    # A step without host reads cannot branch on values: its operators are the same whatever
    # the numbers, even NaN ones (short runs on random data may diverge), so a non-finite loss,
    # found at the epoch's end, does not stop the count.
    for e in range(1, warmup_epochs + 1):
        try:
            trainer.run_epoch(e)
        except NonFiniteLossError:
            pass
    counter = OpCounter()
    batches = trainer._batches

    def marked(*args, **kwargs):
        for batch in batches(*args, **kwargs):
            counter.mark()          # a segment per step: the step, then the next batch's slicing
            yield batch

    trainer._batches = marked
    try:
        with counter:
            trainer.run_epoch(epoch)
    except NonFiniteLossError:
        pass
    finally:
        del trainer._batches
    inner = list(zip(counter.ops[2:-1], counter.host_reads[2:-1]))
    inner.sort(key=lambda s: (sum(s[0].values()), sum(s[1].values())))
    return StepCount.of(*inner[len(inner) // 2])


def count_bare_step(model: nn.Module, x: Tensor, y: Tensor, settings: TrainSettings) -> StepCount:
    """The operators of a bare step on a batch already on the device: forward, cross-entropy,
    backward, SGD with ``foreach`` (the optimiser settings CUDA uses)."""
    opt = build_optimizer(model.parameters(), settings)
    use_foreach(opt)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    step()                      # the first step creates the momentum buffers
    counter = OpCounter()
    with counter:
        step()
    return StepCount.of(counter.ops[0], counter.host_reads[0])


def count_forward(model: nn.Module, x: Tensor) -> StepCount:
    """The operators of ``model``'s forward pass in eval mode without gradients: what a frozen
    teacher costs a distillation step."""
    model.eval()
    counter = OpCounter()
    with torch.no_grad(), counter:
        model(x)
    return StepCount.of(counter.ops[0], counter.host_reads[0])


def _image_data(n: int, input_shape: tuple[int, ...], num_classes: int,
                seed: int) -> ImageArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ImageArrayDataset(torch.randint(0, 256, (n, *input_shape), dtype=torch.uint8,
                                           generator=g),
                             torch.randint(0, num_classes, (n,), generator=g))


def _count_settings(batch_size: int) -> TrainSettings:
    return TrainSettings(epochs=2, batch_size=batch_size, lr=0.01, milestones=[], eval_every=0)


def step_ops(kind: str, model: str, *, method: str, teacher: str | None = None,
             options: dict[str, Any] | None = None, batch_size: int = 8, steps: int = 4,
             num_classes: int = 100, input_shape: tuple[int, ...] = (3, 32, 32),
             augment: bool = True, normalize: bool = True, seed: int = 0) -> StepCount:
    """Operators and host reads of one training step, counted through the library's
    :class:`Trainer` on random uint8 images (CIFAR-like, normalised on the device):

    * ``kind="teacher"``: ``model`` trained with teacher method ``method``;
    * ``kind="student"``: ``model`` distilled from ``teacher`` (a model name) with distiller
      ``method``;
    * ``kind="bare"``: ``model``'s bare step (:func:`count_bare_step`) on a ready batch.

    ``augment`` adds random crops and flips (the CIFAR recipe) to the trainer's steps;
    ``normalize=False`` gives the trainer float inputs that need no preprocessing (the loop's own
    operations alone are then what the step adds to a bare step). ``steps`` (>= 3) per epoch.
    """
    torch.manual_seed(seed)
    net = create_model(model, num_classes=num_classes, input_shape=input_shape)
    settings = _count_settings(batch_size)
    data: ArrayDataset = _image_data(batch_size * steps, input_shape, num_classes, seed)
    preprocess = Normalize((0.5,) * input_shape[0], (0.25,) * input_shape[0])
    if not normalize:
        data, preprocess = ArrayDataset(preprocess(data.x), data.y), None
    if kind == "bare":
        x = data.x[:batch_size] if preprocess is None else preprocess(data.x[:batch_size])
        return count_bare_step(net, x, data.y[:batch_size], settings)
    if kind == "teacher":
        # methods that need a validation split (early_stop, temperature_scaled) get the
        # training set: their step is the standard one, the split is used at epoch ends
        objective = build_teacher_objective(method, options, num_samples=len(data),
                                            num_classes=num_classes, num_epochs=2,
                                            input_shape=input_shape, model=net, val_set=data)
    elif kind == "student":
        if teacher is None:
            raise ValueError("a student's count needs teacher=<model name>")
        t = create_model(teacher, num_classes=num_classes, input_shape=input_shape)
        options = dict(options or {})
        if "init_epochs" in inspect.signature(DISTILLERS.get(method)).parameters:
            # the preliminary stage (AB, FSP, FT) is not the step that repeats: keep it short
            options.setdefault("init_epochs", 1)
        objective = build_distiller(method, t, options, student=net, num_samples=len(data),
                                    num_classes=num_classes, input_shape=input_shape,
                                    train_set=data)
    else:
        raise ValueError(f"unknown kind {kind!r}; use 'teacher', 'student' or 'bare'")
    aug = nn.Sequential(RandomCropPad(4), RandomFlip()) if augment else None
    trainer = Trainer(net, objective, data, settings, augment=aug, preprocess=preprocess,
                      seed=seed, progress=False, num_classes=num_classes)
    return count_trainer_step(trainer, epoch=trainer.init_epochs + 2,
                              warmup_epochs=trainer.init_epochs + 1)
