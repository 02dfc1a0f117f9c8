"""One run of the grid: decide from its directory what to do, train it, write its summary.

Every backend executes a run with :func:`execute_run`, so a run's files are the same whichever
backend trained it, and a grid started on one backend can be continued on another. What a run
directory holds decides what happens:

* ``summary.json`` (of the same config, and for a student of the same teacher run): finished,
  skipped;
* ``checkpoint.pt`` (same config; a student's ``teacher.json`` naming the same teacher run):
  resumed from the checkpoint, to the weights an uninterrupted run reaches;
* otherwise: trained from the start (the directory emptied first).

The ``oracle`` teacher (p*(y|x) of data with known truth) trains nothing: its run writes its
``config.yaml``, reports and ``summary.json`` at once, and its students rebuild it from the data.

A ``config.yaml`` that differs from the one the grid asks for is an error (delete the directory
or choose another ``--out``), never silently reused. A student distilled, or begun, from an
earlier instance of its teacher (the teacher was trained again since) starts over.

The whole decision and the training happen under the run's lock (:mod:`.lock`). Under torchrun
every process executes the run; rank 0 alone reads the directory, holds the lock and writes the
files, and its decisions are broadcast (:func:`~soteacher.engine.distributed.run_on_main`).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from ..config import (Config, ConfigError, DataSpec, config_to_dict, first_difference,
                      parse_yaml)
from ..engine.distributed import is_main, run_on_main
from ..engine.io import atomic_torch_save, atomic_write_json
from ..engine.trainer import CHECKPOINT
from .grid import ORACLE, Run
from .datasets import raw_data
from .layout import LOCK, ORIGIN, PREDICTIONS, SUMMARY
from .lock import RunLock

__all__ = ["check_runs", "execute_run", "grid_data", "raw_data", "run_state", "teacher_report",
           "teacher_run_of"]


# ---- what a directory holds --------------------------------------------------------------------
def _normalised(cfg: Config) -> Any:
    return parse_yaml(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))




def run_state(run_dir: Path, cfg: Config) -> str:
    """``"done"``, ``"resume"`` (checkpoint of the same config), or ``"new"``."""
    stored = run_dir / "config.yaml"
    if not stored.is_file():
        return "new"
    have = parse_yaml(stored.read_text())
    want = _normalised(cfg)
    if have != want:
        raise ConfigError(f"{run_dir} holds a run with a different config "
                          f"({first_difference(have, want, ('here', 'asked for'))}); delete that directory or choose "
                          f"another --out")
    if (run_dir / SUMMARY).is_file():
        return "done"
    return "resume" if (run_dir / CHECKPOINT).is_file() else "new"


def check_runs(runs: Sequence[Run]) -> None:
    """A run directory holding a run of another config is an error before any work."""
    for run in runs:
        run_state(run.run_dir, run.config)


def teacher_run_of(run_dir: Path) -> str | None:
    """The run id in a finished run's summary (a teacher's own, a student's teacher's)."""
    path = run_dir / SUMMARY
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("teacher_run")


def _origin(student_dir: Path) -> str | None:
    """The teacher run an unfinished student was begun from (``None``: not recorded)."""
    path = student_dir / ORIGIN
    return json.loads(path.read_text()).get("teacher_run") if path.is_file() else None


def _student_state(run_dir: Path, cfg: Config, teacher_run: str, retrained: bool) -> str:
    state = run_state(run_dir, cfg)
    if state == "done":
        of = teacher_run_of(run_dir)
    elif state == "resume":
        of = _origin(run_dir)
        if of is None and not retrained:
            of = teacher_run        # begun before teacher.json existed, teacher unchanged since
    else:
        return state
    return state if of == teacher_run else "new"


def _fresh(run_dir: Path) -> None:
    """Empty ``run_dir`` for a run from the start (its lock stays)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for p in run_dir.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# ---- data --------------------------------------------------------------------------------------
def grid_data(cfg: Config) -> Any:
    """The data of one run: its data set with the validation split of its seed."""
    from ..pipeline import split_validation
    return split_validation(raw_data(cfg.data), cfg.data.val_fraction, cfg.seed)


# ---- reports of single runs --------------------------------------------------------------------
def teacher_report(model: torch.nn.Module, data: Any, device: Any,
                   predictions: dict | None = None) -> tuple[dict, dict]:
    """Metrics of a teacher on train, test (and validation) inputs, and its reliability-diagram
    bins on train and test inputs. One prediction pass per split.

    Besides accuracy, NLL and ECE (and the distances to p* where the data knows it), each split
    has ``conf``: the mean top-class probability (the gap between train and held-out confidence
    is a proxy of the distance to p* that needs no p*). When ``predictions`` is a dict, it
    receives the test inputs' probabilities (float16, (N, C)): the agreement between teachers of
    different seeds is computed from them, no labels used."""
    from ..engine.evaluate import predict, resolve_device
    from ..metrics import classification_metrics, reliability, truth_metrics
    device = resolve_device(device)
    metrics: dict[str, float] = {}
    bins: dict[str, Any] = {}
    splits = [("train", data.train), ("test", data.test)]
    if getattr(data, "val", None) is not None:
        splits.append(("val", data.val))
    for split, ds in splits:
        pred = predict(model, ds, device, truth=data.truth, preprocess=data.preprocess)
        m = classification_metrics(pred["logits"], pred["y"])
        if data.truth is not None:
            m.update(truth_metrics(pred["logits"], pred["log_p_true"]))
        probs = pred["logits"].float().softmax(dim=1)
        m["conf"] = float(probs.max(dim=1).values.mean())
        metrics.update({f"{split}_{k}": v for k, v in m.items()})
        if split == "test" and predictions is not None:
            predictions["test"] = probs.half()
        if split != "val":
            bins[split] = reliability(pred["logits"], pred["y"])
    t = getattr(model, "temperature", None)
    if isinstance(t, torch.Tensor):
        metrics["temperature"] = float(t)
    return metrics, bins


def _finish_teacher(run: Run, teacher: torch.nn.Module, data: Any, device: Any) -> str:
    """Evaluate a trained teacher, write its summary; return its new run id."""
    predictions: dict = {}
    metrics, bins = teacher_report(teacher, data, device, predictions)
    run_id = uuid.uuid4().hex
    atomic_write_json(run.run_dir / "reliability.json", bins)
    atomic_torch_save(predictions, run.run_dir / PREDICTIONS)
    atomic_write_json(run.run_dir / SUMMARY,
                      {**run.meta, "teacher_run": run_id, "metrics": metrics})
    return run_id


def _finish_student(run: Run, student: torch.nn.Module, teacher: torch.nn.Module, data: Any,
                    device: Any, teacher_run: str) -> None:
    from ..pipeline import model_report
    metrics = model_report(student, data, device, teacher)
    atomic_write_json(run.run_dir / SUMMARY,
                      {**run.meta, "teacher_run": teacher_run, "metrics": metrics})


def _finished_teacher(teacher_dir: Path) -> str:
    run_id = teacher_run_of(teacher_dir)
    if run_id is None:
        raise RuntimeError(f"the teacher run {teacher_dir} has not finished; a student starts "
                           f"only after its teacher")
    return run_id


# ---- one run -----------------------------------------------------------------------------------
def execute_run(run: Run, *, data: Any = None, teacher: torch.nn.Module | None = None,
                retrained: bool = False, owner: str | None = None,
                progress: bool = False) -> dict[str, Any]:
    """Train ``run`` unless it is finished; return what happened::

        {"state": "done" | "new" | "resume",   # skipped, trained from the start, resumed
         "teacher_run": id,                    # the teacher run (a teacher's own id)
         "seconds": s, "model": the trained or loaded model (None when skipped)}

    ``data``: the run's data (default: :func:`grid_data`). For a student, ``teacher``: its
    teacher's model if the caller holds it (else loaded from ``run.teacher_dir``), and
    ``retrained``: whether that teacher was trained in this grid's start (see
    :func:`_student_state`). ``owner``: the lock token of the task (shared by its attempts)."""
    from ..engine.evaluate import resolve_device
    lock = RunLock(run.run_dir / LOCK, owner)
    run_on_main(lock.acquire)           # under torchrun rank 0 holds it; its error is everyone's
    try:
        t0 = time.perf_counter()
        device = resolve_device(run.config.device)
        data = grid_data(run.config) if data is None else data
        result = (_teacher(run, data, device, progress) if run.kind == "teacher" else
                  _student(run, data, device, teacher, retrained, progress))
        result["seconds"] = time.perf_counter() - t0
        return result
    finally:
        if is_main():
            lock.release()


def _oracle(data: Any, device: Any) -> torch.nn.Module:
    from ..data import oracle_teacher
    if data.truth is None:
        raise ConfigError("the oracle teacher needs data whose p* is known, e.g. "
                          "data.name=known_truth")
    return oracle_teacher(data.truth).to(device)


def _teacher(run: Run, data: Any, device: Any, progress: bool) -> dict[str, Any]:
    from ..pipeline import run_teacher, save_config
    state = run_on_main(run_state, run.run_dir, run.config)
    if state == "done":
        return {"state": state, "teacher_run": run_on_main(teacher_run_of, run.run_dir),
                "model": None}
    if state == "new":
        run_on_main(_fresh, run.run_dir)
    if run.config.teacher.method == ORACLE:     # nothing to train: p* is the teacher
        model = _oracle(data, device)
        run_on_main(save_config, run.config, run.run_dir)
    else:
        model = run_teacher(run.config, data, run.run_dir, resume=state == "resume",
                            progress=progress)
    run_id = run_on_main(_finish_teacher, run, model, data, device)
    return {"state": state, "teacher_run": run_id, "model": model}


def _student(run: Run, data: Any, device: Any, teacher: torch.nn.Module | None,
             retrained: bool, progress: bool) -> dict[str, Any]:
    from ..pipeline import load_model, run_student
    teacher_run = run_on_main(_finished_teacher, run.teacher_dir)
    state = run_on_main(_student_state, run.run_dir, run.config, teacher_run, retrained)
    if state == "done":
        return {"state": state, "teacher_run": teacher_run, "model": None}
    if state == "new":
        run_on_main(_fresh, run.run_dir)
        run_on_main(atomic_write_json, run.run_dir / ORIGIN,
                    {"teacher_dir": run.meta["teacher_dir"], "teacher_run": teacher_run})
    if teacher is None:
        teacher = (_oracle(data, device) if run.config.teacher.method == ORACLE
                   else load_model(run.teacher_dir).to(device))
    model = run_student(run.config, data, teacher, run.run_dir, resume=state == "resume",
                        progress=progress, name=f"student[{run.meta['distiller']}]")
    run_on_main(_finish_student, run, model, teacher, data, device, teacher_run)
    return {"state": state, "teacher_run": teacher_run, "model": model}
