"""A camera's own threshold from its normal frames ("teach good" at the line).

A bundle's threshold is calibrated on held-back training images. A camera may deliver other frames: a larger field of
view (a tiled model scores more tiles, and the maximum over more area is higher), another codec, other light. Scored
on that camera's normal frames exactly as the agent scores them (`agent.scoring.score_frames`: the camera's ROI, the
model's resize policy or tiling, its score rule), their (1 - target_fpr) quantile (`mae_ad.contract.
threshold_from_scores`, the rule calibration uses) becomes `cameras[i].threshold`. Only normal frames: a frame with a
defect among them raises the threshold above that defect.

    mae-ad camera-threshold --config agent.yaml --camera line1 --source normal_clip.avi --frames 30
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mae_ad.contract import UserError, threshold_from_scores

from .backend import Backend, model_threshold
from .capture import BadFrame, EncodedJpeg, EndOfStream, SourceError, make_source
from .config import AgentConfig, CameraSection, redact
from .preprocess import roi_outside
from .scoring import FramePolicy, score_frames

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def camera_index(cfg: AgentConfig, name: str) -> int:
    """Index of the camera called `name` in `cfg.cameras`; UserError listing the names otherwise."""
    for i, cam in enumerate(cfg.cameras):
        if cam.name == name:
            return i
    raise UserError(f"--camera {name!r}: no such camera in the config (cameras: "
                    f"{', '.join(c.name for c in cfg.cameras)})")


def normal_frames(cam: CameraSection, cfg: AgentConfig, frames: int, every: int = 1) -> Iterator[np.ndarray]:
    """Up to `frames` frames of `cam.source`, every `every`-th one: a folder of images (sorted by name), or any
    source the agent reads (video file, device, URL, GStreamer pipeline; a file is read as fast as it decodes, never
    looped). Unreadable frames of a file are skipped. Raises UserError when the source cannot be opened or a folder
    holds no image."""
    src_path = Path(str(cam.source))
    if src_path.is_dir():
        import cv2

        files = sorted(p for p in src_path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{src_path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        for p in files[::every][:frames]:
            img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED if cam.colour == "gray" else cv2.IMREAD_COLOR)
            if img is None:
                raise UserError(f"{p}: not a readable image")
            yield img
        return
    src = make_source(cam.model_copy(update={"loop": False}), cfg.capture)
    try:
        src.open()
    except SourceError as e:
        raise UserError(f"camera {cam.name}: {redact(e)}") from None
    try:
        got = seen = 0
        while got < frames:
            try:
                got_frame = src.read()
                img = got_frame.decode() if isinstance(got_frame, EncodedJpeg) else got_frame
            except BadFrame:
                continue
            except EndOfStream:
                return
            except SourceError as e:
                raise UserError(f"camera {cam.name}: {redact(e)}") from None
            seen += 1
            if (seen - 1) % every == 0:
                got += 1
                yield img
    finally:
        src.close()


def teach_threshold(backend: Backend, cam: CameraSection, images: Iterator[np.ndarray], target_fpr: float = 0.01,
                    tile_batch: int = 8, where: str = "model", roi_key: str = "roi",
                    model_override: float | None = None) -> dict[str, Any]:
    """Score `images` (normal frames of `cam`) as the agent does and set the threshold on them.

    Returns {"threshold", "target_fpr", "n_frames", "scores" (one per frame, in order), "score_min", "score_median",
    "score_max", "tiles_per_frame", "frame_shape", "model_threshold" (the threshold the agent would otherwise use:
    `model_override` (model.threshold) if given, else the calibrated one, or None), "model_threshold_source",
    "above_model_threshold" (frames it would have flagged), "method"}.
    Raises UserError for fewer than 2 frames, frames of different sizes (one camera delivers one size), or a ROI
    that the agent would refuse on these frames (outside the frame, or smaller than one tile of a tiled model)."""
    policy = FramePolicy.of(backend, where)
    scores: list[float] = []
    tiles, shape = 0, None
    for img in images:
        if shape is None:
            shape = img.shape
        elif img.shape != shape:
            raise UserError(f"camera {cam.name}: frames of different sizes ({shape[1]}x{shape[0]} and "
                            f"{img.shape[1]}x{img.shape[0]}); teach a camera on frames as it delivers them")
        if not scores:  # the agent refuses such frames (agent.loop.Agent._refuse_roi): so does teaching
            why = roi_outside(img.shape, cam, roi_key, policy.tile)
            if why is not None:
                raise UserError(f"camera {cam.name}: {why}; the agent would not score these frames")
        [s], _ = score_frames(backend, policy, [(cam, img)], tile_batch)
        scores.append(float(s.score))
        tiles = s.tiles
        if len(scores) <= 3 or len(scores) % 10 == 0:  # progress: a tiled model takes seconds a frame
            log.info("camera %s: normal frame %d scored %.4g", cam.name, len(scores), s.score)
    if len(scores) < 2:
        raise UserError(f"camera {cam.name}: {len(scores)} frame(s) read from {redact(cam.source)}; a threshold "
                        "needs at least 2 normal frames")
    arr = np.asarray(scores)
    thr = threshold_from_scores(arr, target_fpr)
    model_thr = model_override if model_override is not None else model_threshold(backend)
    thr_source = "model.threshold" if model_override is not None else "calibrated"
    assert shape is not None
    return {"threshold": thr, "target_fpr": target_fpr, "n_frames": len(scores), "scores": scores,
            "score_min": float(arr.min()), "score_median": float(np.median(arr)), "score_max": float(arr.max()),
            "tiles_per_frame": tiles, "frame_shape": [int(v) for v in shape[:2]], "model_threshold": model_thr,
            "model_threshold_source": thr_source,
            "above_model_threshold": None if model_thr is None else int((arr > model_thr).sum()),
            "method": "quantile(1 - target_fpr) of the camera's normal frames, scored as the agent scores them"}
