"""The one training loop, for teachers and students alike.

Every step: augment the batch on the device, ask the objective for its named loss terms, sum them,
step the optimiser. Every epoch (and, if asked, every few steps): evaluate, append a line to
``metrics.jsonl`` and write a checkpoint holding the whole training state, so that a run killed
at any moment resumes to the very same weights.

An objective may ask for a preliminary stage (:class:`~soteacher.objective.PreliminaryStage`,
e.g. the ``init`` stage RepDistiller runs for AB, FSP and FT): its epochs run first, through the
same loop, with their own optimiser and constant learning rate, and then the main schedule runs
in full with its own optimiser. Every record says which stage its epoch belongs to
(``"stage": "init"`` or ``"main"``; ``"epoch"`` counts within the stage) and every checkpoint
holds both optimisers and the stage progress.

Under torchrun (a process group of several processes) the same loop runs with
DistributedDataParallel; see :mod:`soteacher.engine.distributed` for how a run on W processes
keeps to the single-process run (global batch, per-sample state, randomness, checkpoints).
"""

from __future__ import annotations

import dataclasses
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

    When the objective asks for a preliminary stage (``objective.preliminary_stage(model, lr)``),
    its ``epochs`` run before the ``settings.epochs`` of the main schedule, which then run in
    full: the preliminary epochs optimise only the stage's modules with their own SGD optimiser
    at the stage's constant learning rate (momentum, Nesterov and weight decay from
    ``settings``), with the model in eval mode except those modules; they are not evaluated and
    callbacks do not see them. The main stage starts with a fresh optimiser over the model and
    the objective's trainable parameters except the stage's ``frozen`` modules (kept in eval
    mode). ``self.epoch`` counts the epochs of the whole run (preliminary ones first); records
    count within their stage.

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
        self.name = name
        self.progress = Progress(name, settings.epochs, enabled=progress and self.is_main)
        self._progress_bars = {("main", name): self.progress}
        own = {id(p) for p in self.model.parameters()}
        extra = [p for p in self.objective.parameters() if p.requires_grad and id(p) not in own]
        # DDP averages the model's gradients; the objective's own parameters are averaged here.
        self._extra_params = extra
        # A preliminary stage: its own optimiser over its modules; the main optimiser leaves out
        # what the stage freezes afterwards.
        ask = getattr(self.objective, "preliminary_stage", None)
        plan = ask(self.model, settings.lr) if ask is not None else None
        self.plan = plan if plan is not None and plan.epochs > 0 else None
        self.init_epochs = self.plan.epochs if self.plan is not None else 0
        self.init_optimizer: torch.optim.Optimizer | None = None
        frozen: set[int] = set()
        if self.plan is not None:
            self.init_optimizer = self._build_init_optimizer(self.plan)
            frozen = {id(p) for m in self.plan.frozen for p in m.parameters()}
        main_params = [p for p in list(self.model.parameters()) + extra if id(p) not in frozen]
        self.optimizer = build_optimizer(main_params, settings)
        self.epoch = 0                 # epochs of the run completed, preliminary ones included
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

    def _build_init_optimizer(self, plan) -> torch.optim.Optimizer:
        if not (isinstance(plan.lr, (int, float)) and math.isfinite(plan.lr) and plan.lr > 0):
            raise ValueError(f"the preliminary stage's learning rate must be a finite number > 0, "
                             f"got {plan.lr!r}; set the distiller's init_lr option")
        params: dict[int, nn.Parameter] = {}
        for m in plan.modules:
            for p in m.parameters():
                if p.requires_grad:
                    params.setdefault(id(p), p)
        if not params:
            raise ValueError("the preliminary stage has no trainable parameters; set the "
                             "distiller's init_epochs=0 to skip it")
        return build_optimizer(params.values(), dataclasses.replace(self.s, lr=float(plan.lr)))

    # ---- stages ------------------------------------------------------------------------------
    @property
    def total_epochs(self) -> int:
        """Epochs of the whole run: the preliminary stage's, then the main schedule's."""
        return self.init_epochs + self.s.epochs

    def stage_of(self, run_epoch: int) -> tuple[str, int]:
        """The stage (``"init"`` or ``"main"``) of 1-based epoch ``run_epoch`` of the whole run,
        and the epoch's 1-based number inside that stage."""
        if run_epoch <= self.init_epochs:
            return "init", run_epoch
        return "main", run_epoch - self.init_epochs

    def _progress(self, stage: str) -> Progress:
        # A run without a preliminary stage keeps its plain name; otherwise every line names
        # its stage (an objective may also label epochs of one run as "init", see ab/fsp/ft's
        # init_stage="in_run").
        labelled = stage != "main" or self.plan is not None
        name = f"{self.name} [{stage} stage]" if labelled else self.name
        key = (stage, name)
        if key not in self._progress_bars:
            total = self.init_epochs if (stage == "init" and self.plan is not None) else self.s.epochs
            self._progress_bars[key] = Progress(name, total, stream=self.progress.stream,
                                                enabled=self.progress.enabled)
        return self._progress_bars[key]

    def _stage_progress(self) -> dict[str, Any]:
        """The stage the run is in (of its next step) and the epochs and steps done in it."""
        if self.epoch >= self.total_epochs:
            return {"name": "main", "epochs_done": self.s.epochs, "steps_done": 0}
        stage, epoch = self.stage_of(self.epoch + 1)
        return {"name": stage, "epochs_done": epoch - 1, "steps_done": self.step}

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "step": self.step,
            # the preliminary stage's length (0: none) and where the run stands in its stages
            "init_epochs": self.init_epochs,
            "stage": self._stage_progress(),
            "partial": self._partial,
            "seed": self.seed,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "init_optimizer": (self.init_optimizer.state_dict()
                               if self.init_optimizer is not None else None),
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
        saved_init = int(state.get("init_epochs", 0))
        if saved_init != self.init_epochs:
            raise CheckpointError(
                f"the checkpoint was written by a run with a preliminary stage of {saved_init} "
                f"epoch(s), this run has {self.init_epochs}; resume with the distiller options "
                f"of the original run (init_epochs, init_stage)")
        try:
            self.model.load_state_dict(state["model"])
            self.objective.load_state_dict(state["objective"])
        except RuntimeError as e:
            raise CheckpointError(f"the checkpoint does not fit this model/objective (was it "
                                  f"written with another config?): {e}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        if self.init_optimizer is not None:
            if state.get("init_optimizer") is None:
                raise CheckpointError("the checkpoint has no preliminary-stage optimiser although "
                                      "its run had a preliminary stage; it cannot be resumed")
            self.init_optimizer.load_state_dict(state["init_optimizer"])
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
        for run_epoch in range(self.epoch + 1, self.total_epochs + 1):
            stage, epoch = self.stage_of(run_epoch)
            if self._stop_requested():      # a resumed run that had already stopped
                break
            record = self._train_epoch(run_epoch)
            stop = False
            if stage == "main":
                # The preliminary stage is neither evaluated nor seen by callbacks (the
                # reference evaluates only the main schedule).
                if self.evaluate_fn is not None and (
                        epoch == E or (self.s.eval_every and epoch % self.s.eval_every == 0)):
                    # Rank 0 evaluates; every process gets its metrics (callbacks may act on them).
                    record.update(distributed.run_on_main(self.evaluate_fn, self.model))
                for cb in self.callbacks:
                    cb.on_epoch_end(self, epoch, record)
                stop = self._stop_requested() and epoch < E
                if stop:
                    record["stopped_early"] = True
            self.epoch, self.step, self._partial = run_epoch, 0, None
            self.history.append(record)
            self._progress(record["stage"]).epoch_end(record)
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
        """Train one whole epoch (``epoch`` of the whole run, see :meth:`stage_of`) from its
        first step and return its record; nothing is written (for benchmarks and custom
        schedules)."""
        self.step, self._partial = 0, None
        return self._train_epoch(epoch)

    def _enter_stage(self, stage: str, epoch: int) -> tuple[torch.optim.Optimizer, float]:
        """Set train/eval modes and the objective's stage and epoch for ``epoch`` of ``stage``;
        return the optimiser and learning rate of the epoch."""
        if self.ddp is not None:
            self.ddp.train()
        self.model.train()
        self.objective.train()
        if self.plan is None:
            if hasattr(self.objective, "set_stage"):
                self.objective.set_stage("main")
            self.objective.set_epoch(epoch, self.s.epochs)
            return self.optimizer, learning_rate(self.s, epoch)
        self.objective.set_stage(stage)
        if stage == "init":
            self.model.eval()
            for m in self.plan.modules:
                m.train()
            self.objective.set_epoch(epoch, self.init_epochs)
            return self.init_optimizer, float(self.plan.lr)
        for m in self.plan.frozen:
            m.eval()
        self.objective.set_epoch(epoch, self.s.epochs)
        return self.optimizer, learning_rate(self.s, epoch)

    def _train_epoch(self, run_epoch: int) -> dict[str, Any]:
        self._wrap_ddp()
        stage, epoch = self.stage_of(run_epoch)
        optimizer, lr = self._enter_stage(stage, epoch)
        # The objective may label epochs of the main schedule itself (ab/fsp/ft in_run).
        stage = getattr(self.objective, "stage", stage) if self.plan is None else stage
        progress = self._progress(stage)
        for group in optimizer.param_groups:
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
        for step, (x, y, idx) in enumerate(self._batches(run_epoch, self.step),
                                            start=self.step + 1):
            if self._arrays is None:
                self._check_labels(y, idx)     # CPU tensors from the loader: no sync
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            idx = idx.to(self.device, non_blocking=True)
            with torch.no_grad():
                if self.augment is not None:
                    x = self._augment(x, run_epoch, step)
                if self.preprocess is not None:
                    x = self.preprocess(x)
                if self.s.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
            sizes = self._slice_sizes(step) if self.distributed else None
            with distributed.step_layout(sizes), torch.autocast(
                    self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.objective(self.forward_model, x, y, idx)
                loss = sum(out.losses.values())
            optimizer.zero_grad(set_to_none=True)
            # Every process takes the same branch: one non-finite slice skips the global step.
            if not distributed.all_true(torch.isfinite(loss), self.device):
                if self.s.nonfinite == "error":
                    self._raise_non_finite(epoch, step, out.losses, stage)
                skipped += 1
            else:
                if sizes is not None and sizes[self.rank] * self.world != sum(sizes):
                    # DDP averages over processes: weight each slice's mean by its share of
                    # the global batch so that the average is the global mean.
                    loss = loss * (sizes[self.rank] * self.world / sum(sizes))
                self.scaler.scale(loss).backward()
                if self.distributed:
                    self._average_extra_grads()
                self.scaler.step(optimizer)
                self.scaler.update()
                for k, v in out.losses.items():
                    sums[k] = sums.get(k, 0) + v.detach().float() * len(y)
                correct += (out.logits.detach().argmax(1) == y).sum()
                seen += len(y)
            self.step = step
            progress.step(epoch, step, steps)
            if (self.run_dir is not None and self.s.checkpoint_every
                    and step % self.s.checkpoint_every == 0 and step < steps):
                tot_sums, tot_correct, tot_seen = self._totals(sums, correct, seen)
                self._partial = {"sums": tot_sums, "correct": tot_correct, "seen": tot_seen,
                                 "skipped": skipped, "time": time.perf_counter() - t0}
                self._write_checkpoint()
        tot_sums, tot_correct, seen = self._totals(sums, correct, seen)
        terms = {k: v / max(seen, 1) for k, v in tot_sums.items()}
        record = {"epoch": epoch, "stage": stage, "lr": lr, "loss": sum(terms.values()),
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

    def _raise_non_finite(self, epoch: int, step: int, losses: dict[str, Tensor],
                          stage: str = "main") -> None:
        bad = [f"{k}={float(v.detach())}" for k, v in losses.items() if not torch.isfinite(v)]
        where = (f"the last good checkpoint (epoch {self.epoch}, step {self.step}) is "
                 f"{self.run_dir / CHECKPOINT}"
                 if self.run_dir is not None and (self.epoch or self.step)
                 else "no checkpoint was written yet")
        raise NonFiniteLossError(
            f"non-finite loss at {'' if stage == 'main' else stage + '-stage '}epoch {epoch}, "
            f"step {step}: {', '.join(bad) or 'total'}; "
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
        if self.epoch > self.total_epochs or (self.epoch == self.total_epochs and self.step):
            asked = (f"{self.s.epochs} epochs" if not self.init_epochs else
                     f"{self.init_epochs} preliminary + {self.s.epochs} epochs")
            raise CheckpointError(f"the checkpoint is at epoch {self.epoch}, beyond the "
                                  f"{asked} asked for")

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
