"""Frame -> engine input: region of interest, colour conversion, resize, float32 CHW in [0, 1].

Normalisation (mean/std) is part of the exported graph, so the agent only delivers RGB in [0, 1], the contract of
`mae_ad.contract.INPUT_NAME`. The resize follows the model's policy (input.resize in its metadata: squash or
letterbox) through `mae_ad.contract.fit_image`, the function training and evaluation use; under letterbox the map
and score are taken over the image's valid region only (`valid_view`). A tiled model (input.resize=tile) gets the
ROI's tiles (`preprocess_tiles`, `mae_ad.tiling`) and the frame's map is their stitched map (`stitched_view`). Boxes found in the model's input are mapped
back to frame pixels here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mae_ad.contract import Placement, fit_image, score_valid
from mae_ad.tiling import TileLayout, TileSpec, cut_tiles, reduce_stitched, stitch, working_size

from .config import CameraSection


@dataclass(frozen=True)
class Crop:
    """Where the model input came from in the frame: x, y, width, height in frame pixels."""

    x: int
    y: int
    w: int
    h: int
    place: Placement | None = None  # where the ROI lies in the model's square input (None: squashed into all of it)
    map_wh: tuple[int, int] | None = None  # tiled: (width, height) of the stitched map the boxes are found in


def roi_crop(frame_shape: tuple[int, ...], cam: CameraSection) -> Crop:
    """The camera's ROI clipped to the frame (the whole frame without ROI)."""
    fh, fw = int(frame_shape[0]), int(frame_shape[1])
    if cam.roi is None:
        return Crop(0, 0, fw, fh)
    x0, y0 = min(cam.roi.x, fw - 1), min(cam.roi.y, fh - 1)
    x1, y1 = min(cam.roi.x + cam.roi.width, fw), min(cam.roi.y + cam.roi.height, fh)
    return Crop(x0, y0, max(1, x1 - x0), max(1, y1 - y0))


def roi_outside(frame_shape: tuple[int, ...], cam: CameraSection, key: str = "roi",
                tile: TileSpec | None = None) -> str | None:
    """Why a frame of this shape cannot be scored as configured (a sentence naming `key`, the camera's ROI key), or
    None: the ROI reaches outside the frame, or (a tiled model, `tile`) the ROI or frame at the tile scale is smaller
    than one tile."""
    fh, fw = int(frame_shape[0]), int(frame_shape[1])
    r = cam.roi
    if r is not None and (r.x + r.width > fw or r.y + r.height > fh):
        return f"{key}: x={r.x} y={r.y} width={r.width} height={r.height} reaches outside the {fw}x{fh} frame"
    if tile is not None:
        w, h = (r.width, r.height) if r is not None else (fw, fh)
        wh, ww = working_size(h, w, tile.scale)
        if wh < tile.size or ww < tile.size:
            what = f"{key} {w}x{h}" if r is not None else f"the {fw}x{fh} frame"
            return (f"{what} at the model's tile scale {tile.scale:g} is {ww}x{wh} px, smaller than one "
                    f"{tile.size}-px tile")
    return None


def to_rgb(img: np.ndarray, colour: str) -> np.ndarray:
    """uint8 HxW(xC) in the source's channel order -> HxWx3 RGB."""
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(img.reshape(img.shape[0], img.shape[1]), cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if colour != "rgb" else cv2.COLOR_RGBA2RGB)
    if colour == "rgb":
        return img
    if colour == "gray":  # a 3-channel grey image: any order is fine
        return img
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def preprocess(frame: np.ndarray, cam: CameraSection, size: int, resize: str = "squash"
               ) -> tuple[np.ndarray, Crop, np.ndarray]:
    """-> (input float32 [3, S, S] RGB in [0, 1], crop (with its placement), resized RGB uint8 [S, S, 3] for
    overlays). `resize`: the model's policy, 'squash' or 'letterbox' (`mae_ad.contract.fit_image`)."""
    crop = roi_crop(frame.shape, cam)
    roi = frame[crop.y:crop.y + crop.h, crop.x:crop.x + crop.w]
    small, place = fit_image(roi, size, resize)
    crop = Crop(crop.x, crop.y, crop.w, crop.h, place)
    rgb = to_rgb(small, cam.colour)
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    chw *= 1.0 / 255.0
    return chw, crop, rgb


def preprocess_tiles(frame: np.ndarray, cam: CameraSection, spec: TileSpec
                     ) -> tuple[np.ndarray, Crop, TileLayout, np.ndarray]:
    """Tiling (the model's input.resize=tile): the ROI scaled by the tile scale and cut into overlapping tiles as
    training and evaluation cut them (`mae_ad.tiling.cut_tiles`). -> (tiles float32 [T, 3, S, S] RGB in [0, 1],
    crop (map_wh: the stitched map's size), their `TileLayout`, the scaled ROI RGB uint8 [h, w, 3] for overlays)."""
    crop = roi_crop(frame.shape, cam)
    rgb = to_rgb(frame[crop.y:crop.y + crop.h, crop.x:crop.x + crop.w], cam.colour)
    tiles, lay = cut_tiles(rgb, spec)
    work = rgb if (lay.work_h, lay.work_w) == (crop.h, crop.w) else \
        cv2.resize(rgb, (lay.work_w, lay.work_h), interpolation=cv2.INTER_AREA if spec.scale < 1 else cv2.INTER_LINEAR)
    x = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2), dtype=np.float32)
    x *= 1.0 / 255.0
    return x, Crop(crop.x, crop.y, crop.w, crop.h, None, (lay.work_w, lay.work_h)), lay, work


def stitched_view(maps: np.ndarray, lay: TileLayout, reduce: str = "max", topk_fraction: float = 0.01
                  ) -> tuple[np.ndarray, float]:
    """Tile maps [T, (1,) S, S] of one frame -> (stitched map [h, w] over the scaled ROI, score by the model's reduce
    rule over it): `mae_ad.tiling.stitch` and `reduce_stitched`, as evaluation takes them."""
    amap = stitch(maps, lay)
    return amap, reduce_stitched(amap, reduce, topk_fraction)


def valid_view(amap: np.ndarray, rgb: np.ndarray, score: float, crop: Crop, reduce: str = "max",
               topk_fraction: float = 0.01) -> tuple[np.ndarray, np.ndarray, float]:
    """The map [S, S] (or [1, S, S]), overlay image [S, S, 3] and score of one frame, restricted to the ROI's valid
    region under letterbox (map [h, w], image [h, w, 3], score over the valid pixels by the model's reduce rule);
    unchanged under squash."""
    pl = crop.place
    if pl is None or pl.full:
        return amap, rgb, score
    m = amap.reshape(amap.shape[-2], amap.shape[-1])
    sl = (slice(pl.top, pl.top + pl.height), slice(pl.left, pl.left + pl.width))
    return np.ascontiguousarray(m[sl]), np.ascontiguousarray(rgb[sl]), score_valid(m, pl, reduce, topk_fraction)


def box_to_frame(box: tuple[int, int, int, int], crop: Crop, size: int) -> list[int]:
    """A box [x0, y0, x1, y1) in map pixels -> the same box in frame pixels. The map is the model-size square
    (squash), for a letterboxed crop its valid region (`valid_view`), for a tiled one the stitched map."""
    pl = crop.place
    mw, mh = crop.map_wh or ((pl.width, pl.height) if pl is not None and not pl.full else (size, size))
    sx, sy = crop.w / mw, crop.h / mh
    x0, y0, x1, y1 = box
    return [int(crop.x + x0 * sx), int(crop.y + y0 * sy), int(round(crop.x + x1 * sx)), int(round(crop.y + y1 * sy))]


def anomalous_box(amap: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """Box [x0, y0, x1, y1) around the connected anomalous region holding the map's maximum.

    The region is the pixels above the threshold and above half the peak (the half-maximum contour, as a spot's
    width is measured at half its height): a strong defect's smoothed tail stays above the threshold far from
    the defect (a 25-px spot scored 60x the threshold had the whole 160-px frame above it), and its box would say
    nothing of where it is; a defect just above the threshold is boxed at the threshold. A map with no pixel above
    the threshold is boxed at half its peak.
    """
    m = amap.reshape(amap.shape[-2], amap.shape[-1])
    peak = float(m.max())
    level = max(threshold, 0.5 * peak) if peak > threshold else 0.5 * peak
    mask = (m > level).astype(np.uint8)
    if not mask.any():
        y, x = np.unravel_index(int(np.argmax(m)), m.shape)
        return int(x), int(y), int(x) + 1, int(y) + 1
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    y, x = np.unravel_index(int(np.argmax(m)), m.shape)
    lab = int(labels[y, x])
    if lab == 0:  # the peak itself is not above the level (flat map): take the biggest component
        lab = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x0, y0, w, h = (int(v) for v in stats[lab, :4])
    return x0, y0, x0 + w, y0 + h


def overlay(rgb: np.ndarray, amap: np.ndarray, threshold: float, box: tuple[int, int, int, int] | None = None,
            out_size: int | None = None) -> np.ndarray:
    """Heatmap overlay as BGR uint8 (ready for cv2.imencode): the map scaled so the threshold sits mid-scale."""
    m = amap.reshape(amap.shape[-2], amap.shape[-1]).astype(np.float32)
    scale = 2.0 * threshold if threshold > 0 else float(m.max() or 1.0)
    heat = cv2.applyColorMap(np.clip(m / scale * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    out = cv2.addWeighted(bgr, 0.55, heat, 0.45, 0.0)
    if box is not None:
        cv2.rectangle(out, (box[0], box[1]), (max(box[0], box[2] - 1), max(box[1], box[3] - 1)), (255, 255, 255), 1)
    if out_size and out_size != max(out.shape[:2]):  # the longer side becomes out_size (a letterboxed map is not square)
        f = out_size / max(out.shape[:2])
        out = cv2.resize(out, (max(1, round(out.shape[1] * f)), max(1, round(out.shape[0] * f))),
                         interpolation=cv2.INTER_NEAREST)
    return out
