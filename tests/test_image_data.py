"""Image datasets without torchvision: CIFAR pickles (read safely), image folders, downloads and
the uint8 batch transforms. Everything runs on tiny fake data written into ``tmp_path``."""

from __future__ import annotations

import hashlib
import inspect
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from soteacher.data import (DATASETS, ChecksumError, DatasetError, ImageArrayDataset,
                            ImageFolderDataset, Normalize, RandomCropPad, RandomFlip,
                            RandomResizedCrop, ToFloat, UnsafePickleError, build_dataset)
from soteacher.data.augment import resized_crop
from soteacher.data.cifar import restricted_loads
from soteacher.data.download import download, safe_extract

Image = pytest.importorskip("PIL.Image")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- fake CIFAR archives in the real format ---------------------------------------------------
class _Py2Pickler(pickle._Pickler):
    """Writes ``str`` and ``bytes`` as Python 2 byte strings (BINSTRING), as the official CIFAR
    pickles (made with Python 2's cPickle) do."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_str8(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_str8
    dispatch[str] = _save_str8


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # Old numpy (as in the real files) names its reconstructor numpy.core.multiarray.
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"],
                 "fine_labels", 100),
}


def make_cifar(root, name, n=2, archive=False, dumps=py2_dumps, seed=0):
    """Write a tiny CIFAR folder (or its .tar.gz only) into ``root``; return the expected
    (x_train, y_train, x_test, y_test) as numpy arrays."""
    folder, tarname, train_files, test_files, label_key, k = CIFAR_LAYOUT[name]
    rng = np.random.default_rng(seed)
    src = root / (".src_" + name) if archive else root
    (src / folder).mkdir(parents=True)
    out = {}
    for f in train_files + test_files:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, k, size=n)]
        d = {"batch_label": f"fake {f}", "data": data, label_key: labels,
             "filenames": [f"img_{i}.png" for i in range(n)]}
        if name == "cifar100":
            d["coarse_labels"] = [v // 5 for v in labels]
        (src / folder / f).write_bytes(dumps(d))
        out[f] = (data, labels)
    if archive:
        with tarfile.open(root / tarname, "w:gz") as tar:
            tar.add(src / folder, arcname=folder)
    join = lambda files: (np.concatenate([out[f][0] for f in files]).reshape(-1, 3, 32, 32),  # noqa
                          np.concatenate([out[f][1] for f in files]))
    return (*join(train_files), *join(test_files))


def _check_bundle(bundle, name, expected):
    x_tr, y_tr, x_te, y_te = expected
    k = CIFAR_LAYOUT[name][5]
    assert bundle.num_classes == k and bundle.input_shape == (3, 32, 32)
    for ds, x, y in ((bundle.train, x_tr, y_tr), (bundle.test, x_te, y_te)):
        assert isinstance(ds, ImageArrayDataset)
        assert ds.x.dtype == torch.uint8 and ds.y.dtype == torch.int64
        assert torch.equal(ds.x, torch.from_numpy(x)) and torch.equal(ds.y, torch.from_numpy(y))
        xi, yi, i = ds[1]
        assert xi.dtype == torch.uint8 and xi.shape == (3, 32, 32) and i == 1
        assert int(yi) == int(y[1])


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "tar.gz"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_folder_and_archive(tmp_path, name, archive):
    expected = make_cifar(tmp_path, name, archive=archive)
    bundle = build_dataset(name, root=str(tmp_path))
    _check_bundle(bundle, name, expected)
    n_train = 10 if name == "cifar10" else 2
    assert len(bundle.train) == n_train and len(bundle.test) == 2
    # Row layout: 1024 red values, then green, then blue, each a row-major 32x32 image.
    raw = expected[0].reshape(n_train, 3072)
    assert torch.equal(bundle.train.x[0, 1, 0, :5], torch.from_numpy(raw[0, 1024:1029]))


def test_cifar_root_may_be_the_extracted_folder_and_python3_pickles_load(tmp_path):
    expected = make_cifar(tmp_path, "cifar10", dumps=lambda d: pickle.dumps(d, protocol=5))
    bundle = build_dataset("cifar10", root=str(tmp_path / "cifar-10-batches-py"))
    _check_bundle(bundle, "cifar10", expected)


def test_cifar_bundle_transforms(tmp_path):
    make_cifar(tmp_path, "cifar100", n=4)
    b = build_dataset("cifar100", root=str(tmp_path))
    x = b.train.x[:4]
    aug = b.augment(x)
    assert aug.dtype == torch.uint8 and aug.shape == x.shape
    out = b.preprocess(aug)
    assert out.dtype == torch.float32 and out.shape == x.shape
    mean = torch.tensor([0.5071, 0.4867, 0.4408]).view(1, 3, 1, 1)
    std = torch.tensor([0.2675, 0.2565, 0.2761]).view(1, 3, 1, 1)
    torch.testing.assert_close(b.preprocess(x), (x.float() / 255 - mean) / std)


def test_cifar_builders_take_keyword_options_with_defaults():
    for name in ("cifar10", "cifar100", "tiny_imagenet", "imagenet"):
        params = inspect.signature(DATASETS.get(name)).parameters.values()
        assert [p.name for p in params][0] == "root"
        for p in params:
            assert p.default is not p.empty, (name, p.name)


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python")])
def test_missing_cifar_names_the_path_and_the_download_command(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(name, root=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / folder) in msg
    assert f"soteacher data download {name} --root {tmp_path}" in msg


def test_truncated_or_garbage_archive_is_a_clear_error(tmp_path):
    make_cifar(tmp_path, "cifar10", archive=True)
    archive = tmp_path / "cifar-10-python.tar.gz"
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        build_dataset("cifar10", root=str(tmp_path))
    archive.write_bytes(b"this is not a tar.gz archive" * 10)
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        build_dataset("cifar10", root=str(tmp_path))


def test_truncated_pickle_and_wrong_content(tmp_path):
    make_cifar(tmp_path, "cifar100")
    batch = tmp_path / "cifar-100-python" / "test"
    good = batch.read_bytes()
    batch.write_bytes(good[:100])
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        build_dataset("cifar100", root=str(tmp_path))
    batch.write_bytes(py2_dumps({"data": np.zeros((2, 10), np.uint8), "fine_labels": [0, 1]}))
    with pytest.raises(DatasetError, match="3072"):
        build_dataset("cifar100", root=str(tmp_path))
    batch.write_bytes(py2_dumps({"data": np.zeros((2, 3072), np.uint8),
                                 "fine_labels": [0, 100]}))
    with pytest.raises(DatasetError, match="labels"):
        build_dataset("cifar100", root=str(tmp_path))


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    make_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": _Evil(f"touch {marker}"), "labels": []}, protocol=2)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(payload)
    with pytest.raises(UnsafePickleError, match="system"):
        build_dataset("cifar10", root=str(tmp_path))
    assert not marker.exists()
    # Other gadgets: builtins.eval, and numpy reconstruction of a non-ndarray subtype.
    for obj in (_EvalGadget(), np.ma.masked_array([1, 2])):
        with pytest.raises(UnsafePickleError):
            restricted_loads(pickle.dumps(obj, protocol=2))


def test_numpy_reconstruction_is_limited_to_plain_arrays():
    # _reconstruct(numpy.dtype, (0,), b"b"), written by hand: only ndarray is an allowed subtype.
    crafted = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\n"
               b"K\x00\x85U\x01b\x87R.")
    with pytest.raises(UnsafePickleError, match="dtype"):
        restricted_loads(crafted)


class _EvalGadget:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_restricted_loads_accepts_plain_data():
    obj = {b"a": [1, 2.5, "s", b"b", (None, True)], "arr": np.arange(5, dtype=np.int16)}
    for proto in (2, 4, 5):
        out = restricted_loads(pickle.dumps(obj, protocol=proto))
        assert out[b"a"] == obj[b"a"] and np.array_equal(out["arr"], obj["arr"])


# ---- download ----------------------------------------------------------------------------------
def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_from_file_url_with_md5_check(tmp_path):
    src = tmp_path / "mirror"
    expected = make_cifar(src, "cifar10", archive=True)
    archive = src / "cifar-10-python.tar.gz"
    root = tmp_path / "data"
    calls = []
    folder = download("cifar10", root, url=archive.as_uri(), md5=_md5(archive),
                      progress=lambda done, total: calls.append(done))
    assert folder == root / "cifar-10-batches-py" and folder.is_dir()
    assert (root / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    assert calls and calls[-1] == archive.stat().st_size
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    _check_bundle(build_dataset("cifar10", root=str(root)), "cifar10", expected)
    # A second call finds the verified archive and does not fetch again.
    download("cifar10", root, url=(tmp_path / "nowhere.tar.gz").as_uri(), md5=_md5(archive))


def test_download_md5_mismatch_leaves_nothing(tmp_path):
    src = tmp_path / "mirror"
    make_cifar(src, "cifar100", archive=True)
    archive = src / "cifar-100-python.tar.gz"
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match="MD5"):
        download("cifar100", root, url=archive.as_uri(), md5="0" * 32)
    assert list(root.iterdir()) == []
    with pytest.raises(KeyError, match="cifar10"):
        download("imagenet", root)


def test_official_checksums():
    from soteacher.data.download import ARCHIVES
    assert ARCHIVES["cifar10"].md5 == "c58f30108f718f92721af3b95e74349a"
    assert ARCHIVES["cifar100"].md5 == "eb9058c3a382ffc7106e4002c42a8d85"


def _tar_with(path, member: tarfile.TarInfo, data: bytes = b"x"):
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("fine/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        if member.isfile():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_safe_extract_refuses_escaping_members(tmp_path, kind):
    member = tarfile.TarInfo({"dotdot": "fine/../../evil.txt", "absolute": "/tmp/evil.txt",
                              "symlink": "fine/link", "hardlink": "fine/hard"}[kind])
    if kind == "symlink":
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        member.type, member.linkname = tarfile.LNKTYPE, "../../etc/passwd"
    archive = tmp_path / "a.tar.gz"
    _tar_with(archive, member)
    dest = tmp_path / "dest"
    with pytest.raises(DatasetError, match="unsafe"):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []                # nothing extracted, no temporary folder
    assert not (tmp_path / "evil.txt").exists()


def test_safe_extract_extracts_plain_archives(tmp_path):
    archive = tmp_path / "a.tar.gz"
    _tar_with(archive, tarfile.TarInfo("fine/sub/data.bin"), b"payload")
    created = safe_extract(archive, tmp_path / "dest")
    assert created == [tmp_path / "dest" / "fine"]
    assert (tmp_path / "dest" / "fine" / "sub" / "data.bin").read_bytes() == b"payload"


# ---- image folders -----------------------------------------------------------------------------
def _save(path, arr, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if arr.ndim == 2 else "RGB"
    Image.fromarray(arr, mode).save(path, format=fmt)


def _rand_image(rng, h, w, grey=False):
    return rng.integers(0, 256, size=(h, w) if grey else (h, w, 3), dtype=np.uint8)


def make_tiny_imagenet(root):
    rng = np.random.default_rng(1)
    base = root / "tiny-imagenet-200"
    pixels = {}
    for wnid in ("n02", "n01"):
        for i in range(2):
            arr = _rand_image(rng, 64, 64)
            _save(base / "train" / wnid / "images" / f"{wnid}_{i}.png", arr, "PNG")
            pixels[(wnid, i)] = arr
        _save(base / "train" / wnid / "images" / f"{wnid}_9.JPEG", _rand_image(rng, 64, 64, True),
              "JPEG")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
    lines = []
    for i, wnid in enumerate(["n01", "n02", "n02"]):
        arr = _rand_image(rng, 64, 80) if i == 2 else _rand_image(rng, 64, 64)  # one 80 wide
        _save(base / "val" / "images" / f"val_{i}.png", arr, "PNG")
        pixels[("val", i)] = arr
        lines.append(f"val_{i}.png\t{wnid}\t0\t0\t10\t10")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return pixels


@pytest.mark.parametrize("in_memory", [True, False])
def test_tiny_imagenet(tmp_path, in_memory):
    pixels = make_tiny_imagenet(tmp_path)
    b = build_dataset("tiny_imagenet", root=str(tmp_path), in_memory=in_memory)
    assert b.num_classes == 2 and b.input_shape == (3, 64, 64)
    assert len(b.train) == 6 and len(b.test) == 3
    assert isinstance(b.train, ImageArrayDataset if in_memory else ImageFolderDataset)
    x, y, i = b.train[0]                              # sorted classes: n01 first
    assert x.dtype == torch.uint8 and x.shape == (3, 64, 64) and int(y) == 0 and i == 0
    assert torch.equal(x, torch.from_numpy(pixels[("n01", 0)]).permute(2, 0, 1))
    grey = b.train[2][0]                             # the greyscale JPEG, made RGB
    assert grey.shape == (3, 64, 64) and torch.equal(grey[0], grey[1])
    assert [int(b.test[j][1]) for j in range(3)] == [0, 1, 1]
    assert b.test[2][0].shape == (3, 64, 64)          # the 80-wide image resized and cropped
    assert isinstance(b.preprocess, Normalize)
    assert b.preprocess(b.augment(torch.stack([b.train[j][0] for j in range(4)]))).shape == \
        (4, 3, 64, 64)


def make_imagenet(root):
    rng = np.random.default_rng(2)
    base = root / "imagenet"
    arrs = {}
    for split, n in (("train", 2), ("val", 1)):
        for cls in ("cat", "dog"):
            for i in range(n):
                arr = _rand_image(rng, 20, 30)         # height 20, width 30
                _save(base / split / cls / f"{cls}_{i}.png", arr, "PNG")
                arrs[(split, cls, i)] = arr
    _save(base / "train" / "dog" / "extra.JPEG", _rand_image(rng, 40, 24), "JPEG")
    return arrs


def test_imagenet_folders_and_fixed_sizes(tmp_path):
    arrs = make_imagenet(tmp_path)
    b = build_dataset("imagenet", root=str(tmp_path), resize=20, crop=16)
    assert b.num_classes == 2 and b.input_shape == (3, 16, 16)
    assert len(b.train) == 5 and len(b.test) == 2
    x, y, _ = b.train[0]
    # Shorter side already 20: the training item is the central 20x20 square, no resampling.
    assert x.shape == (3, 20, 20) and int(y) == 0
    assert torch.equal(x, torch.from_numpy(arrs[("train", "cat", 0)][:, 5:25]).permute(2, 0, 1))
    assert b.train[4][0].shape == (3, 20, 20)          # the portrait JPEG, resized
    xt, yt, _ = b.test[1]
    assert xt.shape == (3, 16, 16) and int(yt) == 1
    assert torch.equal(xt, torch.from_numpy(arrs[("val", "dog", 0)][2:18, 7:23]).permute(2, 0, 1))
    batch = torch.stack([b.train[j][0] for j in range(3)])
    out = b.preprocess(b.augment(batch))
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    loader = torch.utils.data.DataLoader(b.test, batch_size=2)
    xb, yb, ib = next(iter(loader))
    assert xb.shape == (2, 3, 16, 16) and yb.tolist() == [0, 1] and ib.tolist() == [0, 1]


def test_missing_image_folders_say_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("tiny_imagenet", root=str(tmp_path))
    assert str(tmp_path / "tiny-imagenet-200" / "train") in str(err.value)
    assert "tiny-imagenet-200.zip" in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("imagenet", root=str(tmp_path))
    assert str(tmp_path / "imagenet" / "train") in str(err.value)
    assert "cannot be downloaded automatically" in str(err.value)


def test_undecodable_image_names_the_file(tmp_path):
    make_imagenet(tmp_path)
    bad = tmp_path / "imagenet" / "val" / "cat" / "cat_0.png"
    bad.write_bytes(b"not an image")
    b = build_dataset("imagenet", root=str(tmp_path), resize=20, crop=16)
    with pytest.raises(DatasetError, match="cat_0.png"):
        b.test[0]


# ---- uint8 batch transforms --------------------------------------------------------------------
def test_random_resized_crop_shapes_and_boxes():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 20, 30), dtype=torch.uint8)
    out = RandomResizedCrop(8)(x)
    assert out.shape == (64, 3, 8, 8) and out.dtype == torch.uint8
    assert RandomResizedCrop((6, 10))(x.float()).shape == (64, 3, 6, 10)
    aug = RandomResizedCrop(8, scale=(0.2, 0.6), ratio=(0.5, 2.0))
    boxes = aug.sample_boxes(500, 20, 30, torch.device("cpu"), torch.Generator().manual_seed(1))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= 20).all() and (left + w <= 30).all()
    area = (h * w).double() / 600
    assert area.min() > 0.15 and area.max() < 0.7     # scale, up to integer rounding
    assert len(set(boxes[:, 0].tolist())) > 3          # positions vary per sample
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(aug(x, generator=g()), aug(x, generator=g()))


def test_random_resized_crop_fallback_is_the_central_crop():
    aug = RandomResizedCrop(4, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    boxes = aug.sample_boxes(3, 10, 30, torch.device("cpu"))
    assert boxes.tolist() == [[0, 10, 10, 10]] * 3


@pytest.mark.parametrize("size", [8, 16, 24])
def test_full_scale_square_crop_is_a_plain_resize(size):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    aug = RandomResizedCrop(size, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    ref = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
    torch.testing.assert_close(aug(x.float()), ref, atol=2e-3, rtol=0)
    assert (aug(x).int() - ref.round().int()).abs().max() <= 1
    if size == 16:
        assert torch.equal(aug(x), x)


def test_resized_crop_of_a_box_by_hand():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    # The 2x2 box at (1, 2) kept at its own size is that exact block.
    out = resized_crop(x, torch.tensor([[1, 2, 2, 2]]), (2, 2))
    assert torch.equal(out, x[:, :, 1:3, 2:4])
    # Halving a 2x2 box averages its four pixels.
    out = resized_crop(x, torch.tensor([[0, 0, 2, 2]]), (1, 1))
    assert out.item() == pytest.approx((0 + 1 + 4 + 5) / 4)


def test_normalize_and_to_float_by_hand():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    norm = Normalize((0.5, 0.25, 0.1), (0.5, 0.25, 0.2))
    out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-1.0, 3.0, 0.5]))
    torch.testing.assert_close(norm(x.float() / 255), out)   # float input taken as [0, 1]
    assert torch.equal(ToFloat()(x)[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.2]))
    f = torch.rand(2, 3)
    assert ToFloat()(f) is f
    with pytest.raises(ValueError):
        norm(torch.zeros(1, 4, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError):
        Normalize((0.5,), (0.0,))
    assert not list(norm.state_dict())                # nothing persisted in checkpoints


def test_crop_pad_and_flip_work_on_uint8():
    x = torch.randint(1, 256, (8, 3, 6, 6), dtype=torch.uint8)
    for aug in (RandomCropPad(2), RandomFlip()):
        g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
        out = aug(x, generator=g())
        assert out.dtype == torch.uint8
        assert torch.equal(out.float(), aug(x.float(), generator=g()))
    aug = nn.Sequential(RandomCropPad(4), RandomFlip())
    assert aug(x).dtype == torch.uint8
