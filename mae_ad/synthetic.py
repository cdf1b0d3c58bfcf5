"""A synthetic product for demos and tests: textured tiles with scratches, spots and cracks, in the MVTec layout.

Nothing is downloaded: `make demo`, the tests and the agent's demo video all draw their images from here.
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
