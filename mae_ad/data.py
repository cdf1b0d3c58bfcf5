"""Image folders in, tensors out. The one place where images are read, converted and resized.

Layouts understood (detected from the folder names):
- MVTec AD: `train/good`, `test/good`, `test/<defect>`, `ground_truth/<defect>/<stem>_mask.png`
- BTAD:     `train/ok`, `test/ok`, `test/ko`, `ground_truth/ko/<stem>.png` (or `<stem>_mask.png`)
- the reference repository's: `train/good`, `test/good`, `test/bad` (masks optional)
Every image becomes RGB float32 [3, S, S] in [0, 1] (grayscale is replicated, odd sizes resized); masks become
{0, 1} float32 [S, S] (nearest-neighbour). Unreadable files raise UserError naming the file.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .contract import UserError

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
NORMAL_NAMES = ("good", "ok")


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith("."))


def read_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """Read an image as RGB float32 [3, S, S] in [0, 1] (bilinear/area resize to `size`)."""
    path = Path(path)
    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise UserError(f"{path}: image not found")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise UserError(f"{path}: unreadable or truncated image")
    return to_rgb_float(img, size, source=str(path))


def to_rgb_float(img: np.ndarray, size: int | None = None, source: str = "image", bgr: bool = True) -> np.ndarray:
    """Any decoded image (gray, gray+alpha, BGR, BGRA; 8 or 16 bit) -> RGB float32 [3, S, S] in [0, 1]."""
    if img.dtype == np.uint16:
        img = (img / 257.0).astype(np.float32)
    elif img.dtype == np.uint8:
        img = img.astype(np.float32)
    else:
        raise UserError(f"{source}: unsupported pixel type {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 2:
        img = np.repeat(img[:, :, :1], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    elif not (img.ndim == 3 and img.shape[2] == 3):
        raise UserError(f"{source}: unsupported image shape {img.shape}")
    if bgr:
        img = img[:, :, ::-1]
    if size is not None and img.shape[:2] != (size, size):
        interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_LINEAR
        img = cv2.resize(np.ascontiguousarray(img), (size, size), interpolation=interp)
    return np.ascontiguousarray((img / 255.0).transpose(2, 0, 1), dtype=np.float32)


def read_mask(path: str | Path, size: int | None = None, expect_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a defect mask as float32 {0, 1} [S, S]. `expect_shape` (H, W) checks it matches its image."""
    path = Path(path)
    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise UserError(f"{path}: mask not found")
    m = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if m is None:
        raise UserError(f"{path}: unreadable or truncated mask")
    if expect_shape is not None and m.shape[:2] != tuple(expect_shape):
        raise UserError(f"{path}: mask is {m.shape[1]}x{m.shape[0]} but its image is "
                        f"{expect_shape[1]}x{expect_shape[0]}")
    if size is not None and m.shape[:2] != (size, size):
        m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST)
    return (m >= 128).astype(np.float32)


def image_shape(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file, decoding it (also proves it is readable)."""
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise UserError(f"{path}: unreadable or truncated image")
    return img.shape[:2]


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 defect
    defect: str  # "good" for normal images
    mask: Path | None = None


@dataclass
class DatasetIndex:
    root: Path
    layout: str
    train: list[Path]
    test: list[Sample]

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect for s in self.test if s.label == 1})


def _find_mask(root: Path, defect: str, img: Path) -> Path | None:
    gt = root / "ground_truth" / defect
    if not gt.is_dir():
        return None
    for name in (f"{img.stem}_mask.png", f"{img.stem}.png", f"{img.stem}_mask{img.suffix}", img.name):
        p = gt / name
        if p.is_file():
            return p
    return None


def index_dataset(root: str | Path, need_test: bool = False) -> DatasetIndex:
    """Find the training (normal) images and the labelled test images under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found")
    train_dir = next((root / "train" / n for n in NORMAL_NAMES if (root / "train" / n).is_dir()), None)
    if train_dir is None:
        raise UserError(f"{root}: no train/good (MVTec) or train/ok (BTAD) folder")
    layout = "btad" if train_dir.name == "ok" else "mvtec"
    train = list_images(train_dir)
    test: list[Sample] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        for sub in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            normal = sub.name in NORMAL_NAMES
            if sub.name == "bad" and layout == "mvtec":
                layout = "good-bad"
            for img in list_images(sub):
                mask = None if normal else _find_mask(root, sub.name, img)
                test.append(Sample(img, 0 if normal else 1, "good" if normal else sub.name, mask))
    if need_test:
        if not test:
            raise UserError(f"{root / 'test'}: no test images (expected test/good and test/<defect> folders)")
        if not any(s.label == 0 for s in test) or not any(s.label == 1 for s in test):
            raise UserError(f"{root / 'test'}: needs both normal (good/ok) and defect images to evaluate")
    return DatasetIndex(root, layout, train, test)


def require_train_images(index: DatasetIndex, minimum: int = 2) -> list[Path]:
    if len(index.train) < minimum:
        where = index.root / "train"
        raise UserError(f"{where}: found {len(index.train)} normal training images, need at least {minimum}")
    return index.train


def split_holdout(paths: list[Path], fraction: float, minimum: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Deterministic split of normal images into (train, calibration holdout)."""
    if len(paths) < minimum + 1:
        raise UserError(f"need at least {minimum + 1} normal images for training plus calibration, got {len(paths)}")
    order = list(paths)
    random.Random(seed).shuffle(order)
    n_hold = min(len(order) - 1, max(minimum, int(round(len(order) * fraction))))
    hold = sorted(order[:n_hold])
    train = sorted(order[n_hold:])
    return train, hold


STATS_MAX_TRAIN_IMAGES = 512  # calibration.stats_source=train uses at most this many training images


def stats_training_paths(train_paths: list[Path], limit: int = STATS_MAX_TRAIN_IMAGES) -> list[Path]:
    """The training images calibration.stats_source=train takes statistics from: all of them, or `limit`
    evenly spaced ones (sorted order, so the same images every time)."""
    paths = sorted(train_paths)
    if len(paths) <= limit:
        return paths
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]


def load_stack(paths: list[Path], size: int) -> np.ndarray:
    """Read images into one float32 array [N, 3, S, S]."""
    if not paths:
        return np.zeros((0, 3, size, size), np.float32)
    return np.stack([read_image(p, size) for p in paths])


class ImageFolderDataset:
    """Normal images for training (a torch-style map dataset; works with torch DataLoader without importing
    torch here). Returns float32 [3, S, S] arrays in [0, 1]; optional horizontal flip."""

    def __init__(self, paths: list[Path], size: int, cache: bool = True, hflip: bool = False, seed: int = 0):
        self.paths = list(paths)
        self.size = size
        self.hflip = hflip
        self._rng = np.random.default_rng(seed)
        self._cache: list[np.ndarray] | None = [read_image(p, size) for p in self.paths] if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        img = self._cache[i] if self._cache is not None else read_image(self.paths[i], self.size)
        if self.hflip and self._rng.random() < 0.5:
            img = np.ascontiguousarray(img[:, :, ::-1])
        return img
