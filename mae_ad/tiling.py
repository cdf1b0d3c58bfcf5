"""Tiling (data.resize=tile): a large image or frame is scored as overlapping model-size tiles, their maps stitched.

An image of H x W pixels is first scaled by `TileSpec.scale` to the working size (round(H * scale) x round(W * scale));
a side shorter than the tile is padded by reflection up to it (the padding is ignored, as under letterbox). The
working image is cut into S x S tiles (S = model.img_size) on a grid whose neighbours overlap by at least
`TileSpec.overlap` pixels: along a side of L >= S pixels there are n = ceil((L - overlap) / (S - overlap)) tiles at
offsets round(linspace(0, L - S, n)), so the first and last tile touch the image's edges and the overlaps are as even
as the integer grid allows. Every tile goes through the scorer unchanged (one batch per image), so the exported graph,
its TensorRT engine and the calibration statistics all stay those of an S x S input; per-pixel (position) statistics
are then statistics of a position within a tile, fitted over every tile of the normal images.

Stitching blends the tile maps with a separable ramp weight that falls linearly from 1 to about 0 over the outer
`overlap` pixels of each tile side (`tile_weight`), so a pixel seen by two tiles takes mostly the value of the tile in
which it lies further from the edge (tile borders are where the backbone's padding and the smoothing's reflection
act); pixels seen by one tile take its value. The image score is reduced from the stitched map over the image (not
the padding) by the scorer's rule (max, or the mean of the top `topk_fraction` of its pixels). Maps are compared with
ground truth at the image's own size (`stitched_to_source`: the stitched map is resized, the mask never is).

The tiling idea (overlapping crops scored independently, their maps merged) is the one of anomalib's `Tiler` and of
SAHI's sliced inference; this module is torch-free so the agent uses it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .contract import Placement


@dataclass(frozen=True)
class TileSpec:
    """size: tile side in working pixels (= model.img_size); overlap: minimum overlap of neighbouring tiles in working
    pixels (0 <= overlap <= size / 2); scale: working size / original size (> 0; 1 = native resolution)."""

    size: int
    overlap: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"tile size {self.size}: must be at least 1")
        if not 0 <= self.overlap <= self.size // 2:
            raise ValueError(f"data.tile.overlap: {self.overlap} must be at least 0 and at most half the tile "
                             f"({self.size} px, model.img_size)")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"data.tile.scale: {self.scale} must be a positive number")


def spec_from(data: Any, img_size: int) -> TileSpec | None:
    """The `TileSpec` of a config's data section (or a metadata InputSpec with tile_scale/tile_overlap) for a model of
    `img_size`; None unless its resize policy is 'tile'."""
    if getattr(data, "resize", "squash") != "tile":
        return None
    tile = getattr(data, "tile", None)
    if tile is not None:
        return TileSpec(img_size, int(tile.overlap), float(tile.scale))
    return TileSpec(img_size, int(getattr(data, "tile_overlap", None) or 0), float(getattr(data, "tile_scale", None)
                                                                                   or 1.0))


def working_size(src_h: int, src_w: int, scale: float) -> tuple[int, int]:
    """(height, width) of an src_h x src_w image scaled by `scale` (each at least 1 px)."""
    return max(1, int(round(src_h * scale))), max(1, int(round(src_w * scale)))


def tile_offsets(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along a side of `length` working pixels (a side shorter than the tile is padded to
    one tile: [0]). Raises ValueError for overlap >= size."""
    if not 0 <= overlap < size:
        raise ValueError(f"overlap {overlap} must be at least 0 and smaller than the tile ({size})")
    if length <= size:
        return [0]
    n = math.ceil((length - overlap) / (size - overlap))
    return [int(v) for v in np.round(np.linspace(0, length - size, n)).astype(int)]


@dataclass(frozen=True)
class TileLayout:
    """How one image was tiled: its own size, its working size (scaled, before padding), the padded canvas, and each
    tile's (top, left) offset on the canvas, rows first."""

    src_h: int
    src_w: int
    work_h: int
    work_w: int
    size: int
    overlap: int
    offsets: tuple[tuple[int, int], ...]

    @property
    def canvas(self) -> tuple[int, int]:
        """(height, width) of the padded working image: at least one tile each way."""
        return max(self.work_h, self.size), max(self.work_w, self.size)

    @property
    def n_tiles(self) -> int:
        return len(self.offsets)

    @property
    def padded(self) -> bool:
        """Whether the working image is smaller than one tile on a side (padded by reflection)."""
        return min(self.work_h, self.work_w) < self.size

    def tile_placement(self, i: int) -> Placement:
        """Tile i's valid region (the image, not the padding) as a `Placement` in the S x S input."""
        top, left = self.offsets[i]
        h = max(0, min(self.size, self.work_h - top))
        w = max(0, min(self.size, self.work_w - left))
        return Placement(self.size, 0, 0, h, w, h, w)


def layout(src_h: int, src_w: int, spec: TileSpec) -> TileLayout:
    """The `TileLayout` of an src_h x src_w image under `spec`. Raises ValueError for an empty image."""
    if src_h < 1 or src_w < 1:
        raise ValueError(f"cannot tile a {src_w}x{src_h} image")
    wh, ww = working_size(src_h, src_w, spec.scale)
    ys = tile_offsets(wh, spec.size, spec.overlap)
    xs = tile_offsets(ww, spec.size, spec.overlap)
    return TileLayout(src_h, src_w, wh, ww, spec.size, spec.overlap, tuple((y, x) for y in ys for x in xs))


def cut_tiles(img: np.ndarray, spec: TileSpec) -> tuple[np.ndarray, TileLayout]:
    """An image [H, W] or [H, W, C] (any dtype cv2 resizes) -> (tiles [T, S, S] or [T, S, S, C] of its dtype, layout).
    Scaling: area averaging when the image shrinks, bilinear when it grows; padding: reflection."""
    import cv2

    lay = layout(int(img.shape[0]), int(img.shape[1]), spec)
    if (lay.work_h, lay.work_w) != (lay.src_h, lay.src_w):
        shrink = lay.work_h < lay.src_h and lay.work_w < lay.src_w
        img = cv2.resize(np.ascontiguousarray(img), (lay.work_w, lay.work_h),
                         interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    ch, cw = lay.canvas
    if (ch, cw) != (lay.work_h, lay.work_w):
        img = np.pad(img, [(0, ch - lay.work_h), (0, cw - lay.work_w)] + [(0, 0)] * (img.ndim - 2), mode="reflect")
    s = spec.size
    tiles = np.stack([img[y:y + s, x:x + s] for y, x in lay.offsets])
    return np.ascontiguousarray(tiles), lay


def tile_weight(size: int, overlap: int) -> np.ndarray:
    """float32 [S, S] blending weight: the outer product of a ramp rising from 0.5/ramp to 1 over the first and last
    `overlap` pixels of a side (ramp = max(1, overlap)); all ones when overlap is 0."""
    d = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float32)
    r = np.minimum(1.0, (d + 0.5) / max(1, overlap)).astype(np.float32)
    return np.outer(r, r)


def stitch(maps: np.ndarray, lay: TileLayout) -> np.ndarray:
    """Tile maps [T, S, S] (or [T, 1, S, S]) of one image -> its stitched map float32 [work_h, work_w]: the blended
    (`tile_weight`) mean of every tile covering a pixel, padding dropped."""
    m = np.asarray(maps, np.float32).reshape(lay.n_tiles, lay.size, lay.size)
    ch, cw = lay.canvas
    acc = np.zeros((ch, cw), np.float32)
    wsum = np.zeros((ch, cw), np.float32)
    w = tile_weight(lay.size, lay.overlap)
    s = lay.size
    for (y, x), t in zip(lay.offsets, m, strict=True):
        acc[y:y + s, x:x + s] += w * t
        wsum[y:y + s, x:x + s] += w
    return acc[:lay.work_h, :lay.work_w] / wsum[:lay.work_h, :lay.work_w]


def reduce_stitched(amap: np.ndarray, reduce: str = "max", topk_fraction: float = 0.01) -> float:
    """The image score of a stitched map [h, w]: its maximum, or the mean of its round(topk_fraction * h * w) largest
    values (at least 1): `Scorer.reduce_map`'s rule over the image's own working pixels."""
    v = np.asarray(amap, np.float64).reshape(-1)
    if reduce == "max":
        return float(v.max())
    k = max(1, int(round(topk_fraction * v.size)))
    return float(np.partition(v, v.size - k)[v.size - k:].mean())


def stitched_to_source(amap: np.ndarray, lay: TileLayout) -> np.ndarray:
    """A stitched map [work_h, work_w] -> float32 [src_h, src_w], resized bilinearly to the image's own size."""
    import cv2

    a = np.ascontiguousarray(amap, np.float32)
    if a.shape == (lay.src_h, lay.src_w):
        return a
    return cv2.resize(a, (lay.src_w, lay.src_h), interpolation=cv2.INTER_LINEAR)


@dataclass
class TiledPlacements(Sequence[Placement]):
    """The tiles of several images in one stack: a sequence of one `Placement` per tile (its valid region, as the
    per-pixel statistics count it) that also knows which tiles form which image (`layouts`, `starts`)."""

    layouts: list[TileLayout]
    starts: list[int] = field(default_factory=list)  # first tile of each image

    def __post_init__(self) -> None:
        if not self.starts:
            self.starts = [int(v) for v in np.cumsum([0] + [lay.n_tiles for lay in self.layouts])[:-1]]
        self._tiles = [lay.tile_placement(i) for lay in self.layouts for i in range(lay.n_tiles)]

    def __len__(self) -> int:
        return len(self._tiles)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):  # a slice on image boundaries is a TiledPlacements of those images
            start, stop, step = i.indices(len(self))
            bounds = self.starts + [len(self)]
            if step == 1 and start in bounds and stop in bounds:
                return TiledPlacements(self.layouts[bounds.index(start):bounds.index(stop)])
            return self._tiles[i]
        return self._tiles[i]

    def __iter__(self) -> Iterator[Placement]:
        return iter(self._tiles)

    @property
    def n_images(self) -> int:
        return len(self.layouts)

    def image_of_tile(self) -> np.ndarray:
        """int64 [T]: the image index of each tile."""
        return np.repeat(np.arange(self.n_images), [lay.n_tiles for lay in self.layouts])

    def stitched(self, maps: Any) -> list[np.ndarray]:
        """Tile maps [T, (1,) S, S] (numpy or torch) -> each image's stitched map [work_h, work_w]."""
        m = np.asarray(maps.detach().float().cpu().numpy() if hasattr(maps, "detach") else maps, np.float32)
        m = m.reshape(len(self), m.shape[-2], m.shape[-1])
        return [stitch(m[s:s + lay.n_tiles], lay) for s, lay in zip(self.starts, self.layouts, strict=True)]

    def scores(self, maps: Any, reduce: str = "max", topk_fraction: float = 0.01) -> np.ndarray:
        """float64 [N]: each image's score from its stitched map (`reduce_stitched`)."""
        return np.array([reduce_stitched(a, reduce, topk_fraction) for a in self.stitched(maps)], np.float64)


def input_policy(data: Any, img_size: int) -> str | TileSpec:
    """What the image loaders take as their `resize` argument: the `TileSpec` under data.resize=tile, else the policy
    name ('squash' or 'letterbox'). `data`: a config's data section or a metadata InputSpec."""
    return spec_from(data, img_size) or str(getattr(data, "resize", "squash"))
