"""Tiny-ImageNet and ImageNet from folders of image files, decoded with Pillow.

Neither is downloaded automatically; the loaders say where the files are expected.

``tiny_imagenet`` (200 classes, 64x64): ``root/tiny-imagenet-200/`` (or ``root`` itself) with
``train/<wnid>/images/*.JPEG`` and ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``
(``file<TAB>wnid<TAB>...``); the labelled ``val`` split is the test set. Classes are the sorted
training ``wnid`` folders. Images are converted to RGB and, in the rare case they are not 64x64,
resized to it. By default everything is decoded once into memory (uint8, about 1.2 GB), which lets
the trainer slice batches directly; ``in_memory=False`` decodes on access instead.
``augment`` = random crop with 4-pixel zero padding + horizontal flip; ``preprocess`` =
``Normalize`` with the Tiny-ImageNet channel statistics.

``imagenet`` (ILSVRC-2012 layout): ``root/imagenet/`` (or ``root`` itself) with
``train/<class>/*`` and ``val/<class>/*`` (the validation images sorted into class folders, as
torchvision's ``ImageFolder`` expects). Images are decoded on access (too many to hold in memory).
To let batches be stacked and augmented on the device, every item has a fixed size:

* test items: the shorter side resized to ``resize`` (default 256, bilinear with Pillow's
  anti-aliasing), then the central ``crop`` x ``crop`` (default 224) -- the standard evaluation;
* training items: the shorter side resized to ``resize``, then the central ``resize`` x ``resize``
  square. The bundle's ``augment`` then takes a ``RandomResizedCrop(crop)`` (area 8-100 %, aspect
  3/4-4/3) of that square plus a horizontal flip, on the device. Unlike torchvision's usual
  pipeline (a random-resized crop of the full-resolution image) the crop is taken from this
  central square of the resized image, so the edges of wide images are never seen and the crop
  resampling is bilinear without anti-aliasing; that is the price of decoding to a fixed size.

``input_shape`` is ``(3, crop, crop)``, what the model sees after ``augment``; ``preprocess`` =
``Normalize`` with the ImageNet channel statistics. Items are ``(uint8 tensor (3, H, W), label,
index)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .augment import Normalize, RandomCropPad, RandomFlip, RandomResizedCrop
from .base import DATASETS, DataBundle
from .cifar import ImageArrayDataset
from .download import DatasetError

__all__ = ["IMAGENET_STATS", "TINY_IMAGENET_STATS", "ImageFolderDataset", "imagenet",
           "imagenet_samples", "load_image", "tiny_imagenet", "tiny_imagenet_samples"]

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TINY_IMAGENET_STATS = ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("Pillow is needed to read image folders: "
                          "pip install 'soteacher[data]'") from e
    return Image


def load_image(path: str | os.PathLike, resize: int | None = None,
               crop: int | tuple[int, int] | None = None) -> Tensor:
    """Decode ``path`` to an RGB uint8 tensor (3, H, W).

    ``resize``: scale so the shorter side has this length (bilinear with anti-aliasing, the longer
    side truncated to an int as torchvision does). ``crop``: the central ``(h, w)`` (or square)
    region. Raises :class:`DatasetError` if the file cannot be decoded.
    """
    image_mod = _pil()
    try:
        with image_mod.open(path) as img:
            img = img.convert("RGB")
            if resize is not None:
                w, h = img.size
                if w <= h:
                    size = (resize, max(1, int(resize * h / w)))
                else:
                    size = (max(1, int(resize * w / h)), resize)
                if size != img.size:
                    img = img.resize(size, image_mod.BILINEAR)
            if crop is not None:
                ch, cw = (crop, crop) if isinstance(crop, int) else crop
                w, h = img.size
                if ch > h or cw > w:
                    raise DatasetError(f"{path}: cannot crop {ch}x{cw} from a {h}x{w} image")
                top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
                img = img.crop((left, top, left + cw, top + ch))
            arr = np.asarray(img, dtype=np.uint8)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        raise DatasetError(f"cannot decode the image {path}: {type(e).__name__}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    """Images decoded on access; item ``i`` is ``(uint8 tensor (3, H, W), label, i)``.

    ``samples`` lists ``(path, class index)``; each image goes through :func:`load_image` with
    ``resize`` and ``crop``, so with a ``crop`` all items have the same size.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], resize: int | None = None,
                 crop: int | tuple[int, int] | None = None) -> None:
        self.samples = [(Path(p), int(c)) for p, c in samples]
        self.resize, self.crop = resize, crop

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        i = int(i)
        path, label = self.samples[i]
        return (load_image(path, self.resize, self.crop), torch.tensor(label, dtype=torch.int64),
                i)

    @property
    def targets(self) -> Tensor:
        return torch.tensor([c for _, c in self.samples], dtype=torch.int64)

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(n={len(self)}, resize={self.resize}, crop={self.crop})")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _materialise(ds: ImageFolderDataset) -> ImageArrayDataset:
    """Decode every image of ``ds`` into one uint8 tensor."""
    if len(ds) == 0:
        raise DatasetError("no images to load")
    first = ds[0][0]
    x = torch.empty((len(ds), *first.shape), dtype=torch.uint8)
    x[0] = first
    for i in range(1, len(ds)):
        x[i] = ds[i][0]
    return ImageArrayDataset(x, ds.targets)


# ---- Tiny-ImageNet ---------------------------------------------------------------------------
def _tiny_dir(root: Path) -> Path:
    for d in (root / "tiny-imagenet-200", root):
        if (d / "train").is_dir() and (d / "val").is_dir():
            return d
    raise FileNotFoundError(
        f"Tiny-ImageNet not found: expected {root / 'tiny-imagenet-200' / 'train'}/<wnid>/images/"
        f"*.JPEG and {root / 'tiny-imagenet-200' / 'val'}/images/*.JPEG with "
        f"val/val_annotations.txt. It is not downloaded automatically: get "
        f"http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into {root}.")


def tiny_imagenet_samples(root: str | os.PathLike
                          ) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """``(classes, train samples, val samples)`` of the Tiny-ImageNet folder under ``root``."""
    base = _tiny_dir(Path(root))
    classes = sorted(d.name for d in (base / "train").iterdir() if (d / "images").is_dir())
    if not classes:
        raise DatasetError(f"{base / 'train'} has no <wnid>/images folders")
    index = {c: i for i, c in enumerate(classes)}
    train = [(p, index[c]) for c in classes for p in _images_in(base / "train" / c / "images")]
    ann = base / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise FileNotFoundError(f"Tiny-ImageNet validation labels not found: expected {ann}")
    val = []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DatasetError(f"{ann}, line {n}: expected 'file<TAB>wnid...', got {line!r}")
        fname, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DatasetError(f"{ann}, line {n}: class {wnid!r} has no training folder")
        path = base / "val" / "images" / fname
        if Path(fname).name != fname or not path.is_file():
            raise DatasetError(f"{ann}, line {n}: no image {path}")
        val.append((path, index[wnid]))
    if not train or not val:
        raise DatasetError(f"Tiny-ImageNet under {base} has no training or validation images")
    return classes, train, val


@DATASETS.register("tiny_imagenet")
def tiny_imagenet(root: str = "data", in_memory: bool = True) -> DataBundle:
    """Tiny-ImageNet (100,000 / 10,000 images of 64x64, 200 classes); see the module docstring."""
    classes, train, val = tiny_imagenet_samples(root)
    train_ds = ImageFolderDataset(train, resize=64, crop=64)
    test_ds = ImageFolderDataset(val, resize=64, crop=64)
    mean, std = TINY_IMAGENET_STATS
    return DataBundle(name="tiny_imagenet",
                      train=_materialise(train_ds) if in_memory else train_ds,
                      test=_materialise(test_ds) if in_memory else test_ds,
                      num_classes=len(classes), input_shape=(3, 64, 64),
                      augment=nn.Sequential(RandomCropPad(4), RandomFlip()),
                      preprocess=Normalize(mean, std))


# ---- ImageNet --------------------------------------------------------------------------------
def _imagenet_dir(root: Path) -> Path:
    for d in (root / "imagenet", root):
        if (d / "train").is_dir() and (d / "val").is_dir():
            return d
    raise FileNotFoundError(
        f"ImageNet not found: expected {root / 'imagenet' / 'train'}/<class>/*.JPEG and "
        f"{root / 'imagenet' / 'val'}/<class>/*.JPEG (or train/ and val/ directly in {root}). "
        f"ImageNet cannot be downloaded automatically: get ILSVRC-2012 from "
        f"https://image-net.org (after registering), extract it, and sort the validation images "
        f"into one folder per class.")


def imagenet_samples(root: str | os.PathLike
                     ) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """``(classes, train samples, val samples)`` of the ImageNet folders under ``root``."""
    base = _imagenet_dir(Path(root))
    classes = sorted(d.name for d in (base / "train").iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"{base / 'train'} has no class folders")
    index = {c: i for i, c in enumerate(classes)}
    extra = sorted(d.name for d in (base / "val").iterdir() if d.is_dir() and d.name not in index)
    if extra:
        raise DatasetError(f"{base / 'val'} has class folders without training data: "
                           f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    train = [(p, index[c]) for c in classes for p in _images_in(base / "train" / c)]
    val = [(p, index[c]) for c in classes if (base / "val" / c).is_dir()
           for p in _images_in(base / "val" / c)]
    if not train or not val:
        raise DatasetError(f"ImageNet under {base} has no training or validation images "
                           f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    return classes, train, val


@DATASETS.register("imagenet")
def imagenet(root: str = "data", resize: int = 256, crop: int = 224) -> DataBundle:
    """ImageNet from class folders; items decoded on access; see the module docstring for the
    fixed-size choice (train: central ``resize`` square, random-resized-cropped to ``crop`` on the
    device; test: central ``crop`` after resizing the shorter side to ``resize``)."""
    if crop < 1 or resize < crop:
        raise ValueError(f"need 1 <= crop <= resize; got crop={crop}, resize={resize}")
    classes, train, val = imagenet_samples(root)
    mean, std = IMAGENET_STATS
    return DataBundle(name="imagenet",
                      train=ImageFolderDataset(train, resize=resize, crop=resize),
                      test=ImageFolderDataset(val, resize=resize, crop=crop),
                      num_classes=len(classes), input_shape=(3, crop, crop),
                      augment=nn.Sequential(RandomResizedCrop(crop), RandomFlip()),
                      preprocess=Normalize(mean, std))
