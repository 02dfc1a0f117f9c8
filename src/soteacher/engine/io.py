"""Files that are either fully written or not there at all, and weights-only loading."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


class CheckpointError(RuntimeError):
    """A checkpoint that cannot or must not be loaded."""


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain containers: never runs code from the file.

    Every way a file can be damaged (empty, cut short at any byte, overwritten with other bytes)
    raises :class:`CheckpointError` saying that the file is corrupt or truncated; a file that
    holds objects other than tensors and plain containers is refused as such; a file that cannot
    be opened raises :class:`CheckpointError` with the operating system's reason.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if empty:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or truncated "
                              f"(it is empty, 0 bytes); use an intact copy")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            raise CheckpointError(
                f"refusing to load {path}: it holds objects other than tensors and plain "
                f"containers (possibly code). Only load checkpoints written by soteacher or from "
                f"a source you trust. Details: {_detail(e)}") from None
        raise _corrupt(path, e) from None
    except OSError as e:
        if e.errno not in (None, errno.EINVAL):
            raise               # a real I/O error (a failing disk), not a damaged file
        raise _corrupt(path, e) from None
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError, TypeError, AttributeError,
            zipfile.BadZipFile, struct.error, UnicodeDecodeError) as e:
        # torch's zip and pickle readers fail in all of these ways on a file cut short
        raise _corrupt(path, e) from None


def _detail(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    pick = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
    return pick.strip() or type(e).__name__


def _corrupt(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or truncated "
                           f"({type(e).__name__}: {_detail(e)}); use an intact copy")


def ensure_writable_dir(path: str | os.PathLike, what: str = "output directory",
                        fix: str = "choose another one") -> Path:
    """Create folder ``path`` if needed and check that files can be written in it; raise
    ``ValueError`` naming the folder, the operating system's reason and ``fix`` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} exists and is not a directory; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write to {what} {str(path)!r}: {e.strerror or e}; "
                         f"{fix}") from None
    return path


def state_dict_mismatch(expected: dict[str, Any], given: dict[str, Any], limit: int = 4) -> str:
    """A short description of how ``given`` differs from ``expected`` (empty if it fits): the
    first ``limit`` differences, then how many more there are."""
    problems = []
    for k in expected:
        if k not in given:
            problems.append(f"{k} is missing from the file")
        elif tuple(given[k].shape) != tuple(expected[k].shape):
            problems.append(f"{k} has shape {tuple(given[k].shape)} in the file but "
                            f"{tuple(expected[k].shape)} in the model")
    problems += [f"{k} in the file is not in the model" for k in given if k not in expected]
    more = (f"; and {len(problems) - limit} more ({len(problems)} differences in all)"
            if len(problems) > limit else "")
    return "; ".join(problems[:limit]) + more
