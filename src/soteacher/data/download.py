"""Fetching CIFAR-10 / CIFAR-100 and extracting archives safely.

``download(name, root)`` fetches the python-version archive of ``cifar10`` or ``cifar100`` with
``urllib`` into a temporary file inside ``root``, checks its MD5, renames it into place atomically
(so ``root`` never holds a partial or unverified archive under the real name) and extracts it with
:func:`safe_extract`, which refuses members that could write outside the destination (absolute
paths, ``..``, links, devices).

Other datasets (Tiny-ImageNet, ImageNet) are not downloaded: their loaders say where to get them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable

__all__ = ["ARCHIVES", "ArchiveSpec", "ChecksumError", "DatasetError", "download", "md5sum",
           "safe_extract"]


class DatasetError(RuntimeError):
    """A dataset file exists but cannot be used: corrupt, truncated, unsafe or malformed."""


class ChecksumError(DatasetError):
    """A downloaded file does not have the expected MD5."""


@dataclass(frozen=True)
class ArchiveSpec:
    title: str       # for messages
    filename: str    # the archive's name in ``root``
    folder: str      # the folder the archive extracts to
    md5: str
    url: str


ARCHIVES: dict[str, ArchiveSpec] = {
    "cifar10": ArchiveSpec("CIFAR-10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                           "c58f30108f718f92721af3b95e74349a",
                           "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ArchiveSpec("CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python",
                            "eb9058c3a382ffc7106e4002c42a8d85",
                            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}

_CHUNK = 1 << 20


def _spec(name: str) -> ArchiveSpec:
    key = str(name).lower()
    if key not in ARCHIVES:
        raise KeyError(f"no download for dataset {name!r}; downloadable: "
                       f"{', '.join(sorted(ARCHIVES))}")
    return ARCHIVES[key]


def md5sum(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (not name or posix.is_absolute() or windows.is_absolute() or windows.drive
            or name.startswith(("/", "\\"))):
        raise DatasetError(f"unsafe archive member {name!r}: absolute path")
    if ".." in posix.parts or ".." in windows.parts:
        raise DatasetError(f"unsafe archive member {name!r}: '..' in the path")
    if not (member.isfile() or member.isdir()):
        raise DatasetError(f"unsafe archive member {name!r}: only regular files and folders "
                           f"are extracted (links, devices and fifos are refused)")


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Extract a tar archive (any compression ``tarfile`` reads) into ``dest``.

    Every member is checked before anything is written: an absolute path, a ``..`` component or a
    member that is not a regular file or folder raises :class:`DatasetError`. Files are extracted
    into a temporary folder inside ``dest`` and each top-level entry is then moved into ``dest``,
    replacing an existing entry of the same name; an error leaves ``dest`` as it was. Stored
    permissions and owners are ignored. Returns the top-level paths created.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for m in members:
                    _check_member(m)
                for m in members:
                    target = tmp.joinpath(*PurePosixPath(m.name).parts)
                    if m.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(m)
                    assert src is not None  # regular file
                    with src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, _CHUNK)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise  # a real I/O error (disk full, permissions), not a bad archive
            raise DatasetError(f"{archive} is corrupt or truncated ({type(e).__name__}: {e}); "
                               f"delete it and fetch it again") from None
        created = []
        for entry in sorted(tmp.iterdir()):
            target = dest / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
            created.append(target)
        return created
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch(url: str, dest: Path, md5: str,
           progress: Callable[[int, int | None], None] | None) -> None:
    """Stream ``url`` to a temporary file next to ``dest``, check the MD5, rename to ``dest``."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            length = response.headers.get("Content-Length") if response.headers else None
            total = int(length) if length and str(length).isdigit() else None
            done = 0
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        digest = h.hexdigest()
        if digest != md5.lower():
            raise ChecksumError(f"MD5 mismatch for {url}: got {digest}, expected {md5.lower()}; "
                                f"the download was discarded")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def download(name: str, root: str | os.PathLike = "data", url: str | None = None,
             md5: str | None = None, extract: bool = True,
             progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Fetch dataset ``name`` (``cifar10`` or ``cifar100``) into ``root``; return the folder the
    data was extracted to (or the archive's path with ``extract=False``).

    ``url`` and ``md5`` override the official source and checksum (e.g. a mirror, or a local
    ``file://`` URL). An archive already in ``root`` with the right MD5 is not fetched again. The
    download goes to a temporary ``.part`` file in ``root``, removed on any failure; a wrong MD5
    raises :class:`ChecksumError`. ``progress(bytes_done, bytes_total_or_None)`` is called after
    each chunk. Extraction uses :func:`safe_extract`.
    """
    spec = _spec(name)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    expected = (md5 or spec.md5).lower()
    archive = root / spec.filename
    if not (archive.is_file() and md5sum(archive) == expected):
        source = url or spec.url
        try:
            _fetch(source, archive, expected, progress)
        except urllib.error.URLError as e:
            # URLError is an OSError whose str() is only "<urlopen error ...>"
            reason = getattr(e, "reason", e)
            reason = getattr(reason, "strerror", None) or str(reason)
            raise DatasetError(
                f"cannot download {spec.title} from {source}: {reason}. Check the network "
                f"connection (and a proxy, if you need one), or fetch {spec.filename} another "
                f"way and put it in {root}/, or pass --url (url= in Python) with a mirror or a "
                f"file:// path") from None
    if not extract:
        return archive
    safe_extract(archive, root)
    folder = root / spec.folder
    if not folder.is_dir():
        raise DatasetError(f"{archive} did not contain the folder {spec.folder!r}")
    return folder
