"""``edgeshift run``: classify a folder of images with a portfolio. Pillow is optional (.npy files work
without it). Torch-free."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgeshift.core.errors import EdgeshiftError, InputFileError
from edgeshift.core.text import printable
from edgeshift.device_profiles.profile import LimitsSettings

from .manifest import Preprocessing

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_inputs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputFileError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + (".npy",))
    if not files:
        raise InputFileError(f"{folder} has no images (*.jpg, *.png, ... or *.npy HxWxC uint8 arrays)")
    return files


CONVERTIBLE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr")  # to RGB without guessing a range


def load_image(
    path: Path, size: Sequence[int], limits: LimitsSettings | None = None, changed: Callable[[str], None] | None = None
) -> np.ndarray:
    """HxWx3 uint8 at the manifest's size, from a file we did not write: its size and pixel count checked before
    it is decoded (``limits.image_megapixels``), a ``.npy`` memory-mapped and never unpickled. ``changed`` hears
    what was done to fit the model ("resized", "converted from L"); a mode with no plain RGB form (16-bit, float)
    is refused."""
    limits = limits or LimitsSettings()
    max_pixels = int(limits.image_megapixels * 1e6)
    max_bytes = max_pixels * 4 + 4096  # an uncompressed RGBA image of the largest allowed size, with a header
    try:
        file_bytes = path.stat().st_size
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if file_bytes > max_bytes:
        raise InputFileError(f"{path}: {file_bytes:,} bytes, more than an image of the allowed size takes")
    if path.suffix.lower() == ".npy":
        return _load_npy(path, size)
    try:
        from PIL import Image
    except ImportError:
        raise EdgeshiftError(
            f"reading {path.suffix} images needs Pillow: pip install pillow (or pass .npy arrays)"
        ) from None
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own bomb check, at our limit (it raises at twice this)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise InputFileError(
                        f"{path}: {width}x{height} pixels, more than the {limits.image_megapixels:g} million the "
                        "profile allows (limits.image_megapixels)"
                    )
                if im.mode not in CONVERTIBLE_MODES:
                    raise InputFileError(
                        f"{path}: image mode {im.mode} has no plain 8-bit RGB form; convert it to RGB first"
                    )
                if changed is not None and im.mode != "RGB":
                    changed(f"converted from {im.mode} to RGB")
                if changed is not None and (height, width) != (size[0], size[1]):
                    changed(f"resized from {width}x{height} to {size[1]}x{size[0]}")
                return np.asarray(im.convert("RGB").resize((size[1], size[0])), dtype=np.uint8)
    except InputFileError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputFileError(
            f"{path}: more pixels than the {limits.image_megapixels:g} million the profile allows "
            "(limits.image_megapixels)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a bad file
        raise InputFileError(f"cannot decode image {path}: {printable(exc)}") from None


def _load_npy(path: Path, size: Sequence[int]) -> np.ndarray:
    """An HxWx3 uint8 ``.npy`` at ``size``: its header read first (memory-mapped: nothing is allocated for what
    the header claims), never unpickled."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # object arrays, a bad header, a file shorter than it claims
        raise InputFileError(f"{path}: not a plain .npy array ({printable(exc)})") from None
    if not isinstance(arr, np.ndarray):
        raise InputFileError(f"{path}: not a plain .npy array")
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or list(arr.shape[:2]) != list(size):
        raise InputFileError(f"{path}: expected a {size[0]}x{size[1]}x3 uint8 array, got {arr.shape} {arr.dtype}")
    return np.array(arr)


def preprocess(images: np.ndarray, pre: Preprocessing) -> np.ndarray:
    x = images.astype(np.float32) * np.float32(pre.scale)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def classify_folder(
    runtime,
    folder: Path,
    batch: int = 16,
    top: int = 1,
    limits: LimitsSettings | None = None,
    say: Callable[[str], None] = lambda line: None,
):
    """Yield (path, [(label, probability), ...]) for every image under ``folder``; ``limits``: what an image may
    cost (the device profile's). ``say`` hears, once per kind and run, that images were resized or converted to
    fit the model (the first such image named)."""
    manifest = runtime.portfolio.manifest
    pre, labels = manifest.preprocessing, manifest.labels
    files = list_inputs(folder)
    said: set[str] = set()

    def noting(path: Path) -> Callable[[str], None]:
        def changed(what: str) -> None:
            kind = what.split(" ")[0] + (what.split(" ")[2] if what.startswith("converted") else "")
            if kind not in said:
                said.add(kind)
                say(f"note: {path} {what} to fit the model; so is every such image in this run (said once)")

        return changed

    for i in range(0, len(files), batch):
        chunk = files[i : i + batch]
        x = preprocess(np.stack([load_image(p, pre.size, limits, noting(p)) for p in chunk]), pre)
        logits = runtime.predict(x).astype(np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        for p, row in zip(chunk, probs):
            best = np.argsort(-row)[:top]
            yield p, [(labels[j] if j < len(labels) else str(j), float(row[j])) for j in best]
