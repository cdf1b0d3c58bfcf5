"""Frames -> anomaly maps and scores through an engine, as the agent scores them: the model's resize policy and score
rule read from its metadata (`FramePolicy`), ROI, tiling or squash/letterbox (`agent.preprocess`), the engine in
chunks of at most `model.tile_batch` tiles, stitched or valid-region maps. The loop (`agent.loop.Agent`) and the
per-camera threshold (`agent.teach`) both score through `score_frames`, so a threshold taught on a camera's normal
frames is on the scale the agent compares with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from mae_ad.contract import RESIZE_POLICIES, Prediction, UserError
from mae_ad.tiling import TileSpec, spec_from

from .backend import Backend
from .config import CameraSection
from .preprocess import Crop, preprocess, preprocess_tiles, stitched_view, valid_view


@dataclass(frozen=True)
class FramePolicy:
    """How a model wants its frames: `resize` (squash, letterbox or tile), the image-score rule (`reduce`,
    `topk_fraction`) and, for a tiled model, its `TileSpec`."""

    resize: str = "squash"
    reduce: str = "max"
    topk_fraction: float = 0.01
    tile: TileSpec | None = None

    @classmethod
    def of(cls, backend: Backend, where: str) -> FramePolicy:
        """The policy in the metadata of an open engine; models without it were squashed. Raises UserError naming
        `where` (the model's path or key) for an unknown resize policy or a bad tiling."""
        meta = backend.meta
        resize = meta.input.resize
        if resize not in RESIZE_POLICIES:
            raise UserError(f"{where}: unknown input.resize {resize!r} in the model metadata (this agent knows "
                            f"{', '.join(RESIZE_POLICIES)})")
        reduce, topk = ("max", 0.01) if meta.scoring is None else (meta.scoring.reduce, meta.scoring.topk_fraction)
        tile = None
        if resize == "tile":
            try:
                tile = spec_from(meta.input, backend.input_size)
            except ValueError as e:
                raise UserError(f"{where}: bad tiling in the model metadata: {e}") from None
        return cls(resize, reduce, topk, tile)


@dataclass(frozen=True)
class ScoredFrame:
    """One frame's result: `amap` [h, w] float32 (the stitched map over the scaled ROI, the ROI's valid region under
    letterbox, or the model-size map [S, S] / [1, S, S] under squash), `rgb` uint8 [h, w, 3] the image the map lies
    on, `score` by the model's reduce rule, `crop` where it came from in the frame, `tiles` the engine inputs it
    took (1 untiled)."""

    amap: np.ndarray
    rgb: np.ndarray
    score: float
    crop: Crop
    tiles: int = 1


def score_frames(backend: Backend, policy: FramePolicy, items: list[tuple[CameraSection, np.ndarray]],
                 tile_batch: int = 8) -> tuple[list[ScoredFrame], tuple[float, float, float]]:
    """Score `items` [(camera, BGR/RGB/grey uint8 frame)] as one engine turn. Untiled: the frames go through the
    engine as one batch; tiled: all their tiles, in chunks of at most `tile_batch` (and the engine's `max_batch`).
    Returns (one ScoredFrame per item, (t0, t1, t2) monotonic times: preprocessing t0-t1, engine t1-t2).
    Raises ValueError naming the engine (`Prediction.checked`) when it returns maps or scores of the wrong shape."""
    t0 = time.monotonic()
    out: list[ScoredFrame] = []
    if policy.tile is not None:
        prepped = [preprocess_tiles(img, cam, policy.tile) for cam, img in items]
        x = np.concatenate([p[0] for p in prepped])
        t1 = time.monotonic()
        mb = min(backend.max_batch or len(x), tile_batch)
        maps = np.concatenate([Prediction.checked(*backend.infer(x[i:i + mb]), f"backend {backend.name}").maps
                               for i in range(0, len(x), mb)])
        t2 = time.monotonic()
        k = 0
        for _, crop, lay, rgb in prepped:
            amap, score = stitched_view(maps[k:k + lay.n_tiles], lay, policy.reduce, policy.topk_fraction)
            k += lay.n_tiles
            out.append(ScoredFrame(amap, rgb, score, crop, lay.n_tiles))
        return out, (t0, t1, t2)
    size = backend.input_size
    prepped2 = [preprocess(img, cam, size, policy.resize) for cam, img in items]
    xb = np.stack([p[0] for p in prepped2])
    t1 = time.monotonic()
    maps, scores = Prediction.checked(*backend.infer(xb), f"backend {backend.name}")
    t2 = time.monotonic()
    for j, (_, crop, rgb) in enumerate(prepped2):
        amap, rgb_v, score = valid_view(maps[j], rgb, float(scores[j]), crop, policy.reduce, policy.topk_fraction)
        out.append(ScoredFrame(amap, rgb_v, score, crop))
    return out, (t0, t1, t2)
