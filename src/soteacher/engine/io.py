"""Files that are either fully written or not there at all, and weights-only loading."""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
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
    """``torch.load`` restricted to tensors and plain containers: never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"(possibly code). Only load checkpoints written by soteacher or from a source you "
            f"trust. Details: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or truncated "
                              f"({str(e).splitlines()[0]})") from None


def state_dict_mismatch(expected: dict[str, Any], given: dict[str, Any], limit: int = 4) -> str:
    """A short description of how ``given`` differs from ``expected`` (empty if it fits)."""
    problems = []
    for k in expected:
        if k not in given:
            problems.append(f"{k} is missing from the file")
        elif tuple(given[k].shape) != tuple(expected[k].shape):
            problems.append(f"{k} has shape {tuple(given[k].shape)} in the file but "
                            f"{tuple(expected[k].shape)} in the model")
    problems += [f"{k} in the file is not in the model" for k in given if k not in expected]
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more
