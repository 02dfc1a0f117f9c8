"""Progress of a running grid: runs finished, running, waiting and failed, and the time left.

Every backend reports to a :class:`GridProgress`, which prints one line per event and keeps
``OUT/<data>/status.json`` up to date (written atomically, so it can be read at any moment)::

    {"state": "running" | "finished" | "failed" | "interrupted", "backend": "ray",
     "counts": {"total", "finished", "before", "running", "waiting", "failed", "unrun"},
     "elapsed_s", "eta_s", "slots", "startup_s", "started", "updated",
     "runs": [{"run", "kind", "label", "state", "attempts", "start_s", "seconds", "host",
               "node", "error"}, ...]}

``finished`` counts the runs trained now and those found finished (``before``); ``unrun`` the
students of a teacher that failed. Per run: ``start_s``, when its last attempt started (seconds
after the grid started, so with Ray the first includes starting Ray, ``startup_s``, and its
worker processes), and ``seconds``, how long that attempt took. The time left (:func:`estimate_left`) is the mean duration of
the runs of each kind (teacher, student) trained so far, times the runs still to do, less what
the running ones have done, divided by the number of runs that execute at once (``slots``).
"""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..engine.distributed import is_main
from ..engine.io import atomic_write_json
from .grid import Run
from .layout import STATUS

__all__ = ["GridFailed", "GridProgress", "describe_error", "estimate_left", "format_duration"]

STATES = ("waiting", "running", "finished", "before", "failed", "unrun")


def estimate_left(waiting: dict[str, int], running: dict[str, Sequence[float]],
                  mean: dict[str, float], slots: int) -> float | None:
    """Seconds left for ``waiting`` runs per kind plus ``running`` ones (their elapsed seconds
    per kind), given the ``mean`` duration per kind and ``slots`` runs at once. A kind without a
    mean borrows the other kinds' mean; ``None`` while no run has finished."""
    if not mean:
        return None
    fallback = sum(mean.values()) / len(mean)
    work = 0.0
    for kind, n in waiting.items():
        work += n * mean.get(kind, fallback)
    for kind, elapsed in running.items():
        m = mean.get(kind, fallback)
        work += sum(max(m - e, 0.0) for e in elapsed)
    return work / max(1, slots)


def format_duration(seconds: float | None) -> str:
    """``0.4s``, ``45s``, ``3m12s``, ``2h05m``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 9.95:
        return f"{max(seconds, 0.0):.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class GridProgress:
    """The state of every run of a grid; one line per event to ``log`` and ``status.json`` in
    ``root``. Under torchrun only rank 0 prints and writes."""

    def __init__(self, runs: Sequence[Run], root: Path, out: Path, backend: str,
                 log: Callable[[str], None] = print, slots: int = 1,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.runs = list(runs)
        self.root, self.out = Path(root), Path(out)
        self.backend, self.log, self.slots, self.clock = backend, log, slots, clock
        self.enabled = is_main()
        self.t0 = clock()
        self.started = _now_iso()
        self.startup_s: float | None = None
        self.info: dict[Path, dict[str, Any]] = {
            r.run_dir: {"run": r.run_dir.relative_to(self.out).as_posix(), "kind": r.kind,
                        "label": r.label, "state": "waiting", "attempts": 0}
            for r in self.runs}
        self._since: dict[Path, float] = {}
        self._durations: dict[str, list[float]] = {}

    # ---- events ----------------------------------------------------------------------------
    def before(self, run: Run) -> None:
        """``run`` was found finished: it is not trained again."""
        self.info[run.run_dir]["state"] = "before"

    def start(self, run: Run, **where: Any) -> None:
        i = self.info[run.run_dir]
        now = self.clock()
        i.update(state="running", attempts=i["attempts"] + 1, start_s=round(now - self.t0, 3),
                 **where)
        self._since[run.run_dir] = now
        again = f" (attempt {i['attempts']})" if i["attempts"] > 1 else ""
        at = f" on {where['host']}" if where.get("host") and self.backend != "local" else ""
        self._event(f"{run.label}: started{again}{at}")

    def finish(self, run: Run, result: dict[str, Any]) -> None:
        i = self.info[run.run_dir]
        self._since.pop(run.run_dir, None)
        if result["state"] == "done":     # finished by someone else meanwhile
            i["state"] = "before"
            self._event(f"{run.label}: already finished")
            return
        i.update(state="finished", seconds=round(result["seconds"], 3), error=None)
        self._durations.setdefault(run.kind, []).append(result["seconds"])
        how = " (resumed from its checkpoint)" if result["state"] == "resume" else ""
        self._event(f"{run.label}: finished in {format_duration(result['seconds'])}{how}")

    def retry(self, run: Run, error: BaseException) -> None:
        """``run`` failed and is started again (it resumes from its checkpoint)."""
        self._since.pop(run.run_dir, None)
        i = self.info[run.run_dir]
        i.update(state="waiting", error=describe_error(error))
        self._event(f"{run.label}: failed ({describe_error(error)}); starting it again")

    def fail(self, run: Run, error: BaseException) -> None:
        self._since.pop(run.run_dir, None)
        self.info[run.run_dir].update(state="failed", error=describe_error(error))
        self._event(f"{run.label}: FAILED: {describe_error(error)}")

    def unrun(self, run: Run, reason: str) -> None:
        """``run`` will not run: ``reason`` (its teacher failed)."""
        self.info[run.run_dir].update(state="unrun", error=reason)
        self._write("running")

    def close(self, state: str) -> None:
        """The grid ended: ``finished``, ``failed`` or ``interrupted``."""
        c = self.counts()
        self._write(state)
        if self.enabled:
            self.log(f"grid {state} after {format_duration(self.clock() - self.t0)}: "
                     f"{c['finished'] - c['before']} runs "
                     f"trained, {c['before']} already done"
                     + (f", {c['failed']} failed, {c['unrun']} left unrun"
                        if c["failed"] or c["unrun"] else ""))

    # ---- state ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        n = {s: 0 for s in STATES}
        for i in self.info.values():
            n[i["state"]] += 1
        return {"total": len(self.info), "finished": n["finished"] + n["before"],
                "before": n["before"], "running": n["running"], "waiting": n["waiting"],
                "failed": n["failed"], "unrun": n["unrun"]}

    def eta(self) -> float | None:
        mean = {k: sum(v) / len(v) for k, v in self._durations.items() if v}
        waiting: dict[str, int] = {}
        running: dict[str, list[float]] = {}
        now = self.clock()
        for path, i in self.info.items():
            if i["state"] == "waiting":
                waiting[i["kind"]] = waiting.get(i["kind"], 0) + 1
            elif i["state"] == "running":
                running.setdefault(i["kind"], []).append(now - self._since[path])
        if not waiting and not running:
            return 0.0
        return estimate_left(waiting, running, mean, self.slots)

    def _head(self, c: dict[str, int]) -> str:
        parts = [f"{c['finished']}/{c['total']} finished", f"{c['running']} running",
                 f"{c['waiting']} waiting", f"{c['failed']} failed"]
        if c["unrun"]:
            parts.append(f"{c['unrun']} unrun")
        eta = self.eta() if c["running"] or c["waiting"] else None
        left = f", about {format_duration(eta)} left" if eta is not None else ""
        return ", ".join(parts) + f"; {format_duration(self.clock() - self.t0)}{left}"

    def _event(self, msg: str) -> None:
        if not self.enabled:
            return
        self.log(f"[{self._head(self.counts())}] {msg}")
        self._write("running")

    def refresh(self) -> None:
        """Rewrite the status file (a fresh time estimate) without an event."""
        self._write("running")

    def _write(self, state: str) -> None:
        if not self.enabled:
            return
        eta = self.eta()
        atomic_write_json(self.root / STATUS, {
            "state": state, "backend": self.backend, "counts": self.counts(),
            "elapsed_s": round(self.clock() - self.t0, 3),
            "eta_s": None if eta is None else round(eta, 1), "slots": self.slots,
            "startup_s": None if self.startup_s is None else round(self.startup_s, 3),
            "started": self.started, "updated": _now_iso(),
            "runs": list(self.info.values())})


class GridFailed(RuntimeError):
    """Runs of the grid failed (after their retries); ``failed``: ``(label, error)`` pairs,
    ``unrun``: labels of the students of failed teachers. The other runs have finished."""

    def __init__(self, failed: list[tuple[str, str]], unrun: list[str],
                 counts: dict[str, int]) -> None:
        self.failed, self.unrun, self.counts = failed, unrun, counts
        lines = [f"{len(failed)} run(s) of the grid failed: "
                 + "; ".join(f"{label} ({error})" for label, error in failed)]
        if unrun:
            lines.append(f"left unrun because their teacher failed: {'; '.join(unrun)}")
        lines.append(f"the other {counts['finished']} runs finished; fix the cause and start the "
                     f"same command again (finished runs are kept, interrupted ones resume)")
        super().__init__(". ".join(lines))


def describe_error(error: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
