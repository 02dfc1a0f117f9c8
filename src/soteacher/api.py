"""The Python API: train a teacher, distil a student, evaluate, each in one documented call."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .data import IndexedDataset
from .distillers import build_distiller
from .engine.evaluate import evaluate, resolve_device
from .engine.optim import TrainSettings
from .engine.threads import set_threads
from .engine.trainer import InputShapeError, Trainer, input_mismatch_message
from .teachers import build_teacher_objective

__all__ = ["TrainResult", "train_teacher", "distill", "evaluate", "as_indexed",
           "train_settings"]


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]]      # one record per epoch, as in metrics.jsonl (with "stage")
    run_dir: Path | None

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def as_indexed(dataset: Dataset) -> Dataset:
    """``dataset`` if its items are ``(x, y, index)``; wrapped in ``IndexedDataset`` if ``(x, y)``."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    item = dataset[0]
    if isinstance(item, (tuple, list)) and len(item) == 3:
        return dataset
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return IndexedDataset(dataset)
    raise ValueError(f"dataset items must be (input, label) or (input, label, index) tuples; "
                     f"got {type(item).__name__}"
                     + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))


def train_settings(**kwargs: Any) -> TrainSettings:
    """``TrainSettings`` from keyword arguments, with a clear error for an unknown one."""
    valid = [f.name for f in dataclasses.fields(TrainSettings)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"unknown training setting(s) {', '.join(map(repr, unknown))}; "
                        f"valid: {', '.join(valid)}")
    return TrainSettings(**kwargs)


def _infer_num_classes(model: nn.Module, dataset: Dataset, who: str = "the model",
                       preprocess: nn.Module | None = None) -> int:
    """The number of classes ``model`` predicts for the first sample of ``dataset``; an
    ``InputShapeError`` saying what the model expects when it cannot read the sample."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.as_tensor(dataset[0][0])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if preprocess is not None:
                x = preprocess.to(device)(x)
            out = model(x)
    except RuntimeError as e:
        raise InputShapeError(input_mismatch_message(who, model, x, e)) from e
    finally:
        model.train(was_training)
    return int(out.shape[-1])


def _use_threads(threads: int | None) -> None:
    if threads is not None:
        set_threads(threads)


def _make_eval(test_set: Dataset | None, truth: Any, device: torch.device,
               preprocess: nn.Module | None):
    if test_set is None:
        return None
    test_set = as_indexed(test_set)
    return lambda model: evaluate(model, test_set, truth=truth, device=device, prefix="test_",
                                  preprocess=preprocess)


def train_teacher(model: nn.Module, train_set: Dataset, *, method: str = "soteacher",
                  method_options: dict[str, Any] | None = None,
                  augment: nn.Module | None = None, preprocess: nn.Module | None = None,
                  test_set: Dataset | None = None,
                  truth: Any = None, device: str | torch.device | None = None, seed: int = 0,
                  run_dir: str | Path | None = None, resume: bool = False,
                  progress: bool = True, num_classes: int | None = None,
                  threads: int | None = None, tensorboard: bool = False,
                  **train: Any) -> TrainResult:
    """Train ``model`` as a teacher with a teacher-training ``method`` ("standard", "soteacher", ...).

    ``train_set`` yields ``(x, y)`` or ``(x, y, index)``; the consistency bank of SoTeacher is
    addressed by the index, so pairs are wrapped to add it. ``augment`` (training only) and then
    ``preprocess`` (training and evaluation) are applied to each batch on the device. ``method_options`` go to the method (e.g. ``lipschitz_weight``,
    ``consistency_weight``, ``consistency_schedule``); ``**train`` are ``TrainSettings`` fields
    (``epochs``, ``batch_size``, ``lr``, ``schedule``, ``milestones``, ...). With ``test_set`` the
    test metrics are logged every epoch; with ``truth`` (known p*) also the distance to it.

    The defaults of ``**train`` are the paper's 240-epoch CIFAR-100 schedule (lr x0.1 after
    epochs 150, 180, 210): for a short run pass ``epochs`` *and* ``milestones`` (or
    ``schedule="cosine"``); milestones beyond the run are warned about, as the rate would
    never decay. ``threads`` sets torch's CPU threads for the process (``torch.set_num_threads``;
    None leaves them as they are). ``tensorboard=True`` also writes every epoch's metrics as
    TensorBoard scalars to ``run_dir/tensorboard`` (needs ``pip install
    'soteacher[tensorboard]'``). A ``run_dir`` that cannot be written is a ``ValueError``; a
    model that cannot read the data's inputs an ``InputShapeError`` (a ``ValueError``) saying
    what it expects and what the data gives.
    """
    settings = train_settings(**train)
    _use_threads(threads)
    train_set = as_indexed(train_set)
    dev = resolve_device(device)
    model = model.to(dev)
    num_classes = num_classes or _infer_num_classes(model, train_set, preprocess=preprocess)
    objective = build_teacher_objective(method, method_options, num_samples=len(train_set),
                                        num_classes=num_classes, num_epochs=settings.epochs)
    trainer = Trainer(model, objective, train_set, settings, augment=augment, device=dev,
                      seed=seed, run_dir=run_dir, resume=resume, name=f"teacher[{method}]",
                      evaluate=_make_eval(test_set, truth, dev, preprocess), progress=progress,
                      num_classes=num_classes, preprocess=preprocess, tensorboard=tensorboard)
    return TrainResult(model, trainer.fit(), trainer.run_dir)


def distill(student: nn.Module, teacher: nn.Module, train_set: Dataset, *, method: str = "kd",
            options: dict[str, Any] | None = None, augment: nn.Module | None = None,
            preprocess: nn.Module | None = None, test_set: Dataset | None = None,
            truth: Any = None,
            device: str | torch.device | None = None, seed: int = 0,
            run_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
            threads: int | None = None, tensorboard: bool = False,
            **train: Any) -> TrainResult:
    """Distil ``teacher`` into ``student`` with distillation algorithm ``method`` ("kd", ...).

    The teacher is frozen and kept in eval mode. ``options`` go to the distiller (each one's
    class docstring lists them; for KD: ``temperature``, ``ce_weight``, ``kl_weight``); feature
    methods on your own models take ``teacher_layers`` / ``student_layers`` (module names).
    ``**train`` are ``TrainSettings`` fields.

    ``ab``, ``fsp`` and ``ft`` first run their preliminary stage as RepDistiller does:
    ``init_epochs`` (option, default 30; 0 skips it) extra epochs before the ``epochs`` of the
    main schedule, with their own optimiser and constant learning rate (option ``init_lr``);
    ``history`` then starts with those epochs, each record marked ``"stage": "init"``. For
    short runs lower ``init_epochs``, or pass ``init_stage="in_run"`` to use the first epochs
    of the run itself.

    ``threads``, ``tensorboard``, the defaults of ``**train`` and the errors are as in
    :func:`train_teacher`.
    """
    settings = train_settings(**train)
    _use_threads(threads)
    train_set = as_indexed(train_set)
    dev = resolve_device(device)
    student, teacher = student.to(dev), teacher.to(dev)
    num_classes = _infer_num_classes(student, train_set, "the student", preprocess)
    t_classes = _infer_num_classes(teacher, train_set, "the teacher", preprocess)
    if t_classes != num_classes:
        raise ValueError(f"the teacher predicts {t_classes} classes but the student "
                         f"{num_classes}; they must match")
    objective = build_distiller(method, teacher, options, student=student,
                                num_samples=len(train_set), num_classes=num_classes,
                                input_shape=tuple(torch.as_tensor(train_set[0][0]).shape),
                                train_set=train_set)
    trainer = Trainer(student, objective, train_set, settings, augment=augment, device=dev,
                      seed=seed, run_dir=run_dir, resume=resume, name=f"student[{method}]",
                      evaluate=_make_eval(test_set, truth, dev, preprocess), progress=progress,
                      num_classes=num_classes, preprocess=preprocess, tensorboard=tensorboard)
    return TrainResult(student, trainer.fit(), trainer.run_dir)
