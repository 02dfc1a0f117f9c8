"""The grid on a Ray cluster: every run is a Ray task (``soteacher experiment --backend ray``).

Ray is an optional dependency: ``pip install 'soteacher[ray]'``.

* Where: without ``experiment.address`` (``--address``), a local Ray instance sized to the
  machine (all its CPUs and GPUs); with one, the existing cluster at that address (``ray start
  --head`` on one machine, ``ray start --address HEAD:6379`` on the others). If this process
  already called ``ray.init``, that connection is used. Every node needs the same Python
  environment (soteacher and its dependencies) and must see ``--out`` at the same path (shared
  storage); relative paths in the config are read from the directory the command started in.
* What a run asks for: ``experiment.resources`` (``{cpus: 1, gpus: 0}`` by default; e.g.
  ``gpus: 0.25`` puts four runs on a GPU). Ray shows a run only its GPUs, so ``device: cuda`` is
  the run's own GPU. The run's torch threads: ``threads`` of the config if set, else its CPUs.
* Order: a teacher's students are submitted when the teacher has finished, and load it from its
  directory.
* Failures: a run that fails (an error in the run, its worker or its node lost) is started again
  up to ``experiment.retries`` times and resumes from its checkpoint; errors that would only
  recur (a config error, a non-finite loss, an unreadable checkpoint, a run locked by another
  live process) are not retried. A teacher that fails for good leaves its students unrun; the
  other runs go on, and at the end :class:`~.progress.GridFailed` names what failed and what was
  left unrun.
* No run executes twice at once: the driver submits a run's next attempt only after the last
  one ended, and each attempt holds the run directory's lock (:mod:`.lock`), shared by the
  attempts of one task and refused to anybody else.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from typing import Any, Iterator, Sequence

from ..config import ConfigError, ExperimentConfig
from ..engine.io import CheckpointError
from ..engine.trainer import NonFiniteLossError
from .grid import Run, run_resources
from .lock import RunLockedError
from .progress import GridFailed, GridProgress, describe_error, format_duration

__all__ = ["INSTALL", "NOT_RETRIED", "require_ray", "run_on_ray", "slots"]

INSTALL = "pip install 'soteacher[ray]'"

#: Errors that a second attempt would only meet again.
NOT_RETRIED = (ConfigError, RunLockedError, NonFiniteLossError, CheckpointError)

#: How often the status file gets a fresh time estimate while no run starts or ends (seconds).
REFRESH_S = 30.0


def require_ray(instead: str = "run the grid with --backend local") -> Any:
    """The ``ray`` module, or an ``ImportError`` with the install command (and ``instead``, what
    to do without Ray)."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"--backend ray needs Ray: {INSTALL} (or {instead})") from None
    return ray


def slots(cluster: dict[str, float], per_run: dict[str, float], runs: int) -> int:
    """How many runs asking for ``per_run`` ({cpus, gpus}) fit into the ``cluster``'s totals
    (``ray.cluster_resources()``) at once, at most ``runs``."""
    n = runs
    for key, ray_key in (("cpus", "CPU"), ("gpus", "GPU")):
        if per_run[key] > 0:
            n = min(n, math.floor(cluster.get(ray_key, 0.0) / per_run[key] + 1e-9))
    return n


def _task(run: Run, retrained: bool, owner: str, threads: int, cwd: str) -> Iterator[dict]:
    """One attempt of one run, in a Ray worker: says where it started, then what it did."""
    import ray
    from ..engine.threads import set_threads
    from .runs import execute_run
    if os.path.isdir(cwd):
        os.chdir(cwd)               # relative paths of the config as on the driver
    set_threads(threads)
    yield {"event": "started", "host": socket.gethostname(), "pid": os.getpid(),
           "node": ray.get_runtime_context().get_node_id()[:12]}
    result = execute_run(run, retrained=retrained, owner=owner, progress=False)
    result.pop("model", None)
    yield {"event": "done", **result}


def _init(ray: Any, address: str | None) -> bool:
    """Connect to Ray; returns whether this call started it (and so must stop it)."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level="warning")
    else:
        ray.init(address="local", include_dashboard=False, logging_level="warning")
    return True


def _cause(error: BaseException) -> BaseException:
    """The run's own exception inside a Ray task error."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def run_on_ray(cfg: ExperimentConfig, runs: Sequence[Run], done: set,
               tracker: GridProgress) -> dict[str, int]:
    """Execute ``runs`` (those in ``done`` excepted) as Ray tasks; counts as
    :func:`~.schedule.run_experiment`."""
    ray = require_ray()
    spec = cfg.experiment
    per_run = run_resources(spec, cfg.device)
    threads = cfg.threads or max(1, int(per_run["cpus"]))
    t0 = time.perf_counter()
    started = _init(ray, spec.address)
    try:
        tracker.startup_s = time.perf_counter() - t0
        cluster = ray.cluster_resources()
        tracker.slots = slots(cluster, per_run, len(runs))
        if tracker.slots < 1:
            raise ConfigError(
                f"one run asks for {per_run['cpus']:g} CPUs and {per_run['gpus']:g} GPUs "
                f"(experiment.resources) but the Ray cluster has {cluster.get('CPU', 0):g} CPUs "
                f"and {cluster.get('GPU', 0):g} GPUs in all; ask for less or add nodes")
        if tracker.enabled:
            how = "started a local instance" if started and not spec.address else "connected"
            tracker.log(f"Ray: {how} with {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} "
                        f"GPUs in {format_duration(tracker.startup_s)}; up to {tracker.slots} "
                        f"runs at once")
        remote = ray.remote(_task).options(num_cpus=per_run["cpus"], num_gpus=per_run["gpus"],
                                           max_retries=0)
        return _drive(ray, remote, runs, done, tracker, spec.retries, threads)
    finally:
        if started:
            ray.shutdown()


def _drive(ray: Any, remote: Any, runs: Sequence[Run], done: set, tracker: GridProgress,
           retries: int, threads: int) -> dict[str, int]:
    students: dict[Any, list[Run]] = {}
    for run in runs:
        if run.kind == "student":
            students.setdefault(run.teacher_dir, []).append(run)
    owner = {run.run_dir: uuid.uuid4().hex for run in runs}
    retrained: dict[Any, bool] = {}
    attempts: dict[Any, int] = {}
    pending: dict[Any, Run] = {}
    counts = {"trained": 0, "skipped": len(done)}
    failed: list[tuple[str, str]] = []
    unrun: list[str] = []
    cwd = os.getcwd()

    def submit(run: Run) -> None:
        attempts[run.run_dir] = attempts.get(run.run_dir, 0) + 1
        gen = remote.remote(run, retrained.get(run.teacher_dir, False), owner[run.run_dir],
                            threads, cwd)
        pending[gen] = run

    for run in runs:
        if run.run_dir in done:
            continue
        if run.kind == "teacher" or run.teacher_dir in done:
            submit(run)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=REFRESH_S)
            if not ready:
                tracker.refresh()
                continue
            for gen in ready:
                run = pending[gen]
                try:
                    msg = ray.get(next(gen))
                except StopIteration:
                    del pending[gen]
                    continue
                except Exception as e:          # the attempt failed: the task or its worker
                    del pending[gen]
                    error = _cause(e)
                    if attempts[run.run_dir] <= retries and not isinstance(error, NOT_RETRIED):
                        tracker.retry(run, error)
                        submit(run)
                        continue
                    tracker.fail(run, error)
                    failed.append((run.label, f"{describe_error(error)}; after "
                                              f"{attempts[run.run_dir]} attempt(s)"))
                    for s in students.get(run.run_dir, []):    # a teacher's, not yet run
                        tracker.unrun(s, f"its teacher failed: {run.label}")
                        unrun.append(s.label)
                    continue
                if msg["event"] == "started":
                    tracker.start(run, host=msg["host"], node=msg["node"])
                    continue
                del pending[gen]                # "done": the generator has nothing more
                tracker.finish(run, msg)
                counts["skipped" if msg["state"] == "done" else "trained"] += 1
                if run.kind == "teacher":
                    retrained[run.run_dir] = msg["state"] != "done"
                    for s in students.get(run.run_dir, []):
                        if s.run_dir not in done:
                            submit(s)
    except BaseException:
        for gen in pending:
            try:
                ray.cancel(gen)             # the task stops; its lock is released
            except Exception:
                pass
        tracker.close("interrupted")
        raise
    if failed:
        tracker.close("failed")
        raise GridFailed(failed, unrun, tracker.counts())
    tracker.close("finished")
    return counts
