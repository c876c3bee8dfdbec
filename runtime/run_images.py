"""``edgeshift run``: classify a folder of images with a portfolio. Pillow is optional (.npy files work
without it). Torch-free."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeshift.core.errors import EdgeshiftError, InputFileError

from .manifest import Preprocessing

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_inputs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputFileError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + (".npy",))
    if not files:
        raise InputFileError(f"{folder} has no images (*.jpg, *.png, ... or *.npy HxWxC uint8 arrays)")
    return files


def load_image(path: Path, size: list[int]) -> np.ndarray:
    """HxWx3 uint8 at the manifest's size."""
    if path.suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or list(arr.shape[:2]) != list(size):
            raise InputFileError(f"{path}: expected a {size[0]}x{size[1]}x3 uint8 array, got {arr.shape} {arr.dtype}")
        return arr
    try:
        from PIL import Image
    except ImportError:
        raise EdgeshiftError(
            f"reading {path.suffix} images needs Pillow: pip install pillow (or pass .npy arrays)"
        ) from None
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size[1], size[0])), dtype=np.uint8)
    except Exception as exc:
        raise InputFileError(f"cannot decode image {path}: {exc}") from None


def preprocess(images: np.ndarray, pre: Preprocessing) -> np.ndarray:
    x = images.astype(np.float32) * np.float32(pre.scale)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def classify_folder(runtime, folder: Path, batch: int = 16, top: int = 1):
    """Yield (path, [(label, probability), ...]) for every image under ``folder``."""
    manifest = runtime.portfolio.manifest
    pre, labels = manifest.preprocessing, manifest.labels
    files = list_inputs(folder)
    for i in range(0, len(files), batch):
        chunk = files[i : i + batch]
        x = preprocess(np.stack([load_image(p, pre.size) for p in chunk]), pre)
        logits = runtime.predict(x).astype(np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        for p, row in zip(chunk, probs):
            best = np.argsort(-row)[:top]
            yield p, [(labels[j] if j < len(labels) else str(j), float(row[j])) for j in best]
