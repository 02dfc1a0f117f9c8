"""CIFAR-10 and CIFAR-100 from the official python-version archives, without torchvision.

``root`` may hold the extracted folder (``cifar-10-batches-py/`` with ``data_batch_1`` ...
``data_batch_5`` and ``test_batch``; ``cifar-100-python/`` with ``train`` and ``test``), or only the
archive (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``), read without extracting it;
``root`` may also be the extracted folder itself. Get them with
``soteacher data download cifar100 --root DIR`` (or :func:`soteacher.data.download.download`, or
the builder option ``download=True``).

The batches are Python pickles. They are read by :func:`restricted_loads`, an unpickler that
resolves no global except numpy's array reconstruction (and ``_codecs.encode``, which Python 3
uses to pickle bytes at protocol 2): a crafted file cannot run code, it raises
:class:`UnsafePickleError`. The result is then checked to be a CIFAR batch (uint8 ``data`` of
shape (N, 3072), N integer labels in range).

Images stay uint8 (N, 3, 32, 32) in memory (150 MB for the 50,000 training images); the bundle's
``augment`` (random crop with 4-pixel zero padding and horizontal flip) works on uint8 batches,
and its ``preprocess`` converts to float and normalises with the dataset's channel mean and std.
"""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .augment import Normalize, RandomCropPad, RandomFlip
from .base import DATASETS, ArrayDataset, DataBundle
from .download import ARCHIVES, ArchiveSpec, DatasetError, download

__all__ = ["CIFAR_STATS", "ImageArrayDataset", "UnsafePickleError", "cifar10", "cifar100",
           "load_cifar", "restricted_loads"]

#: Channel mean and std on the [0, 1] scale (CIFAR-100's as in RepDistiller).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
_FILES = {"cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
          "cifar100": (["train"], ["test"])}
_LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}


class ImageArrayDataset(ArrayDataset):
    """In-memory uint8 images; item ``i`` is ``(x[i], y[i], i)``.

    ``x`` is uint8 (N, C, H, W) and ``y`` int64 (N,), both public like ``ArrayDataset``'s so the
    trainer can slice them directly; unlike ``ArrayDataset`` the pixels are not converted to float
    (the bundle's ``preprocess`` does that on the device, batch by batch).
    """

    def __init__(self, x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> None:
        x = torch.as_tensor(x)
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W); got {x.dtype} "
                             f"{tuple(x.shape)}")
        super().__init__(x, y, dtype=None)

    def __repr__(self) -> str:
        return f"ImageArrayDataset(n={len(self)}, image_shape={tuple(self.x.shape[1:])})"


# ---- restricted unpickling -------------------------------------------------------------------
class UnsafePickleError(DatasetError):
    """A pickle asked for a global that is not on the allow-list."""


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    import importlib
    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name} in any of {modules}")


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` restricted to plain ndarrays."""
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"refusing to reconstruct an array of type {subtype!r}")
    real = _numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
    return real(np.ndarray, shape, dtype)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """numpy's ``_frombuffer`` (protocol-5 arrays) for non-object dtypes."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise UnsafePickleError("refusing an object array")
    real = _numpy_attr(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")
    return real(buf, dtype, shape, order)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to pickle bytes at protocols < 3 (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("refusing _codecs.encode other than str -> latin-1 bytes")
    return codecs.encode(text, "latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _codecs_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to load the global {module}.{name}: only numpy "
                                    f"arrays, dicts, lists, strings, bytes and numbers are "
                                    f"allowed in a dataset pickle") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a persistent id in a dataset pickle")


def restricted_loads(data: bytes, source: str = "pickle") -> Any:
    """Unpickle ``data`` (Python 2 strings as ``bytes``) allowing only plain containers, strings,
    numbers and numpy arrays; anything else raises :class:`UnsafePickleError` before it runs.
    A malformed or truncated pickle raises :class:`DatasetError` naming ``source``."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{source}: {e}") from None
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a malformed pickle
        raise DatasetError(f"{source} is corrupt or truncated: not a readable pickle "
                           f"({type(e).__name__}: {e})") from None


# ---- parsing the batches ---------------------------------------------------------------------
def _get(d: dict, key: str) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise KeyError(key)


def _parse_batch(raw: bytes, name: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    d = restricted_loads(raw, source)
    if not isinstance(d, dict):
        raise DatasetError(f"{source}: not a CIFAR batch (a {type(d).__name__}, not a dict)")
    try:
        data, labels = _get(d, "data"), _get(d, _LABEL_KEY[name])
    except KeyError as e:
        raise DatasetError(f"{source}: not a {ARCHIVES[name].title} batch (no {e} entry)") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        what = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise DatasetError(f"{source}: 'data' must be uint8 (N, 3072), got {what}")
    try:
        y = np.asarray(labels)
    except Exception:  # noqa: BLE001
        y = np.asarray([], dtype=object)
    if y.shape != (len(data),) or y.dtype.kind not in "iu":
        raise DatasetError(f"{source}: expected {len(data)} integer labels")
    k = _NUM_CLASSES[name]
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise DatasetError(f"{source}: labels outside 0..{k - 1}")
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _locate(spec: ArchiveSpec, root: Path, files: list[str]) -> tuple[str, Path] | None:
    """("folder", path) or ("archive", path) of the data, or None."""
    for folder in (root / spec.folder, root):
        if all((folder / f).is_file() for f in files):
            return "folder", folder
    if (root / spec.filename).is_file():
        return "archive", root / spec.filename
    if (root / spec.folder).is_dir():
        missing = [f for f in files if not (root / spec.folder / f).is_file()]
        raise DatasetError(f"{spec.title} folder {root / spec.folder} is incomplete: missing "
                           f"{', '.join(missing)}; delete it and fetch the data again")
    return None


def _read_archive(archive: Path, folder: str, files: list[str]) -> dict[str, bytes]:
    wanted = {f"{folder}/{f}": f for f in files}
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name in wanted and member.isfile():
                    fh = tar.extractfile(member)
                    assert fh is not None
                    out[wanted[name]] = fh.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        raise DatasetError(f"{archive} is corrupt or truncated ({type(e).__name__}: {e}); "
                           f"delete it and download it again") from None
    missing = [f for f in files if f not in out]
    if missing:
        raise DatasetError(f"{archive} is not a complete CIFAR archive: it lacks "
                           f"{', '.join(f'{folder}/{f}' for f in missing)}")
    return out


def load_cifar(name: str, root: str | Path = "data") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of ``cifar10`` / ``cifar100`` from ``root``: uint8
    images (N, 3, 32, 32) and int64 labels. Raises ``FileNotFoundError`` (saying where the data
    is expected and how to get it) when absent and :class:`DatasetError` when unreadable."""
    spec, root = ARCHIVES[name], Path(root)
    train_files, test_files = _FILES[name]
    found = _locate(spec, root, train_files + test_files)
    if found is None:
        raise FileNotFoundError(
            f"{spec.title} not found: expected the folder {root / spec.folder} or the archive "
            f"{root / spec.filename}. Fetch it with `soteacher data download {name} --root {root}` "
            f"(or in Python: soteacher.data.download.download({name!r}, {str(root)!r})), or pass "
            f"the dataset option download=True.")
    kind, where = found
    if kind == "folder":
        raw = {f: (where / f).read_bytes() for f in train_files + test_files}
        sources = {f: str(where / f) for f in raw}
    else:
        raw = _read_archive(where, spec.folder, train_files + test_files)
        sources = {f: f"{where}:{spec.folder}/{f}" for f in raw}
    parts = {f: _parse_batch(raw.pop(f), name, sources[f]) for f in train_files + test_files}

    def join(files: list[str]) -> tuple[Tensor, Tensor]:
        xs = np.concatenate([parts[f][0] for f in files])
        ys = np.concatenate([parts[f][1] for f in files])
        return torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(ys)

    return (*join(train_files), *join(test_files))


def _bundle(name: str, root: str, fetch: bool) -> DataBundle:
    try:
        x_tr, y_tr, x_te, y_te = load_cifar(name, root)
    except FileNotFoundError:
        if not fetch:
            raise
        download(name, root)
        x_tr, y_tr, x_te, y_te = load_cifar(name, root)
    mean, std = CIFAR_STATS[name]
    return DataBundle(name=name, train=ImageArrayDataset(x_tr, y_tr),
                      test=ImageArrayDataset(x_te, y_te), num_classes=_NUM_CLASSES[name],
                      input_shape=(3, 32, 32),
                      augment=nn.Sequential(RandomCropPad(4), RandomFlip()),
                      preprocess=Normalize(mean, std))


@DATASETS.register("cifar10")
def cifar10(root: str = "data", download: bool = False) -> DataBundle:
    """CIFAR-10 (50,000 / 10,000 images, 10 classes) from ``root`` (see the module docstring).

    Items are uint8 (3, 32, 32); ``augment`` = random crop (zero padding 4) + horizontal flip on
    uint8 batches; ``preprocess`` = ``Normalize`` with the CIFAR-10 channel mean / std.
    ``download=True`` fetches the archive into ``root`` when the data is missing.
    """
    return _bundle("cifar10", root, download)


@DATASETS.register("cifar100")
def cifar100(root: str = "data", download: bool = False) -> DataBundle:
    """CIFAR-100 (50,000 / 10,000 images, 100 fine classes) from ``root``; as ``cifar10``, with
    the CIFAR-100 channel mean / std."""
    return _bundle("cifar100", root, download)
