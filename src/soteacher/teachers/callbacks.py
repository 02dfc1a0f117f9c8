"""Trainer callbacks of the teacher-training baselines: stochastic weight averaging (SWA), the
best epoch on a validation split (early stopping), and a temperature fitted on it after training.

Each follows ``soteacher.engine.trainer.Callback``: ``on_epoch_end`` after every epoch,
``on_fit_end`` once before the final weights are written, and ``state_dict`` /
``load_state_dict`` so a resumed run continues exactly. A teacher method hands them to the
trainer through its objective's ``callbacks`` list.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..engine import distributed
from ..engine.evaluate import evaluate, predict
from .calibration import fit_temperature, separates

__all__ = ["BN_REFRESH", "BestOnValidation", "TemperatureFit", "WeightAveraging",
           "refresh_batch_norm", "swa_update"]

#: When :class:`WeightAveraging` recomputes the averaged model's batch-norm statistics.
BN_REFRESH = ("every_update", "end", "off")


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    """The batch-norm layers (every ``_BatchNorm``: 1d/2d/3d, lazy, sync) that keep running
    statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


@torch.no_grad()
def swa_update(average: nn.Module, model: nn.Module, count: int) -> None:
    """One step of stochastic weight averaging (Izmailov et al., UAI 2018), in place:
    ``w_avg <- (1 - a) * w_avg + a * w`` with ``a = 1 / (count + 1)``, for every parameter of
    ``average`` and the same-position parameter of ``model`` (same architecture). ``count`` is
    the number of models already in the average, so after the step ``average`` holds the
    arithmetic mean of ``count + 1`` weight snapshots (at ``count = 0`` it becomes ``model``'s
    weights). Buffers are not averaged: batch-norm statistics are recomputed instead
    (:func:`refresh_batch_norm`). The operations, in this order, are those of the official
    SoTeacher code's ``SWA`` (``helper/regularizer.py``), so the result is bit-equal to it."""
    if count < 0:
        raise ValueError(f"count (models already averaged) must be >= 0, got {count}")
    alpha = 1.0 / (count + 1)
    avg_params, params = list(average.parameters()), list(model.parameters())
    if len(avg_params) != len(params):
        raise ValueError(f"cannot average a model of {len(params)} parameter tensors into one of "
                         f"{len(avg_params)}: build the average as a copy of the model")
    for a, p in zip(avg_params, params):
        a.mul_(1.0 - alpha)
        a.add_(p.detach().to(a.device, a.dtype) * alpha)


@torch.no_grad()
def refresh_batch_norm(model: nn.Module, batches: Iterable[Tensor]) -> None:
    """Recompute the running statistics of every batch-norm layer of ``model`` from one pass
    over ``batches`` (input tensors of shape (B, ...), ready for the model: on its device,
    augmented and preprocessed as in training).

    As SWA's batch-norm update (Izmailov et al., 2018) in the official SoTeacher code
    (``SWA._bn_update``): the running mean is reset to 0 and the running variance to 1, the model
    runs in training mode, and before a batch of ``b`` samples with ``n`` samples already seen
    each layer's momentum is set to ``b / (n + b)``. The running mean thus ends as the mean of
    the pass's samples (of the layer's input) and the running variance as the sample-weighted
    mean of the batches' unbiased variances; this is not PyTorch's ``momentum=None`` (an
    unweighted mean over batches), which differs when the batches differ in size.
    ``num_batches_tracked`` is not reset (it counts on, as there). Momenta and the train/eval
    mode are restored afterwards; without batch-norm layers nothing runs."""
    bns = _batch_norms(model)
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
    was_training = model.training
    model.train()
    n = 0
    try:
        for x in batches:
            b = len(x)
            for m in bns:
                m.momentum = b / (n + b)
            model(x)
            n += b
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)


class WeightAveraging:
    """Stochastic weight averaging (Izmailov et al., UAI 2018) as the official SoTeacher code
    runs it (``helper/regularizer.py: SWA``, driven by ``train_teacher.py``).

    At the end of 1-based epoch ``e`` with ``e >= start_epoch`` and
    ``(e - start_epoch) % interval == 0`` the averaged model is updated with the current weights
    (:func:`swa_update`; it starts as a copy of the model at the first such epoch, buffers
    included), so that it holds the mean of the weights of all those epochs, ``start_epoch``
    itself included. The trained model is left alone: training continues from its own weights.

    ``bn_refresh``:

    * ``"every_update"`` (the reference): after every update, the averaged model's batch-norm
      statistics are recomputed with one pass over the training set (:func:`refresh_batch_norm`):
      shuffled, in batches of the training batch size, augmented and preprocessed as in
      training, model in training mode. On the epochs the trainer evaluates, the averaged model
      is evaluated too (``swa_`` + the trainer's metric names, e.g. ``swa_test_acc``: what the
      reference logs as its test accuracy in those epochs);
    * ``"end"``: one such pass only, after the last epoch (the same final model, up to the
      randomness of the pass, for one pass instead of one per update);
    * ``"off"``: no pass; the statistics are those copied at the first update.

    A pass draws its order and augmentations from a generator seeded by (run seed, epoch), not
    from the training's random stream: training runs exactly as without averaging, and a resumed
    run ends with the very same model. A last batch of one sample is left out, as in training
    (batch norm cannot take one sample of 1-d features).

    At the end of training the model takes the averaged model's weights and buffers: the
    teacher that is saved and distilled is the averaged one, as in the reference (which saves
    its ``swa_net`` as the last-epoch teacher). When no epoch was averaged (``start_epoch``
    after the last epoch) the trained weights are kept, as there.
    """

    def __init__(self, start_epoch: int = 150, interval: int = 1,
                 bn_refresh: str = "every_update") -> None:
        for name, v in (("start_epoch", start_epoch), ("interval", interval)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
        if bn_refresh not in BN_REFRESH:
            raise ValueError(f"unknown bn_refresh {bn_refresh!r}; available: "
                             f"{', '.join(BN_REFRESH)}")
        self.start_epoch = start_epoch
        self.interval = interval
        self.bn_refresh = bn_refresh
        self.count = 0                                   # models in the average
        self.state: dict[str, Tensor] | None = None      # the averaged model's state_dict
        self._net: nn.Module | None = None               # the averaged model (rebuilt on resume)

    def averages(self, epoch: int) -> bool:
        """True when the weights at the end of 1-based ``epoch`` go into the average."""
        return epoch >= self.start_epoch and (epoch - self.start_epoch) % self.interval == 0

    def _average_model(self, trainer: Any) -> nn.Module:
        if self._net is None:
            net = copy.deepcopy(trainer.model)
            for p in net.parameters():
                p.grad = None
            net.requires_grad_(False)
            if self.state is not None:                   # resumed: the saved average
                net.load_state_dict(self.state)
            self._net = net
        return self._net

    def _batches(self, trainer: Any, g: torch.Generator) -> Iterator[Tensor]:
        ds, b, device = trainer.train_set, trainer.s.batch_size, trainer.device
        perm = torch.randperm(len(ds), generator=g)
        if len(perm) % b == 1:
            perm = perm[:-1]
        if hasattr(ds, "x") and hasattr(ds, "y"):
            chunks = (ds.x[perm[i:i + b]] for i in range(0, len(perm), b))
        else:
            chunks = (batch[0] for batch in DataLoader(ds, batch_size=b, sampler=perm.tolist(),
                                                       num_workers=trainer.num_workers,
                                                       generator=g))
        for x in chunks:
            x = torch.as_tensor(x).to(device)
            if trainer.augment is not None:
                x = trainer.augment(x)
            if trainer.preprocess is not None:
                x = trainer.preprocess(x)
            if trainer.s.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x

    def _refresh(self, trainer: Any, net: nn.Module, epoch: int) -> None:
        seed = distributed.mix_seed(trainer.seed, epoch, 0x5A)
        device = trainer.device
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            refresh_batch_norm(net, self._batches(trainer, torch.Generator().manual_seed(seed)))

    def on_epoch_end(self, trainer: Any, epoch: int, record: dict[str, Any]) -> None:
        if self.averages(epoch):
            net = self._average_model(trainer)
            swa_update(net, trainer.model, self.count)
            self.count += 1
            if self.bn_refresh == "every_update":
                self._refresh(trainer, net, epoch)
                s = trainer.s
                if trainer.evaluate_fn is not None and (
                        epoch == s.epochs or (s.eval_every and epoch % s.eval_every == 0)):
                    metrics = distributed.run_on_main(trainer.evaluate_fn, net)
                    record.update({f"swa_{k}": v for k, v in metrics.items()})
            self.state = net.state_dict()
        record["swa_models"] = self.count

    def on_fit_end(self, trainer: Any) -> None:
        if self.count == 0:
            return
        net = self._average_model(trainer)
        if self.bn_refresh == "end":
            self._refresh(trainer, net, trainer.s.epochs + 1)
        trainer.model.load_state_dict(net.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "count" not in state:
            raise ValueError("this checkpoint's SWA state was written by an earlier version of "
                             "the swa method (a different average); start the run again "
                             "without --resume")
        self.count, self.state, self._net = int(state["count"]), state["state"], None


class BestOnValidation:
    """Early stopping on a validation split: keep the weights of the epoch that scored best on it.

    A baseline reviewers of SoTeacher (ICLR 2024) asked for; the official code has none, so this
    is checked only against its own definition. After every epoch of the main schedule (whatever
    the trainer's ``eval_every``) the model is evaluated on ``val_set`` in eval mode, without
    augmentation, with the training preprocessing: ``val_acc`` (top-1), ``val_nll`` (mean
    negative log-likelihood), ``val_ece`` (15 bins) and ``best_epoch`` go into the epoch's
    record. ``metric`` picks the score: ``"acc"`` (default; higher is better) or ``"nll"``
    (lower is better); an epoch is the new best only if it is strictly better, so on a tie the
    earlier epoch is kept. Never the test set.

    The whole ``state_dict`` (parameters and buffers such as batch-norm statistics) of the best
    epoch is kept on the CPU and loaded back into the model at the end of training: those are
    the weights saved (``model.pt``) and distilled.

    ``patience``: ``None`` (default) trains every epoch of the schedule, only the choice of
    weights is early; a number ``p`` stops training after the first epoch that is ``p`` epochs
    past the best one (the trainer reads ``stop_training``; the epoch's record has
    ``stopped_early``)."""

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
    """Temperature scaling (Guo et al., ICML 2017) of the trained teacher on a validation split.

    A baseline reviewers of SoTeacher (ICLR 2024) asked for; the official code has none. After
    the last epoch the teacher's logits ``z`` (N, C) on ``val_set`` (eval mode, no augmentation)
    give one temperature ``T``, the minimiser of the mean NLL of the labels under
    ``softmax(z / T)`` (:func:`fit_temperature`: float64 bisection on ``1/T`` over
    ``[1e-3, 1e3]``). It goes into the trainer's model spec, so the saved teacher is rebuilt as
    :class:`~soteacher.teachers.calibration.TemperatureScaled`: its logits are divided by ``T``
    wherever it is used. When distilling, every distiller sees ``z / T`` as the teacher's logits
    (KD at temperature ``tau`` thus uses ``softmax(z / (T * tau))``); the features that feature
    distillers read are unchanged. The weights themselves are the last epoch's.

    When the teacher classifies every validation sample correctly there is nothing to fit (the
    NLL falls all the way to ``T -> 0``): it warns and keeps ``T = 1``."""

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
