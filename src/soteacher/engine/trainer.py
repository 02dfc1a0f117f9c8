"""The one training loop, for teachers and students alike.

Every step: augment the batch on the device, ask the objective for its named loss terms, sum them,
step the optimiser. Every epoch (and, if asked, every few steps): evaluate, append a line to
``metrics.jsonl`` and write a checkpoint holding the whole training state, so that a run killed
at any moment resumes to the very same weights.

Under torchrun (a process group of several processes) the same loop runs with
DistributedDataParallel; see :mod:`soteacher.engine.distributed` for how a run on W processes
keeps to the single-process run (global batch, per-sample state, randomness, checkpoints).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..objective import Objective
from . import distributed
from .evaluate import resolve_device
from .io import CheckpointError, atomic_torch_save, atomic_write_text, safe_torch_load
from .optim import AMP_DTYPES, TrainSettings, build_optimizer, learning_rate
from .progress import Progress

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"
METRICS = "metrics.jsonl"
CHECKPOINT_FORMAT = "soteacher-checkpoint/1"
WEIGHTS_FORMAT = "soteacher-model/1"


class Callback(Protocol):
    """Something to do at the end of every epoch (after evaluation, before the checkpoint),
    e.g. weight averaging or keeping the best weights on a validation split.

    ``on_epoch_end`` may add keys to ``record`` (the epoch's line in ``metrics.jsonl``). Optional
    methods: ``on_fit_end(trainer)``, called once before the final weights are saved (it may
    change ``trainer.model`` in place), and ``state_dict()`` / ``load_state_dict(state)``, saved
    in every checkpoint so a resumed run continues where it stopped. A callback with a true
    ``stop_training`` attribute ends the training after the current epoch (early stopping); the
    epoch's record then has ``"stopped_early": true``.
    """

    def on_epoch_end(self, trainer: "Trainer", epoch: int, record: dict[str, Any]) -> None: ...


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped before the bad step was applied."""


class Trainer:
    """Trains ``model`` on ``train_set`` (items ``(x, y, index)``) by minimising ``objective``.

    ``evaluate`` (optional) maps the model to a dict of metrics logged each ``eval_every`` epochs
    and after the last. With a ``run_dir`` the trainer writes ``metrics.jsonl``, a checkpoint
    after every epoch (and every ``checkpoint_every`` steps) and the final weights ``model.pt``;
    ``resume=True`` continues from the checkpoint there. ``model_spec`` (registry name and
    options) is stored with the weights so they can be rebuilt by name; ``config`` (the resolved
    run config) is stored in every checkpoint. With ``num_classes`` every batch's labels are
    checked to lie in ``[0, num_classes)``. ``preprocess`` (e.g. uint8 -> normalised float) runs
    on the device after ``augment``. In-memory datasets are copied to a CUDA device once when
    they fit (``data_on_device``, default: when under 2 GiB), so batches never cross the bus.
    ``callbacks`` run after every epoch's evaluation and once before the final weights are saved
    (see ``Callback``); their state goes into every checkpoint.

    When a process group of more than one process is initialised (torchrun), training is
    distributed: ``settings.batch_size`` is the global batch, each process trains on its slice
    of it through DistributedDataParallel, metrics are summed over processes, and evaluation,
    progress and files are rank 0's. ``self.model`` stays the plain model (checkpoints hold its
    state, so they resume on any number of processes).
    """

    def __init__(self, model: nn.Module, objective: Objective, train_set: Dataset,
                 settings: TrainSettings, *, augment: nn.Module | None = None,
                 device: str | torch.device | None = None, seed: int = 0,
                 run_dir: str | Path | None = None, resume: bool = False,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 name: str = "train", progress: bool = True, num_workers: int = 0,
                 model_spec: dict[str, Any] | None = None, num_classes: int | None = None,
                 config: dict[str, Any] | None = None, preprocess: nn.Module | None = None,
                 data_on_device: bool | None = None,
                 callbacks: Sequence[Callback] = ()) -> None:
        settings.validate()
        if len(train_set) == 0:
            raise ValueError("the training set is empty")
        if settings.batch_size > len(train_set):
            raise ValueError(f"batch_size {settings.batch_size} is larger than the training set "
                             f"({len(train_set)} samples); lower it with "
                             f"--set <phase>.train.batch_size=N")
        self.world = distributed.world_size()
        self.rank = distributed.rank()
        self.distributed = self.world > 1
        self.is_main = self.rank == 0
        if settings.batch_size < self.world:
            raise ValueError(f"batch_size {settings.batch_size} (the global batch) is smaller "
                             f"than the number of processes ({self.world})")
        self.device = resolve_device(device)
        if self.distributed and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.model = model.to(self.device)
        if settings.sync_bn and self.distributed:
            if self.device.type != "cuda":
                raise ValueError("sync_bn needs CUDA devices (PyTorch's SyncBatchNorm does not "
                                 "run on the CPU); set train.sync_bn=false")
            # Converts the batch norms in place (a new module only if the model is one).
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.objective = objective.to(self.device)
        self.augment = augment.to(self.device) if augment is not None else None
        self.preprocess = preprocess.to(self.device) if preprocess is not None else None
        if settings.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # The objective calls the compiled (or, with several processes, the DDP-wrapped)
        # module; the trainer keeps and saves the plain one.
        self.ddp: nn.Module | None = None      # built when training starts, released by fit()
        self.forward_model = (torch.compile(self.model) if settings.compile and not self.distributed
                              else self.model)
        self.amp_dtype = AMP_DTYPES[settings.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.amp == "fp16")
        self.train_set = train_set
        self.s = settings
        self.seed = seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.resume = resume
        self.evaluate_fn = evaluate
        self.callbacks = list(callbacks)
        self.num_workers = num_workers
        self.model_spec = model_spec
        self.num_classes = num_classes
        self.config = config
        self.progress = Progress(name, settings.epochs, enabled=progress and self.is_main)
        own = {id(p) for p in self.model.parameters()}
        extra = [p for p in self.objective.parameters() if p.requires_grad and id(p) not in own]
        # DDP averages the model's gradients; the objective's own parameters are averaged here.
        self._extra_params = extra
        self.optimizer = build_optimizer(list(self.model.parameters()) + extra, settings)
        self.epoch = 0                 # epochs completed
        self.step = 0                  # steps completed inside epoch `self.epoch + 1`
        self.history: list[dict[str, Any]] = []
        self._partial: dict[str, Any] | None = None   # running sums of the unfinished epoch
        self._arrays = None
        if hasattr(train_set, "x") and hasattr(train_set, "y"):
            nbytes = train_set.x.nbytes + train_set.y.nbytes
            if data_on_device is None:
                data_on_device = self.device.type == "cuda" and nbytes < 2 * 1024**3
            dev = self.device if data_on_device else torch.device("cpu")
            self._arrays = (train_set.x.to(dev), train_set.y.to(dev))
            self._check_labels(train_set.y, torch.arange(len(train_set)))   # once, up front

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "step": self.step,
            "partial": self._partial,
            "seed": self.seed,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "cuda_device": self.device.index if self.device.type == "cuda" else None,
            "history": [json.dumps(r) for r in self.history],
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None
                          for cb in self.callbacks],
            "config": json.dumps(self.config) if self.config is not None else None,
            "versions": {"torch": str(torch.__version__), "soteacher": _version()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"not a soteacher training checkpoint (format {found!r}, "
                                  f"expected {CHECKPOINT_FORMAT!r})")
        try:
            self.model.load_state_dict(state["model"])
            self.objective.load_state_dict(state["objective"])
        except RuntimeError as e:
            raise CheckpointError(f"the checkpoint does not fit this model/objective (was it "
                                  f"written with another config?): {e}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        saved = state.get("cuda_device")
        if (self.distributed and self.device.type == "cuda" and saved is not None
                and saved < len(state["rng"].get("cuda", []))):
            # Every process continues the CUDA stream of rank 0's own device, as all processes
            # drew in step from identically seeded generators before.
            torch.cuda.set_rng_state(state["rng"]["cuda"][saved], self.device)
        self.epoch = int(state["epoch"])
        self.step = int(state.get("step", 0))
        self._partial = state.get("partial")
        self.history = [json.loads(r) for r in state["history"]]
        for cb, cb_state in zip(self.callbacks, state.get("callbacks") or []):
            if cb_state is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)

    # ---- data --------------------------------------------------------------------------------
    def _batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        # The order depends only on (seed, epoch): a resumed run sees the same batches, and
        # skipping the ones already done costs nothing.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n, b = len(self.train_set), self.s.batch_size
        perm = torch.randperm(n, generator=g)
        # A last batch of one sample (one per process) breaks batch norm in training mode.
        perm = perm[:self._samples_per_epoch()]
        perm = perm[start_step * b:]
        ds = self.train_set
        if self.distributed:
            yield from self._local_batches(perm, g)
            return
        if self._arrays is not None:
            xs, ys = self._arrays
            perm = perm.to(xs.device)
            for i in range(0, len(perm), b):
                idx = perm[i:i + b]
                yield xs[idx], ys[idx], idx
            return
        # Its own generator keeps the loader from drawing on the global RNG, which the
        # augmentations use: the two data paths then see identical randomness.
        loader = DataLoader(ds, batch_size=b, sampler=perm.tolist(), num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", generator=g)
        for x, y, idx in loader:
            yield x, y, torch.as_tensor(idx)

    def _local_batches(self, perm: Tensor,
                       g: torch.Generator) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """This process's contiguous slice of every global batch of ``perm``."""
        b = self.s.batch_size
        slices = []
        for i in range(0, len(perm), b):
            batch = perm[i:i + b]
            lo, hi = distributed.batch_slice(len(batch), self.rank, self.world)
            slices.append(batch[lo:hi])
        if self._arrays is not None:
            xs, ys = self._arrays
            for idx in slices:
                idx = idx.to(xs.device)
                yield xs[idx], ys[idx], idx
            return
        loader = DataLoader(self.train_set, batch_sampler=[s.tolist() for s in slices],
                            num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", generator=g)
        for x, y, idx in loader:
            yield x, y, torch.as_tensor(idx)

    def _samples_per_epoch(self) -> int:
        """Samples trained on per epoch: all, less a last batch too small to give every process
        two samples (in a single process: a last batch of one sample)."""
        n, b = len(self.train_set), self.s.batch_size
        tail = n % b
        return n - tail if 0 < tail < 2 * self.world else n

    def _slice_sizes(self, step: int) -> list[int]:
        """Every process's number of samples in 1-based ``step`` of an epoch."""
        total = min(self.s.batch_size, self._samples_per_epoch() - (step - 1) * self.s.batch_size)
        return [hi - lo for lo, hi in (distributed.batch_slice(total, r, self.world)
                                        for r in range(self.world))]

    def steps_per_epoch(self) -> int:
        return math.ceil(self._samples_per_epoch() / self.s.batch_size)

    # ---- loop --------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        """Train to ``settings.epochs`` and return the per-epoch records."""
        try:
            return self._fit()
        finally:
            self._release_ddp()

    def _wrap_ddp(self) -> None:
        if not self.distributed or self.ddp is not None:
            return
        unused = getattr(self.objective, "ddp_find_unused_parameters",
                         getattr(self.objective, "has_init_stage", False))
        self.ddp, self.forward_model = distributed.wrap_model(
            self.model, self.device, find_unused_parameters=bool(unused), compile=self.s.compile)

    def _release_ddp(self) -> None:
        # A DDP module that outlives its process group can abort the interpreter at exit.
        if self.ddp is not None:
            self.ddp, self.forward_model = None, self.model

    def _stop_requested(self) -> bool:
        return any(getattr(cb, "stop_training", False) for cb in self.callbacks)

    def _fit(self) -> list[dict[str, Any]]:
        if self.resume:
            self._load_for_resume()
        else:
            torch.manual_seed(self.seed)
        E = self.s.epochs
        for epoch in range(self.epoch + 1, E + 1):
            if self._stop_requested():      # a resumed run that had already stopped
                break
            record = self._train_epoch(epoch)
            if self.evaluate_fn is not None and (
                    epoch == E or (self.s.eval_every and epoch % self.s.eval_every == 0)):
                # Rank 0 evaluates; every process gets its metrics (callbacks may act on them).
                record.update(distributed.run_on_main(self.evaluate_fn, self.model))
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, record)
            stop = self._stop_requested() and epoch < E
            if stop:
                record["stopped_early"] = True
            self.epoch, self.step, self._partial = epoch, 0, None
            self.history.append(record)
            self.progress.epoch_end(record)
            if self.run_dir is not None:
                self._write_checkpoint()
            if stop:
                break
        for cb in self.callbacks:
            if hasattr(cb, "on_fit_end"):
                cb.on_fit_end(self)
        if self.run_dir is not None:
            self.save_weights(self.run_dir / WEIGHTS)
        return self.history

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one whole epoch from its first step and return its record; nothing is written
        (for benchmarks and custom schedules)."""
        self.step, self._partial = 0, None
        return self._train_epoch(epoch)

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        self._wrap_ddp()
        self.model.train()
        if self.ddp is not None:
            self.ddp.train()
        self.objective.train()
        self.objective.set_epoch(epoch, self.s.epochs)
        lr = learning_rate(self.s, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        steps = self.steps_per_epoch()
        # Running sums stay on the device (no sync per step) and are saved with mid-epoch
        # checkpoints so that a resumed epoch logs the same averages. With several processes
        # the sums are each process's own; checkpoints hold their total, which rank 0 carries on.
        p = self._partial or {"sums": {}, "correct": 0, "seen": 0, "skipped": 0, "time": 0.0}
        if not self.is_main:
            p = {**p, "sums": {k: 0.0 for k in p["sums"]}, "correct": 0, "seen": 0}
        sums = {k: torch.tensor(v, device=self.device) for k, v in p["sums"].items()}
        correct = torch.tensor(p["correct"], device=self.device)
        seen, skipped = p["seen"], p["skipped"]
        t0 = time.perf_counter() - p["time"]
        for step, (x, y, idx) in enumerate(self._batches(epoch, self.step), start=self.step + 1):
            if self._arrays is None:
                self._check_labels(y, idx)     # CPU tensors from the loader: no sync
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            idx = idx.to(self.device, non_blocking=True)
            with torch.no_grad():
                if self.augment is not None:
                    x = self._augment(x, epoch, step)
                if self.preprocess is not None:
                    x = self.preprocess(x)
                if self.s.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
            sizes = self._slice_sizes(step) if self.distributed else None
            with distributed.step_layout(sizes), torch.autocast(
                    self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.objective(self.forward_model, x, y, idx)
                loss = sum(out.losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            # Every process takes the same branch: one non-finite slice skips the global step.
            if not distributed.all_true(torch.isfinite(loss), self.device):
                if self.s.nonfinite == "error":
                    self._raise_non_finite(epoch, step, out.losses)
                skipped += 1
            else:
                if sizes is not None and sizes[self.rank] * self.world != sum(sizes):
                    # DDP averages over processes: weight each slice's mean by its share of
                    # the global batch so that the average is the global mean.
                    loss = loss * (sizes[self.rank] * self.world / sum(sizes))
                self.scaler.scale(loss).backward()
                if self.distributed:
                    self._average_extra_grads()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                for k, v in out.losses.items():
                    sums[k] = sums.get(k, 0) + v.detach().float() * len(y)
                correct += (out.logits.detach().argmax(1) == y).sum()
                seen += len(y)
            self.step = step
            self.progress.step(epoch, step, steps)
            if (self.run_dir is not None and self.s.checkpoint_every
                    and step % self.s.checkpoint_every == 0 and step < steps):
                tot_sums, tot_correct, tot_seen = self._totals(sums, correct, seen)
                self._partial = {"sums": tot_sums, "correct": tot_correct, "seen": tot_seen,
                                 "skipped": skipped, "time": time.perf_counter() - t0}
                self._write_checkpoint()
        tot_sums, tot_correct, seen = self._totals(sums, correct, seen)
        terms = {k: v / max(seen, 1) for k, v in tot_sums.items()}
        record = {"epoch": epoch, "lr": lr, "loss": sum(terms.values()),
                  **{f"loss_{k}": v for k, v in terms.items()},
                  "train_acc": tot_correct / max(seen, 1),
                  "epoch_time": time.perf_counter() - t0}
        if self.s.nonfinite == "skip":
            record["skipped_steps"] = skipped
        return record

    def _augment(self, x: Tensor, epoch: int, step: int) -> Tensor:
        if not self.distributed:
            return self.augment(x)
        # Each process augments its own slice, independently of the others, from a generator
        # of (seed, epoch, step, rank): resumable, and the shared global RNG is left as it was.
        devices = [self.device.index] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(distributed.mix_seed(self.seed, epoch, step, self.rank))
            return self.augment(x)

    def _average_extra_grads(self) -> None:
        """Average the gradients of the objective's own parameters over processes (DDP does
        the model's)."""
        grads = [p.grad for p in self._extra_params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        distributed.all_reduce_sum(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _totals(self, sums: dict[str, Tensor], correct: Tensor,
                seen: int) -> tuple[dict[str, float], int, int]:
        """The running sums as plain numbers, summed over processes."""
        if not self.distributed:
            return {k: float(v) for k, v in sums.items()}, int(correct), seen
        keys = sorted(sums)
        packed = torch.stack([sums[k].double() for k in keys]
                             + [correct.double(), torch.tensor(float(seen), dtype=torch.float64,
                                                               device=correct.device)])
        distributed.all_reduce_sum(packed)
        vals = packed.tolist()
        return dict(zip(keys, vals[:-2])), int(round(vals[-2])), int(round(vals[-1]))

    def _check_labels(self, y: Tensor, idx: Tensor) -> None:
        if self.num_classes is None:
            return
        bad = (y < 0) | (y >= self.num_classes)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"label {int(y[i])} of sample {int(idx[i])} is outside "
                             f"[0, {self.num_classes}); labels must be class indices "
                             f"0..{self.num_classes - 1}")

    def _raise_non_finite(self, epoch: int, step: int, losses: dict[str, Tensor]) -> None:
        bad = [f"{k}={float(v.detach())}" for k, v in losses.items() if not torch.isfinite(v)]
        where = (f"the last good checkpoint (epoch {self.epoch}, step {self.step}) is "
                 f"{self.run_dir / CHECKPOINT}"
                 if self.run_dir is not None and (self.epoch or self.step)
                 else "no checkpoint was written yet")
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, step {step}: {', '.join(bad) or 'total'}; "
            f"{where}. Lower the learning rate or the loss weights, check the data for NaNs, "
            f"or set train.nonfinite=skip to drop such steps.")

    # ---- files -------------------------------------------------------------------------------
    def _write_checkpoint(self) -> None:
        if not self.is_main:
            return
        # Checkpoint first: if we die between the two writes, the log is rebuilt from it.
        atomic_torch_save(self.state_dict(), self.run_dir / CHECKPOINT)
        atomic_write_text(self.run_dir / METRICS,
                          "".join(json.dumps(r) + "\n" for r in self.history))

    def _load_for_resume(self) -> None:
        path = self.run_dir / CHECKPOINT if self.run_dir is not None else None
        if path is None or not path.is_file():
            raise CheckpointError(f"nothing to resume: no {CHECKPOINT} in {self.run_dir}; "
                                  f"start the run without --resume")
        if self.is_main:
            for stale in self.run_dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)   # a write cut short by the crash
        # Loaded to the CPU: load_state_dict copies each tensor to where its module lives (a
        # bank kept on the CPU stays there), and the RNG states must be CPU tensors.
        self.load_state_dict(safe_torch_load(path, map_location="cpu"))
        if self.epoch > self.s.epochs or (self.epoch == self.s.epochs and self.step):
            raise CheckpointError(f"the checkpoint is at epoch {self.epoch}, beyond the "
                                  f"{self.s.epochs} epochs asked for")

    def save_weights(self, path: str | Path) -> None:
        if self.is_main:
            save_weights(self.model, path, self.model_spec)


def save_weights(model: nn.Module, path: str | Path, spec: dict[str, Any] | None = None) -> None:
    """Write the model's weights (and, if known, how to rebuild it) atomically to ``path``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"format": WEIGHTS_FORMAT, "spec": spec, "state_dict": state}, path)


def _rng_state() -> dict[str, Any]:
    """Every random state a run may draw on, in types that ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _version() -> str:
    from .. import __version__
    return __version__
