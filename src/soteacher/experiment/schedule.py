"""Putting a grid's runs on a backend: :func:`run_experiment`.

* ``local`` (the default): one run after another in this process, in the grid's order (each
  teacher, then its students). Under torchrun (``torchrun --nproc_per_node N -m soteacher
  experiment ...``) every process walks the grid and each run is trained distributed; the first
  error stops the grid (start it again: it continues where it stopped).
* ``ray``: every run is a Ray task (:mod:`.ray_backend`), as many at once as the cluster has
  room for; students start when their teacher has finished, a failed run is started again
  (``experiment.retries``) and resumes from its checkpoint, and a teacher that fails leaves its
  students unrun, named in the :class:`GridFailed` raised once everything else has finished.

Both execute a run with :func:`~soteacher.experiment.runs.execute_run`, report progress to a
:class:`~soteacher.experiment.progress.GridProgress` (terminal and ``status.json``), and leave the
same files, so the report (:mod:`.report`) does not depend on the backend, and a grid started on
one backend can be continued on the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from ..config import ConfigError, ExperimentConfig, config_to_dict
from ..engine.distributed import launched, run_on_main
from ..engine.io import atomic_write_text
from .grid import Run, plan_grid
from .progress import GridFailed, GridProgress
from .runs import check_runs, execute_run, raw_data, run_state, teacher_run_of

__all__ = ["GridFailed", "finished_runs", "run_experiment"]


def finished_runs(runs: Sequence[Run]) -> set[Path]:
    """The runs found finished: a teacher with its summary; a student with its summary, distilled
    from the finished teacher run its teacher directory holds now."""
    done = set()
    teacher_ids: dict[Path, str | None] = {}
    for run in runs:
        if run.kind == "teacher":
            ok = run_state(run.run_dir, run.config) == "done"
            teacher_ids[run.run_dir] = teacher_run_of(run.run_dir) if ok else None
        else:
            tid = teacher_ids.get(run.teacher_dir)
            ok = (tid is not None and run_state(run.run_dir, run.config) == "done"
                  and teacher_run_of(run.run_dir) == tid)
        if ok:
            done.add(run.run_dir)
    return done


def _start(root: Path, cfg: ExperimentConfig) -> None:
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "experiment.yaml",
                      yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def run_experiment(cfg: ExperimentConfig, out: str | Path, *, progress: bool = False,
                   log: Callable[[str], None] = print) -> dict[str, int]:
    """Run every run of the grid not already finished in ``out`` on ``cfg.experiment.backend``;
    return counts of the runs ``trained`` and ``skipped``. Raises :class:`GridFailed` when runs
    failed (Ray backend; the local backend raises the first run's error). ``progress``: the
    trainer's per-epoch lines (local backend). Reports are made separately (:mod:`.report`)."""
    spec = cfg.experiment
    if spec.backend == "ray":
        from .ray_backend import require_ray
        require_ray()                   # the install command before anything else
        if launched():
            raise ConfigError("--backend ray under torchrun: start the experiment once, "
                              "without torchrun; Ray places each run on the cluster")
        out = Path(out).resolve()       # the tasks may run in other directories, or machines
    out = Path(out)
    root, runs = plan_grid(cfg, out)
    run_on_main(check_runs, runs)       # another config in a run directory: an error now
    raw_data(cfg.data)                  # data errors before any file
    run_on_main(_start, root, cfg)
    done = run_on_main(finished_runs, runs)
    if spec.backend == "ray":
        from .ray_backend import run_on_ray
        tracker = GridProgress(runs, root, out, "ray", log)
        for run in runs:
            if run.run_dir in done:
                tracker.before(run)
        return run_on_ray(cfg, runs, done, tracker)
    tracker = GridProgress(runs, root, out, "local", log)
    for run in runs:
        if run.run_dir in done:
            tracker.before(run)
    return _run_local(runs, done, tracker, progress)


def _run_local(runs: Sequence[Run], done: set[Path], tracker: GridProgress,
               progress: bool) -> dict[str, int]:
    counts = {"trained": 0, "skipped": len(done)}
    teacher: Any = None             # the model of the last teacher trained, for its students
    retrained = False
    try:
        for run in runs:
            if run.kind == "teacher":
                teacher, retrained = None, False
            if run.run_dir in done:
                continue
            tracker.start(run)
            result = execute_run(run, teacher=teacher if run.kind == "student" else None,
                                 retrained=retrained, progress=progress)
            tracker.finish(run, result)
            if run.kind == "teacher":
                teacher, retrained = result["model"], result["state"] != "done"
            if result["state"] == "done":
                counts["skipped"] += 1
            else:
                counts["trained"] += 1
    except KeyboardInterrupt:
        tracker.close("interrupted")
        raise
    except BaseException as e:
        for run in runs:
            if tracker.info[run.run_dir]["state"] == "running":
                tracker.fail(run, e)
        tracker.close("failed")
        raise
    tracker.close("finished")
    return counts
