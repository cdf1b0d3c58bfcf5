"""Image folders in, tensors out. The one place where images are read, converted and resized.

Layouts understood (detected from the folder names):
- MVTec AD: `train/good`, `test/good`, `test/<defect>`, `ground_truth/<defect>/<stem>_mask.png`
- BTAD:     `train/ok`, `test/ok`, `test/ko`, `ground_truth/ko/<stem>.png` (or `<stem>_mask.png`)
- the reference repository's: `train/good`, `test/good`, `test/bad` (masks optional)
Every image becomes RGB float32 [3, S, S] in [0, 1] (grayscale is replicated, odd sizes resized); masks become
{0, 1} float32 [S, S] (nearest-neighbour). Unreadable files raise UserError naming the file.

Every image and mask is decoded by `decode_image`, whose rules are:
- orientation: an EXIF Orientation tag is applied (what viewers show is what is scored, drawn and masked);
- bit depth: 8-bit / 255; a 16-bit file is scaled by the smallest of 10, 12, 14, 16 bits that holds its largest
  value (12-bit sensor data in a 16-bit PNG/TIFF is not left nearly black);
- masks: any non-zero pixel is defect (0/255, 0/1, label indices, 16-bit masks alike).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .contract import Placement, UserError, fit_image
from .tiling import TiledPlacements, TileLayout, TileSpec, cut_tiles, layout

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
NORMAL_NAMES = ("good", "ok")


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith("."))


# --- decoding: the one function every image and mask read goes through -------------------------------------------
# Orientation rule: an EXIF Orientation tag is applied (the image is scored, drawn and masked the way every viewer
# shows it). OpenCV applies the tag when the flags are not IMREAD_UNCHANGED, so ANYDEPTH|ANYCOLOR keeps 16-bit data
# and still rotates (an alpha channel is dropped, as it was before).
# Bit-depth rule: 8-bit data is divided by 255. 16-bit containers often hold 10-, 12- or 14-bit sensor data, so a
# 16-bit image is divided by 2^b - 1 where b is the PNG's sBIT (significant bits) when the file declares it, else the
# smallest of 10, 12, 14, 16 whose range holds the image's largest value (12-bit data with values up to 4095 ->
# / 4095, not / 65535). Each depth chosen is logged once, so a set whose files get different depths shows it.
_DECODE_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
_DEPTHS_16 = (10, 12, 14, 16)
_depths_logged: set[int] = set()


def decode_image(path: str | Path, what: str = "image") -> np.ndarray:
    """Decode an image file as stored on disk, EXIF orientation applied: uint8 or uint16, [H, W] (gray) or
    [H, W, 3] (BGR). Raises UserError naming the file when it is missing, empty, truncated or undecodable."""
    return decode_image_depth(path, what)[0]


def decode_image_depth(path: str | Path, what: str = "image") -> tuple[np.ndarray, int]:
    """`decode_image` and the bit depth the bit-depth rule gives the pixels (8; or 10, 12, 14, 16 for 16-bit files,
    the PNG's sBIT when it declares one)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, _DECODE_FLAGS) if data.size else None
    if img is None:
        raise UserError(f"{path}: unreadable or truncated {what}")
    if img.dtype not in (np.uint8, np.uint16):
        raise UserError(f"{path}: unsupported pixel type {img.dtype} (8- or 16-bit images only)")
    return img, significant_bits(img, _png_sbit(data) if img.dtype == np.uint16 else None)


def _png_sbit(data: np.ndarray) -> int | None:
    """The largest significant-bits value of a PNG's sBIT chunk, or None (not a PNG, or no sBIT before IDAT)."""
    b = data[:4096].tobytes()
    if not b.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    i = 8
    while i + 8 <= len(b):
        n = int.from_bytes(b[i:i + 4], "big")
        kind = b[i + 4:i + 8]
        if kind == b"sBIT":
            vals = b[i + 8:i + 8 + n]
            return max(vals) if vals else None
        if kind == b"IDAT":
            return None
        i += 12 + n
    return None


def significant_bits(img: np.ndarray, declared: int | None = None) -> int:
    """The bit depth the bit-depth rule gives `img`: 8 for uint8; for uint16 `declared` (a PNG's sBIT) when the
    pixels fit in it, else the smallest of 10, 12, 14, 16 that holds the largest value."""
    if img.dtype == np.uint8:
        return 8
    top = int(img.max()) if img.size else 0
    if declared is not None and 8 <= declared <= 16 and top <= (1 << declared) - 1:
        return int(declared)
    return next(b for b in _DEPTHS_16 if top <= (1 << b) - 1)


def to_unit_float(img: np.ndarray, source: str = "image", bits: int | None = None) -> np.ndarray:
    """uint8/uint16 pixels -> float32 in [0, 1], divided by 2^bits - 1 (`bits` None: by the bit-depth rule)."""
    if img.dtype not in (np.uint8, np.uint16):
        raise UserError(f"{source}: unsupported pixel type {img.dtype}")
    bits = bits or significant_bits(img)
    if img.dtype == np.uint16 and bits not in _depths_logged:
        _depths_logged.add(bits)
        log.info("16-bit images with values up to %d are read as %d-bit data (scaled by 1/%d); e.g. %s",
                 (1 << bits) - 1, bits, (1 << bits) - 1, source)
    return img.astype(np.float32) / float((1 << bits) - 1)


def read_image(path: str | Path, size: int | None = None, resize: str = "squash") -> np.ndarray:
    """Read an image as RGB float32 [3, S, S] in [0, 1] (bilinear/area resize to `size` by the `resize` policy,
    `contract.fit_image`), by the orientation and bit-depth rules of `decode_image_depth`. Raises UserError naming
    the file."""
    return read_image_placed(path, size, resize)[0]


def read_image_placed(path: str | Path, size: int | None = None, resize: str = "squash"
                      ) -> tuple[np.ndarray, Placement | None]:
    """`read_image` and where the image lies in the square input (None when `size` is None: not resized)."""
    img, bits = decode_image_depth(path)
    return to_rgb_float_placed(img, size, source=str(path), bits=bits, resize=resize)


def read_display_bgr(path: str | Path) -> np.ndarray:
    """The same image as `read_image` sees it (same orientation, same bit-depth scaling) as BGR uint8 [H, W, 3]
    at its own size, for overlays."""
    img, bits = decode_image_depth(path)
    u8 = np.clip(to_unit_float(img, str(path), bits) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(u8, cv2.COLOR_GRAY2BGR) if u8.ndim == 2 else u8


def to_rgb_float(img: np.ndarray, size: int | None = None, source: str = "image", bgr: bool = True,
                 bits: int | None = None, resize: str = "squash") -> np.ndarray:
    """Any decoded image (gray, gray+alpha, BGR, BGRA; 8 or 16 bit) -> RGB float32 [3, S, S] in [0, 1]
    (divided by 2^bits - 1; `bits` None: by the bit-depth rule; resized by the `resize` policy)."""
    return to_rgb_float_placed(img, size, source, bgr, bits, resize)[0]


def to_rgb_float_placed(img: np.ndarray, size: int | None = None, source: str = "image", bgr: bool = True,
                        bits: int | None = None, resize: str = "squash") -> tuple[np.ndarray, Placement | None]:
    """`to_rgb_float` and the image's `Placement` in the square input (None when `size` is None)."""
    img = to_unit_float(img, source, bits)
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
    pl = None
    if size is not None:
        img, pl = fit_image(img, size, resize)
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32), pl


# Mask rule: any non-zero pixel is defect (0/255, 0/1, 0/65535 and label-index masks all work; a colour mask counts
# a pixel whose grey value is non-zero). A lossy (JPEG) mask has faint non-zero noise around its edges: it is
# still read by the rule, with a warning naming the file.
def mask_to_binary(m: np.ndarray, source: str = "mask") -> np.ndarray:
    """A decoded mask (any depth, gray or colour) -> bool [H, W] by the mask rule."""
    if m.ndim == 3:
        m = m.max(axis=2)
    levels = np.unique(m)
    if levels.size > 2 and str(source).lower().endswith((".jpg", ".jpeg")):
        log.warning("%s: lossy JPEG mask with %d grey levels: every non-zero pixel counts as defect; save masks as "
                    "PNG", source, levels.size)
    return m > 0


def read_mask(path: str | Path, size: int | None = None, expect_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a defect mask as float32 {0, 1} [S, S] by the mask rule (any non-zero pixel is defect), nearest-neighbour
    resized to `size`. `expect_shape` (H, W) checks it matches its image. Raises UserError naming the file when it
    is unreadable or of the wrong size."""
    m = mask_to_binary(decode_image(path, "mask"), str(path))
    if expect_shape is not None and m.shape[:2] != tuple(expect_shape):
        raise UserError(f"{path}: mask is {m.shape[1]}x{m.shape[0]} but its image is "
                        f"{expect_shape[1]}x{expect_shape[0]}")
    if size is not None and m.shape[:2] != (size, size):
        m = cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
    return m.astype(np.float32)


def place_mask(mask: np.ndarray, pl: Placement) -> np.ndarray:
    """A mask at its image's own size, bool [src_h, src_w] -> the same mask in model-input coordinates, bool [S, S]:
    resized nearest-neighbour to the image's valid region, False on the letterbox fill."""
    out = np.zeros((pl.size, pl.size), bool)
    m = mask.astype(np.uint8)
    fitted = m if m.shape == (pl.height, pl.width) else \
        cv2.resize(m, (pl.width, pl.height), interpolation=cv2.INTER_NEAREST)
    out[pl.top:pl.top + pl.height, pl.left:pl.left + pl.width] = fitted > 0
    return out


def image_shape(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file as `read_image` sees it (EXIF orientation applied), decoding it (also proves it is
    readable). Raises UserError naming the file."""
    return decode_image(path).shape[:2]


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
    """The mask of a defect image: ground_truth/<defect>/<stem>_mask.<ext> or <stem>.<ext>, any image extension,
    extension case ignored (a mask on disk is never reported missing because of its extension)."""
    gt = root / "ground_truth" / defect
    if not gt.is_dir():
        return None
    by_stem: dict[str, list[Path]] = {}
    for p in list_images(gt):
        by_stem.setdefault(p.stem, []).append(p)
    for stem in (f"{img.stem}_mask", img.stem):
        hits = sorted(by_stem.get(stem, []), key=lambda p: (p.suffix.lower() != ".png", p.name))
        if hits:
            return hits[0]
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


def warn_small_tiled(n_small: int, n: int, spec: TileSpec, example: Path | str) -> None:
    """Log that `n_small` of `n` images are smaller than one tile at the tile scale on a side (padded)."""
    log.warning("tiling: %d of %d images are smaller than one %d-px tile at data.tile.scale=%g on a side (e.g. %s): "
                "padded by reflection, the padding ignored in scores", n_small, n, spec.size, spec.scale, example)


STATS_MAX_TILES = 512  # under tiling, the position-statistics images hold at most about this many tiles
STANDARDISE_MAX_TILES = 4096  # ... and those the backbone's feature standardisation is fitted on


def stats_paths(train_paths: list[Path], resize: str | TileSpec = "squash", max_tiles: int = STATS_MAX_TILES
                ) -> list[Path]:
    """`stats_training_paths`, and under tiling (`resize` a `TileSpec`) only as many evenly spaced images as hold
    about `max_tiles` tiles (judged by the first image's tile count; at least 2 images): per-position statistics
    of a tile position need hundreds of samples, not the tens of thousands a large training set's tiles give."""
    paths = stats_training_paths(train_paths)
    if isinstance(resize, TileSpec) and paths:
        img = read_image_placed(paths[0], None)[0]
        n = layout(int(img.shape[1]), int(img.shape[2]), resize).n_tiles
        paths = stats_training_paths(paths, max(2, -(-max_tiles // n)))
    return paths


def load_stack(paths: list[Path], size: int, resize: str | TileSpec = "squash") -> np.ndarray:
    """Read images into one float32 array [N, 3, S, S] (by the `resize` policy; a `TileSpec`: every tile of every
    image, [T, 3, S, S])."""
    return load_stack_placed(paths, size, resize)[0]


def read_image_tiles(path: str | Path, spec: TileSpec) -> tuple[np.ndarray, TileLayout]:
    """An image file -> (its tiles, RGB float32 [T, 3, S, S] in [0, 1], and their `TileLayout`) by the decoding rules
    of `read_image` and the tiling of `tiling.cut_tiles`. Raises UserError naming the file."""
    img = read_image_placed(path, None)[0]  # [3, H, W]
    tiles, lay = cut_tiles(img.transpose(1, 2, 0), spec)
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)), lay


def load_stack_placed(paths: list[Path], size: int, resize: str | TileSpec = "squash"
                      ) -> tuple[np.ndarray, list[Placement]]:
    """`load_stack` and each image's `Placement` in the square input (a `TileSpec`: a `tiling.TiledPlacements`,
    one Placement per tile, that knows which tiles form which image)."""
    if isinstance(resize, TileSpec):
        if resize.size != size:
            raise ValueError(f"tile size {resize.size} differs from the model's input size {size}")
        parts = [read_image_tiles(p, resize) for p in paths]
        tiles = np.concatenate([t for t, _ in parts]) if parts else np.zeros((0, 3, size, size), np.float32)
        return tiles, TiledPlacements([lay for _, lay in parts])
    out = np.zeros((len(paths), 3, size, size), np.float32)
    places: list[Placement] = []
    for i, p in enumerate(paths):
        out[i], pl = read_image_placed(p, size, resize)
        places.append(pl)  # type: ignore[arg-type]
    return out, places


class ImageFolderDataset:
    """Normal images for training (a torch-style map dataset; works with torch DataLoader without importing
    torch here). Returns float32 [3, S, S] arrays in [0, 1]; optional horizontal flip. With a `TileSpec` as `resize`
    the items are the tiles of every image, each at its place in the inference grid (`tiling.layout`), so training
    sees the tiles scoring will see; cached tiles are kept as uint8 (a quarter of the memory)."""

    def __init__(self, paths: list[Path], size: int, cache: bool = True, hflip: bool = False, seed: int = 0,
                 resize: str | TileSpec = "squash"):
        self.paths = list(paths)
        self.size = size
        self.resize = resize
        self.hflip = hflip
        self._rng = np.random.default_rng(seed)
        self._tiles: list[tuple[int, int]] | None = None  # (image, tile) of each item under tiling
        self._tile_cache: np.ndarray | None = None
        self._cache: list[np.ndarray] | None = None
        if isinstance(resize, TileSpec):
            self._tiles = []
            cached = []
            small: list[Path] = []
            for k, p in enumerate(self.paths):
                tiles, lay = read_image_tiles(p, resize)
                self._tiles += [(k, j) for j in range(lay.n_tiles)]
                if lay.padded:
                    small.append(p)
                if cache:
                    cached.append(np.clip(tiles * 255.0 + 0.5, 0, 255).astype(np.uint8))
            self._tile_cache = np.concatenate(cached) if cache and cached else None
            log.info("tiling: %d tiles of %d px from %d images (data.tile.scale=%g, overlap >= %d px)",
                     len(self._tiles), resize.size, len(self.paths), resize.scale, resize.overlap)
            if small:
                warn_small_tiled(len(small), len(self.paths), resize, small[0])
        elif cache:
            self._cache = [read_image(p, size, resize) for p in self.paths]

    def __len__(self) -> int:
        return len(self._tiles) if self._tiles is not None else len(self.paths)

    @property
    def item_image(self) -> np.ndarray:
        """int64 [len(self)]: the index in `paths` of each item's image (itself without tiling)."""
        if self._tiles is None:
            return np.arange(len(self.paths))
        return np.array([k for k, _ in self._tiles], np.int64)

    def exact_items(self) -> Iterator[np.ndarray]:
        """Every item in order, float32 [3, S, S] in [0, 1], exactly as calibration and scoring read it (tiles cut
        from the decoded image, not the uint8 tile cache, whose rounding moves features at a working scale other
        than 1); never flipped. For work done once per run on all items, such as the feature-token cache whose
        cells also become the kNN memory."""
        if self._tiles is None:
            for i in range(len(self.paths)):
                yield self._cache[i] if self._cache is not None else read_image(self.paths[i], self.size, self.resize)
            return
        assert isinstance(self.resize, TileSpec)
        for p in self.paths:
            yield from read_image_tiles(p, self.resize)[0]

    def _tile(self, i: int) -> np.ndarray:
        assert self._tiles is not None and isinstance(self.resize, TileSpec)
        if self._tile_cache is not None:
            return self._tile_cache[i].astype(np.float32) / 255.0
        k, j = self._tiles[i]
        return read_image_tiles(self.paths[k], self.resize)[0][j]

    def __getitem__(self, i: int) -> np.ndarray:
        if self._tiles is not None:
            img = self._tile(i)
        else:
            img = self._cache[i] if self._cache is not None else read_image(self.paths[i], self.size, self.resize)
        if self.hflip and self._rng.random() < 0.5:
            img = np.ascontiguousarray(img[:, :, ::-1])
        return img
