"""A synthetic product for demos and tests: textured tiles with scratches, spots and cracks, in the MVTec layout.

Nothing is downloaded: `make demo`, the tests and the agent's demo video all draw their images from here.
A second product (fine_texture, add_small_defect, write_small_defect_dataset, small_defect_video) has a fine texture
and defects of 3-15 px on images of 1000+ px, for developing small-defect inspection on tiles.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DEFECTS = ("scratch", "spot", "crack")


def normal_tile(rng: np.random.Generator, size: int = 160) -> np.ndarray:
    """A defect-free part: a brushed-metal-like tile (streaks, gentle illumination, sensor noise), BGR uint8."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = 0.55 + 0.05 * rng.standard_normal()
    freq = 14 + rng.uniform(-1.0, 1.0)
    phase = rng.uniform(0, 2 * np.pi)
    streaks = 0.06 * np.sin(2 * np.pi * (freq * xx + 0.15 * yy) + phase)
    light = 0.08 * (xx - 0.5) * rng.uniform(-1, 1) + 0.08 * (yy - 0.5) * rng.uniform(-1, 1)
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 0.8) * 0.02
    g = np.clip(base + streaks + light + noise, 0, 1)
    tint = np.array([0.97, 1.0, 1.03], np.float32)  # a slightly bluish metal, so colour handling is exercised
    img = np.clip(g[:, :, None] * tint[None, None, :], 0, 1)
    return (img * 255).astype(np.uint8)


def add_defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of `kind` on a copy of `img`. Returns (image, mask uint8 0/255)."""
    size = img.shape[0]
    out = img.copy()
    mask = np.zeros(img.shape[:2], np.uint8)
    lo, hi = int(size * 0.2), int(size * 0.8)
    if kind == "scratch":
        p1 = rng.integers(lo, hi, 2)
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(0.25, 0.45) * size
        p2 = np.clip(p1 + length * np.array([np.cos(ang), np.sin(ang)]), 2, size - 3).astype(int)
        thick = int(rng.integers(2, 4))
        cv2.line(mask, tuple(int(v) for v in p1), tuple(int(v) for v in p2), 255, thick)
        colour = 235
    elif kind == "spot":
        c = rng.integers(lo, hi, 2)
        axes = rng.integers(max(3, size // 28), max(5, size // 12), 2)
        cv2.ellipse(mask, (int(c[0]), int(c[1])), (int(axes[0]), int(axes[1])), float(rng.uniform(0, 180)), 0, 360,
                    255, -1)
        colour = 40
    elif kind == "crack":
        pts = [rng.integers(lo, hi, 2).astype(float)]
        direction = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(6, 10))):
            direction += rng.uniform(-0.7, 0.7)
            step = rng.uniform(0.03, 0.06) * size
            nxt = np.clip(pts[-1] + step * np.array([np.cos(direction), np.sin(direction)]), 2, size - 3)
            pts.append(nxt)
        cv2.polylines(mask, [np.array(pts, np.int32)], False, 255, 2)
        colour = 25
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECTS}")
    m = mask > 0
    out[m] = (0.25 * out[m] + 0.75 * colour).astype(np.uint8)
    return out, mask


def write_dataset(root: str | Path, n_train: int = 60, n_test_good: int = 12, n_test_defect: int = 6,
                  size: int = 160, seed: int = 0, defects: tuple[str, ...] = DEFECTS) -> Path:
    """Write a small MVTec-layout dataset of the synthetic product. Returns the root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for d in ("train/good", "test/good"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        cv2.imwrite(str(root / "train/good" / f"{i:03d}.png"), normal_tile(rng, size))
    for i in range(n_test_good):
        cv2.imwrite(str(root / "test/good" / f"{i:03d}.png"), normal_tile(rng, size))
    for kind in defects:
        (root / "test" / kind).mkdir(parents=True, exist_ok=True)
        (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n_test_defect):
            img, mask = add_defect(normal_tile(rng, size), kind, rng)
            cv2.imwrite(str(root / "test" / kind / f"{i:03d}.png"), img)
            cv2.imwrite(str(root / "ground_truth" / kind / f"{i:03d}_mask.png"), mask)
    return root


# --- a second product: fine texture, tiny defects, high resolution (for tiling) ------------------------------------
#
# A woven/brushed surface with a period of a few pixels, and defects of 3-15 px on images of 1000+ px: a defect covers
# about 0.0005-0.01 % of a 1024x1024 image, so it disappears when the whole image is squashed to a model's input size
# and can only be found on tiles at (near) full resolution.

SMALL_DEFECTS = ("pit", "pore", "scratch")

SMALL_DEFECT_BORDER = 16  # px: no defect pixel lies closer than this to the image edge
_PATCH_HALF = 9  # px: a defect is drawn in a (2 * _PATCH_HALF + 1)^2 window around its centre (all defects fit in 16)
_ALPHA_MIN = 0.25  # anti-aliased coverage below this is not drawn, so the mask is exactly the changed pixels
_MIN_SIDE = 2 * (SMALL_DEFECT_BORDER + _PATCH_HALF) + 2  # smallest image side a small defect can be placed on

# The product's fixed design; each normal image draws small variations around it (phase, gain, illumination).
_WEAVE_PERIOD = (6.0, 5.0)  # px, (x, y): the woven cells
_TWILL_PERIOD = 3.5  # px: diagonal ribs across the weave
_TWILL_ANGLE = np.deg2rad(38.0)
_FINE_TINT = np.array([0.93, 1.0, 1.05], np.float32)  # BGR: a slightly warm surface


def fine_texture(rng: np.random.Generator, height: int = 1024, width: int = 1024) -> np.ndarray:
    """A defect-free high-resolution part with a fine woven/brushed texture. Returns BGR uint8 [height, width, 3].

    The texture is a woven cell pattern (period 6 x 5 px) with diagonal twill ribs (period 3.5 px), band-limited grain
    (structures of about 1-3 px), horizontal brushing streaks, a gentle illumination gradient (at most about +-6 % across
    the image) and per-channel sensor noise (about 1.3 grey levels). Every draw from `rng` gives a different image
    (pattern phases, gain, brightness, gradient direction, noise) of statistically the same product. Grey level is
    about 120 (standard deviation within a 32x32 window: about 7.5 grey levels; range about 85-160).
    Takes about 0.06 s for 1024x1024 and 0.12 s for 1080x1920 on one CPU core.

    Raises ValueError if height or width is below 8.
    """
    h, w = int(height), int(width)
    if h < 8 or w < 8:
        raise ValueError(f"fine_texture: image must be at least 8x8 px, got {h}x{w}")
    x = np.arange(w, dtype=np.float32)
    y = np.arange(h, dtype=np.float32)
    two_pi = np.float32(2 * np.pi)
    px, py = (p * (1 + 0.003 * rng.uniform(-1, 1)) for p in _WEAVE_PERIOD)
    weave = np.outer(np.sin(two_pi * y / py + rng.uniform(0, 2 * np.pi)),
                     np.sin(two_pi * x / px + rng.uniform(0, 2 * np.pi))).astype(np.float32)
    # diagonal ribs sin(a x + b y + phi), written as two outer products so nothing is evaluated per pixel
    a = two_pi * np.cos(_TWILL_ANGLE) / _TWILL_PERIOD
    b = two_pi * np.sin(_TWILL_ANGLE) / _TWILL_PERIOD
    phi = rng.uniform(0, 2 * np.pi)
    twill = (np.outer(np.cos(b * y), np.sin(a * x + phi)) + np.outer(np.sin(b * y), np.cos(a * x + phi)))
    noise = rng.standard_normal((h, w), dtype=np.float32)
    grain = cv2.GaussianBlur(noise, (0, 0), 0.9) - cv2.GaussianBlur(noise, (0, 0), 2.5)  # band-limited: 1-3 px
    noise = rng.standard_normal((h, w), dtype=np.float32)
    streaks = cv2.GaussianBlur(cv2.boxFilter(noise, -1, (31, 1)), (0, 0), sigmaX=0.1, sigmaY=0.7)
    surface = 1.0 + 0.07 * weave + 0.035 * twill.astype(np.float32) + 0.16 * grain + 0.16 * streaks
    gx, gy = rng.uniform(-0.06, 0.06, 2)
    light = (0.49 + 0.012 * rng.standard_normal()) * (1 + 0.03 * rng.standard_normal())
    illumination = light * (1 + gx * (x / w - 0.5)[None, :] + gy * (y / h - 0.5)[:, None]).astype(np.float32)
    grey = surface * illumination
    img = grey[:, :, None] * _FINE_TINT[None, None, :] + rng.standard_normal((h, w, 3), dtype=np.float32) * 0.005
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _small_defect_profile(kind: str, dx: np.ndarray, dy: np.ndarray, rng: np.random.Generator,
                          size: float | None, width: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(factor, coverage) of one small defect on a window; dx, dy: offsets of the pixel centres from the defect centre.
    The image is multiplied by `factor` (1 outside the defect); coverage > 0 exactly where the defect is drawn."""

    def disk(r: float) -> np.ndarray:  # anti-aliased coverage of a disk of radius r
        return np.clip(r + 0.5 - np.hypot(dx, dy), 0.0, 1.0)

    if kind == "pit":  # a dark round spot, deepest in the middle
        r = (size if size is not None else rng.uniform(3.0, 8.0)) / 2
        cover = disk(r)
        depth = rng.uniform(0.28, 0.38)
        bowl = 0.75 + 0.25 * np.clip(1 - (dx**2 + dy**2) / r**2, 0, 1)
        factor = 1 - depth * cover * bowl
    elif kind == "pore":  # a dark hole with a bright rim
        r = (size if size is not None else rng.uniform(5.0, 12.0)) / 2
        cover = disk(r)
        core = disk(max(1.0, 0.55 * r))
        rim = np.clip(cover - core, 0, 1)
        factor = 1 - rng.uniform(0.32, 0.42) * core + rng.uniform(0.2, 0.28) * rim
    elif kind == "scratch":  # a thin straight line, lighter or darker than the surface, fading towards its ends
        length = size if size is not None else rng.uniform(8.0, 15.0)
        w = width if width is not None else rng.uniform(1.0, 2.0)
        ang = rng.uniform(0, np.pi)
        ux, uy = np.cos(ang), np.sin(ang)
        half = max(0.0, (length - w) / 2)  # the capsule's total extent along the line is `length`
        t = np.clip(dx * ux + dy * uy, -half, half)
        cover = np.clip(w / 2 + 0.5 - np.hypot(dx - t * ux, dy - t * uy), 0, 1)
        taper = 1 - 0.3 * (t / half) ** 2 if half > 0 else 1.0
        sign = 1.0 if rng.random() < 0.5 else -1.0
        factor = 1 + sign * rng.uniform(0.3, 0.4) * cover * taper
    else:
        raise ValueError(f"unknown small defect kind {kind!r}; choose from {SMALL_DEFECTS}")
    keep = cover >= _ALPHA_MIN
    return np.where(keep, factor, 1.0), np.where(keep, cover, 0.0)


def _draw_small_defect(img: np.ndarray, kind: str, rng: np.random.Generator, size: float | None = None,
                       width: float | None = None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """`add_small_defect` with an optional fixed size (diameter or length, px) and scratch width; also returns the
    defect's centre (x, y) in px."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected a BGR uint8 image [H, W, 3], got {img.dtype} {img.shape}")
    if kind not in SMALL_DEFECTS:
        raise ValueError(f"unknown small defect kind {kind!r}; choose from {SMALL_DEFECTS}")
    h, w = img.shape[:2]
    if min(h, w) < _MIN_SIDE:
        raise ValueError(f"image {h}x{w} too small for a small defect: need at least {_MIN_SIDE} px on each side")
    lo = SMALL_DEFECT_BORDER + _PATCH_HALF  # the window, and so every defect pixel, stays off the border
    cx, cy = rng.uniform(lo, w - 1 - lo), rng.uniform(lo, h - 1 - lo)
    x0, y0 = int(cx) - _PATCH_HALF, int(cy) - _PATCH_HALF
    n = 2 * _PATCH_HALF + 1
    dy, dx = np.mgrid[0:n, 0:n].astype(np.float64)
    factor, cover = _small_defect_profile(kind, dx + x0 - cx, dy + y0 - cy, rng, size, width)
    out = img.copy()
    window = out[y0:y0 + n, x0:x0 + n].astype(np.float32) * factor[:, :, None].astype(np.float32)
    out[y0:y0 + n, x0:x0 + n] = np.clip(window + 0.5, 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y0 + n, x0:x0 + n] = np.where(cover > 0, 255, 0).astype(np.uint8)
    return out, mask, (int(round(cx)), int(round(cy)))


def add_small_defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one tiny defect of `kind` (one of SMALL_DEFECTS) on a copy of `img` (BGR uint8 [H, W, 3]).

    - "pit": a dark round spot, 3-8 px diameter, 28-38 % darker (a little more in its middle);
    - "pore": a dark hole with a bright rim, 5-12 px outer diameter (hole 32-42 % darker, rim 20-28 % brighter);
    - "scratch": a straight line 8-15 px long and 1-2 px wide, 30-40 % lighter or darker, fading by 30 % to its ends.

    The defect lies anywhere at least SMALL_DEFECT_BORDER (16) px from the image edges; its bounding box is 3-16 px on
    its longer side (9-122 px in area: about 0.001-0.012 % of a 1024x1024 image). On the fine_texture product the mean
    |defect pixel - mean of a ring 2-5 px around it| is about 27-30 grey levels, a median 4.5x (2.6-6.6x) the ring's
    own mean absolute deviation (about 6.3 grey levels). Returns (image BGR uint8 [H, W, 3], mask uint8 [H, W] with 255 on exactly the
    changed pixels, 0 elsewhere).

    Raises ValueError for an unknown kind, an image that is not BGR uint8 [H, W, 3], or a side shorter than 52 px.
    """
    out, mask, _ = _draw_small_defect(img, kind, rng)
    return out, mask


def write_small_defect_dataset(root: str | Path, n_train: int = 120, n_test_good: int = 20, n_test_defect: int = 10,
                               height: int = 1024, width: int = 1024, seed: int = 0,
                               defects: tuple[str, ...] = SMALL_DEFECTS) -> Path:
    """Write an MVTec-layout dataset of the fine-texture product with tiny defects, as PNG:
    root/train/good/NNN.png, root/test/good/NNN.png, root/test/<kind>/NNN.png (n_test_defect per kind) and
    root/ground_truth/<kind>/NNN_mask.png (uint8 0/255), the naming of `write_dataset`. Images are height x width px
    (non-square allowed, e.g. 1080x1920). The same seed writes the same files. Returns the root.

    About 0.1 s per 1024x1024 image (generation plus PNG writing; a PNG is about 2.5 MB).
    Raises ValueError for an unknown defect kind, a negative count, or a side shorter than 52 px.
    """
    for kind in defects:
        if kind not in SMALL_DEFECTS:
            raise ValueError(f"unknown small defect kind {kind!r}; choose from {SMALL_DEFECTS}")
    if min(n_train, n_test_good, n_test_defect) < 0:
        raise ValueError("image counts must not be negative")
    if min(height, width) < _MIN_SIDE:
        raise ValueError(f"image {height}x{width} too small for small defects: need at least {_MIN_SIDE} px a side")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for d in ("train/good", "test/good"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        cv2.imwrite(str(root / "train/good" / f"{i:03d}.png"), fine_texture(rng, height, width))
    for i in range(n_test_good):
        cv2.imwrite(str(root / "test/good" / f"{i:03d}.png"), fine_texture(rng, height, width))
    for kind in defects:
        (root / "test" / kind).mkdir(parents=True, exist_ok=True)
        (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n_test_defect):
            img, mask = add_small_defect(fine_texture(rng, height, width), kind, rng)
            cv2.imwrite(str(root / "test" / kind / f"{i:03d}.png"), img)
            cv2.imwrite(str(root / "ground_truth" / kind / f"{i:03d}_mask.png"), mask)
    return root


# (kind, size px, scratch width px) of the defects a video carries in turn: all about 10 px across
_VIDEO_DEFECTS = (("pit", 8.0, None), ("scratch", 11.0, 2.0), ("pore", 10.0, None))


def small_defect_video(path: str | Path, frames: int = 60, height: int = 1080, width: int = 1920,
                       defect_frames: range | list[int] | tuple[int, ...] = range(20, 30), fps: float = 10,
                       seed: int = 0, codec: str = "MJPG") -> list[tuple[int, int, int]]:
    """Write an .avi of `frames` independent fine_texture frames (height x width px, BGR) at `fps`; each frame
    index in `defect_frames` carries one defect about 10 px across (in turn an 8 px pit, an 11 x 2 px scratch, a
    10 px pore). The same seed writes the same frames (before compression).

    codec: "MJPG" (lossy, about 0.3 MB a 1080p frame) or "FFV1" (lossless, about 3 MB a 1080p frame and slower to
    decode). A model trained on PNG images of this texture at a fine scale sees MJPG's 8 x 8 blocks as anomalies
    (the mean map level of a 1080p frame rose 5x under the scale-2 small-defect recipe, 2026-12-05): benchmark such a
    model on FFV1, and train a real product on images that went through its camera's codec.

    Returns [(frame_index, cx, cy), ...]: the defects drawn, their centres in px, in frame order.
    Note that MJPG is lossy: a 1 px structure is softened, so the video's defects are drawn at the larger sizes.
    About 0.15 s per 1080x1920 frame. Raises ValueError for a frame index outside [0, frames), frames < 1 or a side
    shorter than 52 px, and OSError if cv2.VideoWriter cannot open `path`.
    """
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    if codec not in ("MJPG", "FFV1"):
        raise ValueError(f"codec must be 'MJPG' or 'FFV1', got {codec!r}")
    marked = sorted(set(int(i) for i in defect_frames))
    if marked and (marked[0] < 0 or marked[-1] >= frames):
        raise ValueError(f"defect_frames must lie in [0, {frames}), got {marked[0]}..{marked[-1]}")
    if min(height, width) < _MIN_SIDE:
        raise ValueError(f"frame {height}x{width} too small for small defects: need at least {_MIN_SIDE} px a side")
    rng = np.random.default_rng(seed)
    fourcc = cv2.VideoWriter_fourcc(*codec)  # type: ignore[attr-defined]
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, fourcc, float(fps), (int(width), int(height)))
    if not writer.isOpened():
        raise OSError(f"{path}: cv2.VideoWriter could not open an {codec} video for writing")
    drawn: list[tuple[int, int, int]] = []
    marked_set = set(marked)
    try:
        for i in range(frames):
            frame = fine_texture(rng, height, width)
            if i in marked_set:
                kind, size, thick = _VIDEO_DEFECTS[len(drawn) % len(_VIDEO_DEFECTS)]
                frame, _, (cx, cy) = _draw_small_defect(frame, kind, rng, size=size, width=thick)
                drawn.append((i, cx, cy))
            writer.write(frame)
    finally:
        writer.release()
    return drawn
