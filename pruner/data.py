"""Datasets as uint8 arrays: ImageFolder (decoded once, cached), CIFAR-10 python pickles, and generated data.

Every dataset is a ``Dataset`` of uint8 NHWC images and int64 labels plus its class names; normalisation
(mean/std per channel) travels with it so the exporter can put it in the manifest. Torch is not needed here.
"""

from __future__ import annotations

import hashlib
import os
import pickle  # only for the CIFAR-10 python release, a format that is pickle by definition; see load_cifar10
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeshift.core.atomic import atomic_path
from edgeshift.core.errors import EdgeshiftError, InputFileError

from .models.record import ModelRecord

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    """Images uint8 [N, H, W, C], labels int64 [N], class names, and the normalisation to apply."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    mean: tuple[float, ...] = CIFAR_MEAN
    std: tuple[float, ...] = CIFAR_STD
    name: str = "dataset"
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.labels))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalised(self, idx=slice(None)) -> np.ndarray:
        """float32 NCHW: (x / 255 - mean) / std."""
        x = self.images[idx].astype(np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def subset(self, n: int, seed: int = 0) -> "Dataset":
        """A class-stratified deterministic subset of about ``n`` samples."""
        if n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.permutation(len(self))[:n])
        return Dataset(self.images[idx], self.labels[idx], self.classes, self.mean, self.std, f"{self.name}[:{n}]")

    def held_out(self, n: int, count: int, seed: int = 0) -> "Dataset":
        """``count`` samples none of which is in ``subset(n, seed)`` (the next ones of the same permutation);
        refused when there are not that many left."""
        if n + count > len(self):
            raise EdgeshiftError(
                f"{self.name} has {len(self)} samples: {n} measured and {count} held out do not fit; ask for fewer"
            )
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.permutation(len(self))[n : n + count])
        return Dataset(
            self.images[idx], self.labels[idx], self.classes, self.mean, self.std, f"{self.name}[{n}:{n + count}]"
        )


def _cache_dir() -> Path:
    return Path(os.environ.get("EDGESHIFT_CACHE", Path.home() / ".cache" / "edgeshift"))


def _layout_error(root: Path, split: str, why: str) -> InputFileError:
    return InputFileError(f"{root} is not an ImageFolder dataset ({why}); expected {root}/{split}/<class>/*.jpg|png")


def _list_imagefolder(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    base = root / split
    if not root.is_dir():
        raise InputFileError(f"data folder not found: {root}")
    if not base.is_dir():
        raise _layout_error(root, split, f"no {split}/ folder")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not classes:
        raise _layout_error(root, split, f"{split}/ has no class folders")
    files = []
    for i, c in enumerate(classes):
        imgs = sorted(p for p in (base / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            raise _layout_error(root, split, f"class folder {c}/ has no images")
        files += [(p, i) for p in imgs]
    return classes, files


def load_imagefolder(
    root: str | os.PathLike, split: str = "train", size: int | None = None, cache: bool = True
) -> Dataset:
    """``<root>/<split>/<class>/*.{jpg,png}`` decoded once with Pillow into RGB uint8, cached under
    ``$EDGESHIFT_CACHE`` (default ``~/.cache/edgeshift``) keyed by the file list and sizes."""
    root = Path(root)
    classes, files = _list_imagefolder(root, split)
    key = hashlib.sha256()
    key.update(f"{root.resolve()}|{split}|{size}".encode())
    for p, i in files:
        key.update(f"{p.name}|{i}|{p.stat().st_size}".encode())
    cache_file = _cache_dir() / f"imagefolder-{key.hexdigest()[:24]}.npz"
    if cache and cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as z:
            return Dataset(z["images"], z["labels"], classes, name=f"{root.name}/{split}")
    try:  # Pillow only where image folders are read (the build extra has it; a bare install may not)
        from PIL import Image
    except ImportError:
        raise EdgeshiftError("reading image folders needs Pillow: pip install pillow") from None
    images, labels = [], []
    first_size = None
    # decoding tens of thousands of JPEGs takes minutes on a small machine: say so, once (it is cached for next time)
    sys.stderr.write(f"decoding {len(files):,} images of {root}/{split} (once: cached for later runs)\n")
    sys.stderr.flush()
    for p, i in files:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if size is not None:
                    im = im.resize((size, size))
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as exc:
            raise InputFileError(f"cannot decode image {p}: {exc}") from None
        if first_size is None:
            first_size = arr.shape
        elif arr.shape != first_size:
            raise InputFileError(
                f"image {p} is {arr.shape[1]}x{arr.shape[0]}, others {first_size[1]}x{first_size[0]};"
                " pass a size to resize them"
            )
        images.append(arr)
        labels.append(i)
    ds = Dataset(np.stack(images), np.asarray(labels, np.int64), classes, name=f"{root.name}/{split}")
    if cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=ds.images, labels=ds.labels)
    return ds


def load_cifar10(root: str | os.PathLike, split: str = "train") -> Dataset:
    """The CIFAR-10 python release (``data_batch_1..5``, ``test_batch``, ``batches.meta``).

    That release is pickled by its authors; it is read with a restricted unpickler that only builds dicts,
    lists, strings, numbers and numpy arrays, never arbitrary objects.
    """
    root = Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names + ["batches.meta"] if not (root / n).is_file()]
    if missing:
        raise InputFileError(f"{root} is not the CIFAR-10 python folder (missing {', '.join(missing)})")
    xs, ys = [], []
    for n in names:
        d = _restricted_load(root / n)
        xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d[b"labels"], np.int64))
    meta = _restricted_load(root / "batches.meta")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[b"label_names"]]
    return Dataset(np.concatenate(xs), np.concatenate(ys), classes, name=f"cifar10/{split}")


class _SafeUnpickler(pickle.Unpickler):
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise InputFileError(f"refusing to unpickle {module}.{name}: not plain CIFAR-10 data")


def _restricted_load(path: Path) -> dict:
    with open(path, "rb") as f:
        return _SafeUnpickler(f, encoding="bytes").load()


def generated_dataset(
    n: int, num_classes: int = 10, size: int = 32, seed: int = 0, noise: float = 0.35, split_seed: int = 0
) -> Dataset:
    """A deterministic, learnable image set needing no download: each class is a smooth random template;
    a sample is its template shifted by up to 3 pixels plus noise. ``split_seed`` varies the samples, not the
    templates, so train and test splits share classes."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (num_classes, size // 8, size // 8, 3))
    templates = coarse.repeat(8, 1).repeat(8, 2)  # blocky colour fields
    sample_rng = np.random.default_rng(1_000_003 * (split_seed + 1) + seed)
    labels = sample_rng.integers(0, num_classes, n)
    shifts = sample_rng.integers(-3, 4, (n, 2))
    images = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        images[i] = np.roll(templates[labels[i]], tuple(shifts[i]), axis=(0, 1))
    images += sample_rng.normal(0, noise, images.shape)
    images = np.clip(images * 255, 0, 255).astype(np.uint8)
    return Dataset(
        images,
        labels.astype(np.int64),
        [f"class{i}" for i in range(num_classes)],
        mean=(0.5, 0.5, 0.5),
        std=(0.3, 0.3, 0.3),
        name="generated",
    )


def load_dataset(
    spec: str, split: str = "train", *, generated_size: int = 2000, num_classes: int = 10, size: int = 32
) -> Dataset:
    """``generated`` | a CIFAR-10 python folder | an ImageFolder root."""
    if spec == "generated":
        n = generated_size if split == "train" else max(generated_size // 4, 100)
        return generated_dataset(n, num_classes, size, split_seed=0 if split == "train" else 1)
    root = Path(spec)
    if not root.exists():
        raise InputFileError(f"data folder not found: {root} (pass a folder or 'generated')")
    if (root / "batches.meta").is_file():
        return load_cifar10(root, split)
    return load_imagefolder(root, split)


def model_splits(
    data: str, record: ModelRecord, *, train_samples: int | None = None, test_samples: int | None = None, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """The training and test splits of ``data`` for a model of ``record`` (its class count and input size),
    optionally stratified subsets; refuses data with another class count."""

    train = load_dataset(data, "train", num_classes=record.classes, size=record.input_size)
    test = load_dataset(data, "test", num_classes=record.classes, size=record.input_size)
    if train.num_classes != record.num_classes:
        raise EdgeshiftError(
            f"the data has {train.num_classes} classes, the model {record.num_classes}: pass the data it was trained on"
        )
    if train_samples:
        train = train.subset(train_samples, seed)
    if test_samples:
        test = test.subset(test_samples, seed)
    return train, test
