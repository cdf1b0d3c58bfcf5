"""A broad corpus of procedural surface textures, for pretraining a base MAE once (no ImageNet weights here).

The ImageNet MAE checkpoint the reference design starts from cannot be fetched on these machines. This module
draws a corpus that can be made anywhere: stationary textures of the kinds industrial surfaces are made of
(fractal noise, brushed / oriented streaks, gratings and weaves, cells, grains, smooth shading) at random scales,
contrasts, blurs, illuminations and tints, grey and colour. A base trained on it with `mae-ad train` learns
generic local inpainting; each product then adapts it (LoRA or fine-tuning) with `model.pretrained: <base bundle>`.

The corpus deliberately holds no isolated marks (scratches, spots, holes): the base must not learn that such
marks are ordinary and inpaint them. It is not drawn from, or tuned to, any product's defect set.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from .contract import UserError, staged_dir

Field = np.ndarray  # float32 [S, S], roughly in [0, 1]


def _unit(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo + 1e-8)).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return yy, xx


def fractal_noise(rng: np.random.Generator, size: int) -> Field:
    """Sum of octaves of smoothly upsampled white noise (clouds, mottling, sand at fine scales)."""
    out = np.zeros((size, size), np.float32)
    persistence = rng.uniform(0.35, 0.8)
    cells = int(rng.integers(2, 6))
    amp = 1.0
    while cells <= size:
        layer = rng.standard_normal((cells, cells)).astype(np.float32)
        out += amp * cv2.resize(layer, (size, size), interpolation=cv2.INTER_CUBIC)
        amp *= persistence
        cells *= 2
    return _unit(out)


def oriented_streaks(rng: np.random.Generator, size: int) -> Field:
    """Noise smeared along one direction: brushed metal, wood grain, ground or rolled surfaces."""
    pad = int(size * 0.5)
    n = size + 2 * pad
    noise = rng.standard_normal((n, n)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), rng.uniform(0.5, 2.0))
    length = int(rng.integers(9, 61)) | 1
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), rng.uniform(0, 180), 1.0)
    kernel = cv2.warpAffine(kernel, rot, (length, length))
    kernel /= kernel.sum() + 1e-8
    out = cv2.filter2D(noise, -1, kernel)[pad:pad + size, pad:pad + size]
    return _unit(out)


def gratings(rng: np.random.Generator, size: int) -> Field:
    """One to three sinusoids with phase wobble: machined, knurled, embossed or printed periodic surfaces."""
    yy, xx = _grid(size)
    out = np.zeros((size, size), np.float32)
    wobble = fractal_noise(rng, size) - 0.5
    for _ in range(int(rng.integers(1, 4))):
        ang = rng.uniform(0, np.pi)
        freq = rng.uniform(3, 24)
        phase = 2 * np.pi * (freq * (np.cos(ang) * xx + np.sin(ang) * yy)) + rng.uniform(0, 2 * np.pi)
        out += rng.uniform(0.4, 1.0) * np.sin(phase + rng.uniform(0, 3) * wobble)
    if rng.random() < 0.3:  # sharpen into a square-ish wave
        out = np.tanh(rng.uniform(2, 6) * out)
    return _unit(out)


def weave(rng: np.random.Generator, size: int) -> Field:
    """Product of two crossed gratings: woven fabric, meshes, perforated and knurled sheet."""
    yy, xx = _grid(size)
    ang = rng.uniform(0, np.pi)
    freq = rng.uniform(4, 20)
    u = np.cos(ang) * xx + np.sin(ang) * yy
    v = -np.sin(ang) * xx + np.cos(ang) * yy
    a = np.sin(2 * np.pi * freq * u + rng.uniform(0, 6.3))
    b = np.sin(2 * np.pi * freq * rng.uniform(0.7, 1.4) * v + rng.uniform(0, 6.3))
    out = np.abs(a) * np.abs(b) if rng.random() < 0.5 else a * b
    return _unit(out + 0.15 * (fractal_noise(rng, size) - 0.5))


def cells(rng: np.random.Generator, size: int) -> Field:
    """Distance to the nearest of many random seeds: cellular, granular and cast surfaces."""
    n_seeds = int(rng.integers(20, 300))
    img = np.full((size, size), 255, np.uint8)
    pts = rng.integers(0, size, (n_seeds, 2))
    img[pts[:, 0], pts[:, 1]] = 0
    dist = cv2.distanceTransform(img, cv2.DIST_L2, 5).astype(np.float32)
    out = np.sqrt(dist) if rng.random() < 0.5 else -dist
    return _unit(out)


def grains(rng: np.random.Generator, size: int) -> Field:
    """Dense blurred speckle of random density and grain size: sintered, sand-blasted, paper, concrete."""
    density = rng.uniform(0.05, 0.6)
    speckle = (rng.random((size, size)) < density).astype(np.float32)
    speckle = cv2.GaussianBlur(speckle, (0, 0), rng.uniform(0.6, 3.0))
    return _unit(speckle + 0.3 * fractal_noise(rng, size))


def shading(rng: np.random.Generator, size: int) -> Field:
    """Smooth low-frequency shading only: flat painted or moulded parts under uneven light."""
    yy, xx = _grid(size)
    gx, gy = rng.uniform(-1, 1, 2)
    cx, cy = rng.uniform(0, 1, 2)
    radial = (xx - cx) ** 2 + (yy - cy) ** 2
    out = gx * xx + gy * yy + rng.uniform(-1.5, 1.5) * radial + 0.05 * fractal_noise(rng, size)
    return _unit(out)


FAMILIES: dict[str, Callable[[np.random.Generator, int], Field]] = {
    "fractal": fractal_noise, "streaks": oriented_streaks, "gratings": gratings, "weave": weave,
    "cells": cells, "grains": grains, "shading": shading,
}


def texture(rng: np.random.Generator, size: int = 160, family: str | None = None) -> tuple[np.ndarray, str]:
    """One corpus image, BGR uint8 [size, size, 3], and the name of its main texture family."""
    name = family or str(rng.choice(sorted(FAMILIES)))
    field = FAMILIES[name](rng, size)
    if rng.random() < 0.35:  # a second family blended in: real surfaces mix several
        other = FAMILIES[str(rng.choice(sorted(FAMILIES)))](rng, size)
        field = _unit(field + rng.uniform(0.2, 0.7) * other)
    # contrast / gamma / brightness: dark and bright parts, low- and high-contrast surfaces
    contrast = rng.uniform(0.1, 0.9)
    field = np.clip(rng.uniform(0.1, 0.9) + contrast * (field - 0.5), 0, 1) ** rng.uniform(0.6, 1.6)
    # illumination: a gradient and a vignette
    yy, xx = _grid(size)
    light = 1 + rng.uniform(-0.3, 0.3) * (xx - 0.5) + rng.uniform(-0.3, 0.3) * (yy - 0.5)
    light -= rng.uniform(0, 0.4) * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    field = field * light
    # optics and sensor: defocus and noise
    if rng.random() < 0.5:
        field = cv2.GaussianBlur(field.astype(np.float32), (0, 0), rng.uniform(0.3, 1.5))
    field = field + rng.uniform(0.0, 0.03) * rng.standard_normal((size, size)).astype(np.float32)
    field = np.clip(field, 0, 1).astype(np.float32)
    if rng.random() < 0.5:  # grey (monochrome cameras, metals, ceramics)
        img = np.repeat(field[:, :, None], 3, axis=2)
    else:  # a tint, sometimes a second texture's chroma
        tint = rng.uniform(0.4, 1.0, 3).astype(np.float32)
        img = field[:, :, None] * tint[None, None, :] / tint.max()
        if rng.random() < 0.3:
            chroma = fractal_noise(rng, size)[:, :, None] * rng.uniform(-0.2, 0.2, 3).astype(np.float32)
            img = img + chroma
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), name


def write_corpus(root: str | Path, n: int = 3000, size: int = 160, seed: int = 0) -> dict[str, int]:
    """Write `n` corpus images as `root/train/good/NNNNN.png` (the layout `mae-ad train` reads). The directory
    is written in a staging folder and renamed into place, so a failure leaves nothing half-written.
    Returns how many images of each family were drawn."""
    if n < 2:
        raise UserError(f"--n {n}: a corpus needs at least 2 images")
    if size < 16:
        raise UserError(f"--size {size}: images must be at least 16 px")
    rng = np.random.default_rng(seed)
    counts = {name: 0 for name in FAMILIES}
    with staged_dir(root, what="corpus") as d:
        good = d / "train" / "good"
        good.mkdir(parents=True)
        for i in range(n):
            img, name = texture(rng, size)
            counts[name] += 1
            if not cv2.imwrite(str(good / f"{i:05d}.png"), img):
                raise UserError(f"{root}: cannot write corpus image {i:05d}.png")
    return counts
