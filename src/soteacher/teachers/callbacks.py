"""Trainer callbacks of the teacher-training baselines: weight averaging (SWA), the best epoch on
a validation split (early stopping), and a temperature fitted on it after training.

Each follows ``soteacher.engine.trainer.Callback``: ``on_epoch_end`` after every epoch,
``on_fit_end`` once before the final weights are written, and ``state_dict`` /
``load_state_dict`` so a resumed run continues exactly. A teacher method hands them to the
trainer through its objective's ``callbacks`` list.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..engine.evaluate import evaluate, iterate_eval, predict
from .calibration import fit_temperature, separates

__all__ = ["BestOnValidation", "TemperatureFit", "WeightAveraging", "refresh_batch_norm"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def refresh_batch_norm(model: nn.Module, dataset: Dataset, device: torch.device | str,
                       batch_size: int = 256, augment: nn.Module | None = None,
                       preprocess: nn.Module | None = None) -> None:
    """Recompute every batch-norm layer's running statistics with one pass over ``dataset``
    (training-mode forward passes, cumulative average, no gradients). ``augment`` and
    ``preprocess`` are applied to each batch as in training; a batch of one sample is skipped."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                 # cumulative moving average over the pass
    was_training = model.training
    model.train()
    try:
        for x, _ in iterate_eval(dataset, batch_size):
            if len(x) < 2:
                continue
            x = torch.as_tensor(x).to(device)
            if augment is not None:
                x = augment.to(device)(x)
            if preprocess is not None:
                x = preprocess.to(device)(x)
            model(x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)


class WeightAveraging:
    """Stochastic weight averaging (Izmailov et al., 2018): the running mean of the model's
    parameters at the end of every epoch ``> start_epoch`` (1-based; ``start_epoch=0`` averages
    every epoch). At the end of training the model takes the averaged parameters and, with
    ``refresh_bn``, batch-norm statistics recomputed in one pass over the training data."""

    def __init__(self, start_epoch: int, refresh_bn: bool = True) -> None:
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        self.start_epoch = int(start_epoch)
        self.refresh_bn = refresh_bn
        self.n = 0
        self.avg: dict[str, torch.Tensor] = {}

    def on_epoch_end(self, trainer: Any, epoch: int, record: dict[str, Any]) -> None:
        if epoch > self.start_epoch:
            with torch.no_grad():
                self.n += 1
                for name, p in trainer.model.named_parameters():
                    p = p.detach().float()
                    if name not in self.avg:
                        self.avg[name] = p.clone()
                    else:
                        self.avg[name] += (p.to(self.avg[name].device) - self.avg[name]) / self.n
        record["swa_models"] = self.n

    def on_fit_end(self, trainer: Any) -> None:
        if self.n == 0:
            return
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                p.copy_(self.avg[name].to(p.device, p.dtype))
        if self.refresh_bn:
            refresh_batch_norm(trainer.model, trainer.train_set, trainer.device,
                               batch_size=trainer.s.batch_size, augment=trainer.augment,
                               preprocess=trainer.preprocess)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "avg": dict(self.avg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n, self.avg = int(state["n"]), dict(state["avg"])


class BestOnValidation:
    """Evaluate on ``val_set`` after every epoch (``val_acc``, ``val_nll``, ``val_ece`` and
    ``best_epoch`` go into the epoch's record) and restore the weights of the best epoch at the
    end. ``metric``: ``"acc"`` (higher is better) or ``"nll"`` (lower is better); on a tie the
    earlier epoch is kept. With ``patience`` the training stops once that many epochs in a row
    have not improved on the best (the trainer reads ``stop_training``); without it, it runs all
    its epochs and only the choice of weights is early."""

    def __init__(self, val_set: Dataset, metric: str = "acc", patience: int | None = None) -> None:
        if metric not in ("acc", "nll"):
            raise ValueError(f"metric must be 'acc' or 'nll', got {metric!r}")
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int)
                                     or patience < 1):
            raise ValueError(f"patience must be a whole number of epochs >= 1 (or null for no "
                             f"stopping), got {patience!r}")
        self.val_set = val_set
        self.metric = metric
        self.patience = patience
        self.best_epoch = 0
        self.last_epoch = 0
        self.best_score: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    @property
    def stop_training(self) -> bool:
        """True once ``patience`` epochs have passed without a new best."""
        return (self.patience is not None and self.best_epoch > 0
                and self.last_epoch - self.best_epoch >= self.patience)

    def on_epoch_end(self, trainer: Any, epoch: int, record: dict[str, Any]) -> None:
        m = evaluate(trainer.model, self.val_set, device=trainer.device, prefix="val_",
                     preprocess=trainer.preprocess)
        record.update(m)
        score = m[f"val_{self.metric}"]
        if (self.best_score is None
                or (score > self.best_score if self.metric == "acc" else score < self.best_score)):
            self.best_score, self.best_epoch = score, epoch
            self.best_state = {k: v.detach().cpu().clone()
                               for k, v in trainer.model.state_dict().items()}
        self.last_epoch = epoch
        record["best_epoch"] = self.best_epoch

    def on_fit_end(self, trainer: Any) -> None:
        if self.best_state is not None:
            trainer.model.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_score": self.best_score,
                "best_state": self.best_state, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_epoch = int(state["best_epoch"])
        self.best_score = state["best_score"]
        self.best_state = state["best_state"]
        self.last_epoch = int(state.get("last_epoch", self.best_epoch))


class TemperatureFit:
    """After training, fit a temperature on ``val_set`` by NLL (:func:`fit_temperature`) and
    record it in the trainer's model spec, so the saved teacher is rebuilt with it. When the
    teacher classifies every validation sample correctly there is nothing to fit (the NLL falls
    all the way to ``T -> 0``): it warns and keeps temperature 1."""

    def __init__(self, val_set: Dataset) -> None:
        self.val_set = val_set
        self.temperature: float | None = None

    def on_epoch_end(self, trainer: Any, epoch: int, record: dict[str, Any]) -> None:
        pass

    def on_fit_end(self, trainer: Any) -> None:
        out = predict(trainer.model, self.val_set, trainer.device, preprocess=trainer.preprocess)
        if separates(out["logits"], out["y"]):
            # Every validation label is predicted: the NLL has no minimum (T -> 0). Dividing by
            # the search's lower end would make the teacher nearly one-hot (x1000 logits), which
            # wrecks distillers that read the non-target classes (DKD), so leave it unscaled.
            warnings.warn(f"temperature_scaled: the teacher classifies all {len(out['y'])} "
                          f"validation samples correctly, so no temperature minimises their NLL; "
                          f"keeping temperature 1 (a larger data.val_fraction gives the fit "
                          f"errors to work with)", stacklevel=2)
            self.temperature = 1.0
        else:
            self.temperature = fit_temperature(out["logits"], out["y"])
        if trainer.model_spec is not None:
            trainer.model_spec = {**trainer.model_spec, "temperature": self.temperature}
