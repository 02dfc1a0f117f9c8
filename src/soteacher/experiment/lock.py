"""A run directory's lock: one process trains a run at a time, whichever backend started it.

The lock is the file ``RUN_DIR/.lock``, created atomically (``O_CREAT | O_EXCL``, atomic on local
file systems and on NFSv3+). It names its holder (host, process id, an ``owner`` token) and the
holder touches it every ``HEARTBEAT_S`` seconds. A lock left behind by a holder that died without
releasing it (killed, its machine lost) is *stale* and taken over when

* its holder ran on this host and that process no longer exists, or
* it was not touched for ``STALE_S`` seconds (a holder on another machine), or
* it carries the same ``owner`` token as the new holder: an earlier attempt of the same task,
  which the scheduler starts again only once that attempt has ended (Ray's retry of a task on
  another node, after the node running it was lost).

A lock held by a live process is an error naming the holder: the same run is being trained
elsewhere (the experiment was started twice into one ``--out``).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["HEARTBEAT_S", "RunLock", "RunLockedError", "STALE_S"]

HEARTBEAT_S = 10.0
STALE_S = 120.0


class RunLockedError(RuntimeError):
    """The run is being trained by another live process."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(run_dir / ".lock", owner):`` holds that lock file for the block (see
    module doc); ``path`` is the lock file itself, not the run directory.

    ``owner``: a token shared by every attempt of one task (default: unique to this lock)."""

    def __init__(self, path: str | Path, owner: str | None = None,
                 heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> None:
        self.path = Path(path)
        self.owner = owner or uuid.uuid4().hex
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "owner": self.owner,
                "since": time.time()}

    def _stale(self, holder: dict[str, Any], age: float) -> bool:
        if holder.get("owner") == self.owner:
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not _alive(holder["pid"])
        return age > self.stale_s

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    text = self.path.read_text()
                    age = time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    continue                # released meanwhile: try again
                try:
                    holder = json.loads(text)
                except ValueError:          # a holder that died between create and write
                    holder = {}
                if not (self._stale(holder, age) or (not holder and age > self.heartbeat_s)):
                    raise RunLockedError(
                        f"{self.path.parent} is being trained by process {holder.get('pid')} "
                        f"on {holder.get('host')} (lock {self.path}, touched {age:.0f}s ago); "
                        f"wait for it, or if that process is gone, delete the lock file") from None
                # Take over a stale lock: only one contender wins the rename.
                grave = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
                try:
                    os.rename(self.path, grave)
                except OSError as e:
                    if e.errno != errno.ENOENT:
                        raise
                    continue
                grave.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._holder(), f)
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat",
                                            daemon=True)
            self._thread.start()
            return
        raise RunLockedError(f"could not take the lock {self.path}: other processes keep "
                             f"taking it; is the experiment running twice into this --out?")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if json.loads(self.path.read_text()).get("owner") == self.owner:
                self.path.unlink()
        except (FileNotFoundError, ValueError):
            pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
