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

from ..data.base import dataset_labels
from ..objective import Objective
from . import distributed
from .evaluate import resolve_device
from .io import (CheckpointError, atomic_torch_save, atomic_write_text, ensure_writable_dir,
                 safe_torch_load, state_dict_mismatch)
from .optim import AMP_DTYPES, TrainSettings, build_optimizer, learning_rate
from .progress import Progress

#: Set by :func:`request_interrupt` (the command line's SIGINT handler); read before every step.
_INTERRUPT = {"requested": False}


def request_interrupt(requested: bool = True) -> None:
    """Ask every running :class:`Trainer` to stop with ``KeyboardInterrupt`` before its next step
    (``False`` withdraws the request). The command line calls it on Ctrl-C, besides raising
    ``KeyboardInterrupt`` at once, so that an interrupt that lands where Python only prints
    exceptions (a finaliser) still stops the run."""
    _INTERRUPT["requested"] = bool(requested)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"           # folder of TensorBoard event files in a run directory
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
    """The loss became NaN or infinite; training stopped at the next log or checkpoint point,
    before anything from the bad step on was written (the last checkpoint is the last good
    state)."""


class InputShapeError(ValueError):
    """The model cannot take the data's inputs (their shape does not fit its first layer)."""


def expected_input(model: nn.Module) -> str:
    """What ``model`` expects, read from its first convolution or linear layer (or a stated
    ``input_shape``); empty when neither says."""
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return f"inputs of shape {tuple(shape)} per sample"
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            return f"{m.in_features} input features (layer {name!r}: {m})"
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = {nn.Conv1d: "(C, L)", nn.Conv2d: "(C, H, W)", nn.Conv3d: "(C, D, H, W)"}[type(m)]
            return f"inputs {dims} with C = {m.in_channels} channels (layer {name!r}: {m})"
    return ""


def input_mismatch_message(who: str, model: nn.Module, x: Tensor, error: BaseException) -> str:
    """One message for a model that cannot read a batch ``x``: what it expects, what it got."""
    expects = expected_input(model)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"{who} ({type(model).__name__}) cannot read the dataset's inputs: each sample has "
            f"shape {tuple(x.shape[1:])} and dtype {str(x.dtype).replace('torch.', '')} "
            f"(batches {tuple(x.shape)})"
            + (f", but it expects {expects}" if expects else "")
            + f" (torch: {first}); reshape the data or build the model for this input shape")


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
                 callbacks: Sequence[Callback] = (), tensorboard: bool = False) -> None:
        settings.validate()
        if len(train_set) == 0:
            raise ValueError("the training set is empty")
        if settings.batch_size > len(train_set):
            raise ValueError(f"batch_size {settings.batch_size} is larger than the training set "
                             f"({len(train_set)} samples); lower the batch size (batch_size=N "
                             f"in the Python API, --set <phase>.train.batch_size=N on the "
                             f"command line)")
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
        if self.run_dir is not None and distributed.rank() == 0:
            ensure_writable_dir(self.run_dir, "run_dir", "choose another run_dir")
        self.resume = resume
        if tensorboard and self.run_dir is None:
            raise ValueError("tensorboard=True writes into the run directory; give a run_dir")
        self.tensorboard = tensorboard
        self._tb = None                # the TensorBoard writer, opened when training starts
        self._probed = False           # whether a failing first step was checked for a shape problem
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
        # Labels are checked once, up front, where the dataset holds them; otherwise each
        # batch's, on the CPU before they travel (an out-of-range label would stop a CUDA run
        # with a device-side assertion).
        labels = dataset_labels(train_set)
        self._labels_checked = labels is not None
        if labels is not None:
            self._check_labels(labels, torch.arange(len(train_set)))

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
        for part, module in (("model", self.model), ("objective", self.objective)):
            try:
                module.load_state_dict(state[part])
            except RuntimeError as e:
                # torch lists every tensor that differs, one per line; the first few and a
                # count say enough
                problem = state_dict_mismatch(module.state_dict(), state[part]) or \
                    str(e).strip().splitlines()[0]
                raise CheckpointError(f"the checkpoint does not fit this model/objective (was it "
                                      f"written with another config?): {part}: "
                                      f"{problem}") from None
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
            if self._tb is not None:
                self._tb.close()
                self._tb = None

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
            self._say_resumed()
        else:
            torch.manual_seed(self.seed)
        if self.tensorboard and self.is_main:
            self._tb = open_tensorboard(self.run_dir / TENSORBOARD, purge_step=self.epoch + 1)
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
            if self._tb is not None:
                log_scalars(self._tb, record, run_epoch)
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
        # No step waits for the host: each writes its loss terms, total loss and number of
        # correct predictions into a row of a log on the device (_StepLog), which the host reads
        # only at log and checkpoint points (_fold): there the running sums grow, and a
        # non-finite loss is found. Mid-epoch checkpoints save the sums so that a resumed epoch
        # logs the same averages. With several processes the sums are each process's own;
        # checkpoints hold their total, which rank 0 carries on.
        p = self._partial or {"sums": {}, "correct": 0, "seen": 0, "skipped": 0, "time": 0.0}
        if not self.is_main:
            p = {**p, "sums": {k: 0.0 for k in p["sums"]}, "correct": 0, "seen": 0}
        acc = {"sums": dict(p["sums"]), "correct": p["correct"], "seen": p["seen"],
               "skipped": p["skipped"]}
        skip = self.s.nonfinite == "skip"
        log = _StepLog(steps - self.step, self.device, skip)
        checkpointed = (self.epoch, self.step)       # where the last checkpoint stands
        t0 = time.perf_counter() - p["time"]
        for step, (x, y, idx) in enumerate(self._batches(run_epoch, self.step),
                                            start=self.step + 1):
            if _INTERRUPT["requested"]:
                # A Ctrl-C whose KeyboardInterrupt Python swallowed (it landed in a finaliser
                # or a weakref callback, where exceptions are only printed) stops the run here.
                raise KeyboardInterrupt
            if not self._labels_checked:
                self._check_labels(y, idx)     # CPU tensors from the loader: no device sync
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
                try:
                    out = self.objective(self.forward_model, x, y, idx)
                except RuntimeError as e:
                    self._explain_input_mismatch(x, e)
                    raise
                loss = _total(out.losses)
            optimizer.zero_grad(set_to_none=True)
            if log.must_fold(out.losses):           # terms changed within the epoch: rare
                self._fold(log, acc, epoch, stage, checkpointed)
            # ok: whether the step applies (skip mode; the same on every process), else None
            ok = log.record(step, len(y), out.losses, loss, out.logits, y)
            if sizes is not None and sizes[self.rank] * self.world != sum(sizes):
                # DDP averages over processes: weight each slice's mean by its share of
                # the global batch so that the average is the global mean.
                loss = loss * (sizes[self.rank] * self.world / sum(sizes))
            # A non-finite step still runs: "skip" takes its update back on the device, "error"
            # stops at the next log or checkpoint point, before anything is written.
            undo = _UndoStep(optimizer) if skip else None
            self.scaler.scale(loss).backward()
            if self.distributed:
                self._average_extra_grads()
            self.scaler.step(optimizer)
            self.scaler.update()
            if undo is not None:
                undo.unless(ok)
            self.step = step
            progress.step(epoch, step, steps)
            if (self.run_dir is not None and self.s.checkpoint_every
                    and step % self.s.checkpoint_every == 0 and step < steps):
                self._fold(log, acc, epoch, stage, checkpointed)
                tot_sums, tot_correct, tot_seen = self._totals(acc["sums"], acc["correct"],
                                                               acc["seen"])
                self._partial = {"sums": tot_sums, "correct": tot_correct, "seen": tot_seen,
                                 "skipped": acc["skipped"], "time": time.perf_counter() - t0}
                self._write_checkpoint()
                checkpointed = (self.epoch, step)
        self._fold(log, acc, epoch, stage, checkpointed)
        tot_sums, tot_correct, seen = self._totals(acc["sums"], acc["correct"], acc["seen"])
        terms = {k: v / max(seen, 1) for k, v in tot_sums.items()}
        record = {"epoch": epoch, "stage": stage, "lr": lr, "loss": sum(terms.values()),
                  **{f"loss_{k}": v for k, v in terms.items()},
                  "train_acc": tot_correct / max(seen, 1),
                  "epoch_time": time.perf_counter() - t0}
        if skip:
            record["skipped_steps"] = acc["skipped"]
        return record

    def _fold(self, log: "_StepLog", acc: dict[str, Any], epoch: int, stage: str,
              checkpointed: tuple[int, int]) -> None:
        """Read the step log (one host read) into the running sums ``acc`` of this process,
        leaving out steps that did not apply, and empty it; with ``nonfinite="error"`` raise
        :class:`NonFiniteLossError` for the first step whose loss was not finite on any
        process (nothing of it or after it has been written)."""
        rows = log.read(self.distributed)
        first_bad = None
        for (step, size), (terms, total, correct, ok) in rows:
            if ok:
                for k, v in terms.items():
                    acc["sums"][k] = acc["sums"].get(k, 0.0) + v * size
                acc["correct"] += int(round(correct))
                acc["seen"] += size
            else:
                acc["skipped"] += 1
                if first_bad is None:
                    first_bad = (step, terms, total)
        if first_bad is not None and self.s.nonfinite == "error":
            step, terms, total = first_bad
            self._raise_non_finite(epoch, step, terms, stage, checkpointed, total)

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
        the model's): one all-reduce of them all, packed."""
        grads = [p.grad for p in self._extra_params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        distributed.all_reduce_sum(flat)
        flat /= self.world
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in
                                     zip(flat.split([g.numel() for g in grads]), grads)])

    def _totals(self, sums: dict[str, float], correct: int,
                seen: int) -> tuple[dict[str, float], int, int]:
        """The running sums (plain numbers), summed over processes."""
        if not self.distributed:
            return dict(sums), int(correct), seen
        keys = sorted(sums)
        packed = torch.tensor([float(sums[k]) for k in keys] + [float(correct), float(seen)],
                              dtype=torch.float64, device=self.device)
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

    def _explain_input_mismatch(self, x: Tensor, error: RuntimeError) -> None:
        """After a step failed: if the model (or the objective's teacher) cannot take the batch
        at all, raise an ``InputShapeError`` saying what it expects and what the data gives."""
        if self._probed:
            return
        self._probed = True
        models = [("the model", self.model)]
        teacher = getattr(self.objective, "teacher", None)
        if isinstance(teacher, nn.Module):
            models.append(("the teacher", teacher))
        for who, model in models:
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    model(x[:2])
            except RuntimeError as e:
                raise InputShapeError(input_mismatch_message(who, model, x, e)) from error
            finally:
                model.train(was_training)

    def _say_resumed(self) -> None:
        if not self.progress.enabled:
            return
        where = self.run_dir / CHECKPOINT
        if self.epoch >= self.total_epochs:
            msg = (f"{self.name}: the run in {self.run_dir} had finished (epoch {self.epoch} of "
                   f"{self.total_epochs}); its weights are kept")
        else:
            stage, epoch = self.stage_of(self.epoch + 1)
            in_stage = "" if self.plan is None else f" of the {stage} stage"
            total = self.init_epochs if stage == "init" else self.s.epochs
            msg = (f"{self.name}: resuming from epoch {epoch - 1}, step {self.step}{in_stage} "
                   f"({epoch - 1} of {total} epochs done, and {self.step} steps of epoch "
                   f"{epoch}; {where})")
        self.progress.stream.write(msg + "\n")
        self.progress.stream.flush()

    def _raise_non_finite(self, epoch: int, step: int, terms: dict[str, float],
                          stage: str, checkpointed: tuple[int, int], total: float) -> None:
        bad = [f"{k}={v}" for k, v in terms.items() if not math.isfinite(v)]
        if not bad:
            bad = [f"total={total}" if not math.isfinite(total) else "on another process"]
        ck_epoch, ck_step = checkpointed
        where = (f"the last good checkpoint (epoch {ck_epoch}, step {ck_step}) is "
                 f"{self.run_dir / CHECKPOINT}"
                 if self.run_dir is not None and (ck_epoch or ck_step)
                 else "no checkpoint was written yet")
        raise NonFiniteLossError(
            f"non-finite loss at {'' if stage == 'main' else stage + '-stage '}epoch {epoch}, "
            f"step {step}: {', '.join(bad)}; "
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


def _total(losses: dict[str, Tensor]) -> Tensor:
    """The sum of the loss terms (``sum()`` would first add them to a 0: one more kernel)."""
    if not losses:
        raise ValueError("the objective returned no loss terms")
    terms = iter(losses.values())
    total = next(terms)
    for t in terms:
        total = total + t
    return total


class _StepLog:
    """One epoch's per-step numbers, kept on the device: row ``i`` holds step ``i``'s loss terms,
    total loss, number of correct predictions and (``skip`` mode) whether the step applied,
    written by one ``torch.stack(..., out=row)``. The host reads them in :meth:`read`, at log
    and checkpoint points only; it knows each step's number and batch size itself."""

    def __init__(self, capacity: int, device: torch.device, skip: bool) -> None:
        self.capacity, self.device, self.skip = max(capacity, 1), device, skip
        self.keys: tuple[str, ...] | None = None
        self.rows: Tensor | None = None
        self.steps: list[tuple[int, int]] = []      # (step, batch size) of each row

    def must_fold(self, losses: dict[str, Tensor]) -> bool:
        """Whether the log has to be read before it can take a step with these terms."""
        return bool(self.steps) and (tuple(losses) != self.keys
                                     or len(self.steps) == self.capacity)

    def record(self, step: int, size: int, losses: dict[str, Tensor], loss: Tensor,
               logits: Tensor, y: Tensor) -> Tensor | None:
        """Write the step's row; in ``skip`` mode return its flag (a bool tensor, the same on
        every process: whether the total loss was finite everywhere)."""
        if self.rows is None or tuple(losses) != self.keys:
            for k, v in losses.items():
                if v.numel() != 1:
                    raise ValueError(f"loss term {k!r} has shape {tuple(v.shape)}; every term "
                                     f"an objective returns must be a scalar")
            self.keys = tuple(losses)
            self.rows = torch.empty(self.capacity, len(self.keys) + 3, device=self.device)
        items = [v.detach().reshape(()) for v in losses.values()]
        items += [loss.detach().reshape(()), (logits.detach().argmax(1) == y).sum()]
        ok = None
        if self.skip:
            # one slice's non-finite loss skips the global step on every process
            ok = distributed.all_true_on_device(torch.isfinite(items[-2]))
            items.append(ok)
        torch.stack(items, out=self.rows[len(self.steps), :len(items)])
        self.steps.append((step, size))
        return ok

    def read(self, distributed_run: bool) -> list[tuple[tuple[int, int],
                                                      tuple[dict[str, float], float, float,
                                                            bool]]]:
        """Every row as ``((step, size), (terms, total, correct, applied))``, and empty the log.
        Outside ``skip`` mode a step applied if its total loss was finite on every process."""
        n = len(self.steps)
        if n == 0:
            return []
        rows = self.rows[:n]
        k = len(self.keys)
        if self.skip:
            ok = rows[:, k + 2]
        else:
            ok = torch.isfinite(rows[:, k]).to(rows.dtype)
            if distributed_run:
                ok = distributed.all_reduce_min(ok)
        host = torch.cat([rows[:, :k + 2], ok[:, None]], dim=1).tolist()
        steps, self.steps = self.steps, []
        return [(at, (dict(zip(self.keys, r[:k])), r[k], r[k + 1], r[k + 2] > 0))
                for at, r in zip(steps, host)]


def _memory_order(t: Tensor) -> Tensor | None:
    """A 1-D view of ``t``'s elements in memory order (contiguous or channels-last layouts),
    or None."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    v = t.permute(order)
    return v.view(-1) if v.is_contiguous() else None


class _UndoStep:
    """Takes an optimiser step back on the device where a flag is false, with no host read:
    the parameters and the SGD momentum buffers are copied (one ``cat`` each) before the step
    and put back with one ``torch.where`` and one ``_foreach_copy_`` after it. A momentum
    buffer the step created is put back to zeros, which the next step treats exactly as a
    missing one (SGD without dampening). Update: :meth:`unless`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.saved_params = self._save(self.params)
        self.buf_params = [p for p in self.params
                           if optimizer.state.get(p, {}).get("momentum_buffer") is not None]
        self.saved_bufs = self._save([self._buf(p) for p in self.buf_params])

    def _buf(self, p: Tensor) -> Tensor | None:
        return self.optimizer.state.get(p, {}).get("momentum_buffer")

    @staticmethod
    def _save(tensors: list[Tensor]) -> Tensor | None:
        views = [_memory_order(t) for t in tensors]
        if not tensors:
            return None
        return torch.cat([v if v is not None else t.reshape(-1) for v, t in zip(views, tensors)])

    @staticmethod
    def _restore(tensors: list[Tensor], saved: Tensor | None, ok: Tensor) -> None:
        if not tensors:
            return
        views = [_memory_order(t) for t in tensors]
        now = torch.cat([v if v is not None else t.reshape(-1) for v, t in zip(views, tensors)])
        keep = torch.where(ok, now, saved if saved is not None else torch.zeros_like(now))
        parts = keep.split([t.numel() for t in tensors])
        flat = [(v, part) for v, part in zip(views, parts) if v is not None]
        if flat:
            torch._foreach_copy_([v for v, _ in flat], [part for _, part in flat])
        for v, t, part in zip(views, tensors, parts):
            if v is None:           # an unusual layout: copied back on its own
                t.copy_(part.view(t.shape))

    @torch.no_grad()
    def unless(self, ok: Tensor) -> None:
        """Keep the step where ``ok`` (a bool tensor) is true, else restore the state before it."""
        self._restore(self.params, self.saved_params, ok)
        self._restore([self._buf(p) for p in self.buf_params], self.saved_bufs, ok)
        had = {id(p) for p in self.buf_params}
        created = [b for b in (self._buf(p) for p in self.params if id(p) not in had)
                   if b is not None]
        self._restore(created, None, ok)


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


def open_tensorboard(folder: Path, purge_step: int | None = None):
    """A TensorBoard ``SummaryWriter`` into ``folder``; ``purge_step`` hides the events that a
    resumed run writes again (those of epochs after its checkpoint)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("TensorBoard logging needs the tensorboard package: pip install "
                          "'soteacher[tensorboard]' (or set logging.tensorboard=false)") from None
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def log_scalars(writer, record: dict[str, Any], step: int) -> None:
    """Every number of one ``metrics.jsonl`` record as a TensorBoard scalar at ``step`` (the
    epoch of the whole run); tags group them: ``loss/ce``, ``train/acc``, ``test/acc``, ..."""
    stage = record.get("stage", "main")
    for key, value in record.items():
        if key in ("epoch", "stage") or isinstance(value, bool) or not isinstance(
                value, (int, float)):
            continue
        tag = scalar_tag(key)
        writer.add_scalar(tag if stage == "main" else f"{stage}/{tag}", value, step)
    writer.flush()


def scalar_tag(key: str) -> str:
    """``loss_ce`` -> ``loss/ce``, ``test_acc`` -> ``test/acc``, ``loss`` -> ``loss/total``."""
    if key == "loss":
        return "loss/total"
    for prefix in ("loss_", "train_", "test_", "val_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return f"train/{key}"

