"""The one training loop, for teachers and students alike.

Every step: augment the batch on the device, ask the objective for its named loss terms, sum them,
step the optimiser. Every epoch: step the learning-rate schedule, evaluate, append a line to
``metrics.jsonl`` and write a checkpoint holding the whole training state.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..objective import Objective
from .evaluate import resolve_device
from .io import atomic_torch_save, atomic_write_text, safe_torch_load, CheckpointError
from .optim import TrainSettings, build_optimizer, learning_rate
from .progress import Progress

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"
METRICS = "metrics.jsonl"
CHECKPOINT_FORMAT = "soteacher-checkpoint/1"
WEIGHTS_FORMAT = "soteacher-model/1"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped before the bad step was applied."""


class Trainer:
    """Trains ``model`` on ``train_set`` (items ``(x, y, index)``) by minimising ``objective``.

    ``evaluate`` (optional) maps the model to a dict of metrics logged each ``eval_every`` epochs
    and after the last. With a ``run_dir`` the trainer writes ``metrics.jsonl``, a checkpoint
    after every epoch and the final weights ``model.pt``; ``resume=True`` continues from the
    checkpoint there. ``model_spec`` (registry name and options) is stored with the weights so
    they can be rebuilt by name.
    """

    def __init__(self, model: nn.Module, objective: Objective, train_set: Dataset,
                 settings: TrainSettings, *, augment: nn.Module | None = None,
                 device: str | torch.device | None = None, seed: int = 0,
                 run_dir: str | Path | None = None, resume: bool = False,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 name: str = "train", progress: bool = True, num_workers: int = 0,
                 model_spec: dict[str, Any] | None = None) -> None:
        settings.validate()
        if len(train_set) == 0:
            raise ValueError("the training set is empty")
        if settings.batch_size > len(train_set):
            raise ValueError(f"batch_size {settings.batch_size} is larger than the training set "
                             f"({len(train_set)} samples); lower it with "
                             f"--set <phase>.train.batch_size=N")
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.objective = objective.to(self.device)
        self.augment = augment.to(self.device) if augment is not None else None
        self.train_set = train_set
        self.s = settings
        self.seed = seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.resume = resume
        self.evaluate_fn = evaluate
        self.num_workers = num_workers
        self.model_spec = model_spec
        self.progress = Progress(name, settings.epochs, enabled=progress)
        own = {id(p) for p in self.model.parameters()}
        extra = [p for p in self.objective.parameters() if p.requires_grad and id(p) not in own]
        self.optimizer = build_optimizer(list(self.model.parameters()) + extra, settings)
        self.epoch = 0              # epochs completed
        self.history: list[dict[str, Any]] = []

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "seed": self.seed,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
            "history": [json.dumps(r) for r in self.history],
            "versions": {"torch": str(torch.__version__), "soteacher": _version()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"not a soteacher training checkpoint (format "
                                  f"{state.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
        try:
            self.model.load_state_dict(state["model"])
            self.objective.load_state_dict(state["objective"])
        except RuntimeError as e:
            raise CheckpointError(f"the checkpoint does not fit this model/objective: {e}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.epoch = int(state["epoch"])
        self.history = [json.loads(r) for r in state["history"]]

    # ---- data --------------------------------------------------------------------------------
    def _batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        # The order depends only on (seed, epoch): a resumed run sees the same batches.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n, b = len(self.train_set), self.s.batch_size
        perm = torch.randperm(n, generator=g)
        if n % b == 1:
            # A last batch of one sample breaks batch norm in training mode; drop it.
            perm = perm[:-1]
        ds = self.train_set
        if hasattr(ds, "x") and hasattr(ds, "y"):
            for i in range(0, len(perm), b):
                idx = perm[i:i + b]
                yield ds.x[idx], ds.y[idx], idx
            return
        # Its own generator keeps the loader from drawing on the global RNG, which the
        # augmentations use: the two data paths then see identical randomness.
        loader = DataLoader(ds, batch_size=b, sampler=perm.tolist(), num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", generator=g)
        for x, y, idx in loader:
            yield x, y, torch.as_tensor(idx)

    def steps_per_epoch(self) -> int:
        n = len(self.train_set)
        n -= n % self.s.batch_size == 1
        return math.ceil(n / self.s.batch_size)

    # ---- loop --------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        """Train to ``settings.epochs`` and return the per-epoch records."""
        if self.resume:
            self._load_for_resume()
        else:
            torch.manual_seed(self.seed)
        E = self.s.epochs
        for epoch in range(self.epoch + 1, E + 1):
            record = self._train_epoch(epoch)
            if self.evaluate_fn is not None and (
                    epoch == E or (self.s.eval_every and epoch % self.s.eval_every == 0)):
                record.update(self.evaluate_fn(self.model))
            self.epoch = epoch
            self.history.append(record)
            self.progress.epoch_end(record)
            if self.run_dir is not None:
                self._write_epoch(record)
        if self.run_dir is not None:
            self.save_weights(self.run_dir / WEIGHTS)
        return self.history

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        self.model.train()
        self.objective.train()
        self.objective.set_epoch(epoch, self.s.epochs)
        lr = learning_rate(self.s, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        steps = self.steps_per_epoch()
        sums: dict[str, Tensor] = {}
        correct = torch.zeros((), device=self.device)
        seen = 0
        t0 = time.perf_counter()
        for step, (x, y, idx) in enumerate(self._batches(epoch), start=1):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            idx = idx.to(self.device, non_blocking=True)
            if self.augment is not None:
                with torch.no_grad():
                    x = self.augment(x)
            out = self.objective(self.model, x, y, idx)
            loss = sum(out.losses.values())
            if not torch.isfinite(loss):
                self._raise_non_finite(epoch, step, out.losses)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            for k, v in out.losses.items():
                sums[k] = sums.get(k, 0) + v.detach() * len(y)
            correct += (out.logits.detach().argmax(1) == y).sum()
            seen += len(y)
            self.progress.step(epoch, step, steps)
        terms = {k: float(v) / seen for k, v in sums.items()}
        return {"epoch": epoch, "lr": lr, "loss": sum(terms.values()),
                **{f"loss_{k}": v for k, v in terms.items()},
                "train_acc": float(correct) / seen,
                "epoch_time": time.perf_counter() - t0}

    def _raise_non_finite(self, epoch: int, step: int, losses: dict[str, Tensor]) -> None:
        bad = [f"{k}={float(v.detach())}" for k, v in losses.items() if not torch.isfinite(v)]
        where = (f"the last good checkpoint (epoch {self.epoch}) is {self.run_dir / CHECKPOINT}"
                 if self.run_dir is not None and self.epoch > 0 else "no checkpoint was written yet")
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, step {step}: {', '.join(bad) or 'total'}; "
            f"{where}. Lower the learning rate or the loss weights, or check the data for NaNs.")

    # ---- files -------------------------------------------------------------------------------
    def _write_epoch(self, record: dict[str, Any]) -> None:
        # Checkpoint first: if we die between the two writes, the metrics log is rebuilt from it.
        atomic_torch_save(self.state_dict(), self.run_dir / CHECKPOINT)
        atomic_write_text(self.run_dir / METRICS,
                          "".join(json.dumps(r) + "\n" for r in self.history))

    def _load_for_resume(self) -> None:
        path = self.run_dir / CHECKPOINT if self.run_dir is not None else None
        if path is None or not path.is_file():
            raise CheckpointError(f"nothing to resume: no {CHECKPOINT} in {self.run_dir}; "
                                  f"start the run without --resume")
        self.load_state_dict(safe_torch_load(path, map_location=self.device))
        if self.epoch > self.s.epochs:
            raise CheckpointError(f"the checkpoint is at epoch {self.epoch}, beyond the "
                                  f"{self.s.epochs} epochs asked for")

    def save_weights(self, path: str | Path) -> None:
        save_weights(self.model, path, self.model_spec)


def save_weights(model: nn.Module, path: str | Path, spec: dict[str, Any] | None = None) -> None:
    """Write the model's weights (and, if known, how to rebuild it) atomically to ``path``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"format": WEIGHTS_FORMAT, "spec": spec, "state_dict": state}, path)


def _version() -> str:
    from .. import __version__
    return __version__
