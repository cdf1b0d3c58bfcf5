"""What every stage agrees on, with no torch import: tensor names, bundle file names, metadata, predictions.

The agent (which must run without torch) and the exporter both read this module, so names cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Graph I/O names: the PyTorch scorer, the ONNX graph, the TensorRT engine and the agent use exactly these.
INPUT_NAME = "image"  # float32 [B, 3, H, W], RGB, values in [0, 1]
MAP_NAME = "anomaly_map"  # float32 [B, 1, H, W]
SCORE_NAME = "score"  # float32 [B]

# Model bundle: one directory.
BUNDLE_WEIGHTS = "weights.safetensors"  # model state dict (LoRA layers included unless merged)
BUNDLE_CONFIG = "config.yaml"  # the resolved configuration the model was trained with
BUNDLE_CALIBRATION = "calibration.json"  # threshold and score statistics from held-back normal images
BUNDLE_CALIB_TENSORS = "calibration.safetensors"  # per-pixel normal statistics (mean/std maps), optional
BUNDLE_META = "meta.json"  # versions, hashes, what made it
BUNDLE_FILES = (BUNDLE_WEIGHTS, BUNDLE_CONFIG, BUNDLE_META)

BUNDLE_FORMAT_VERSION = 1


class UserError(Exception):
    """A mistake the user can fix (bad path, bad key, bad file). The CLI prints it as one line, exit code 2."""


@dataclass
class Prediction:
    """One scored image, as the agent and `predict` report it."""

    score: float
    threshold: float
    anomalous: bool
    anomaly_map: Any = None  # numpy float32 [H, W] when kept
    meta: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file so that a reader never sees half of it (temp file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_dir(out: str | os.PathLike[str], what: str = "bundle") -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success rename it to `out`, so a crash never leaves half an
    artefact. Refuses an existing `out` that is not an empty directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty; refusing to overwrite the {what} (choose another --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        for f in tmp.rglob("*"):  # mkstemp-created files are 0600: give them the usual umask permissions
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_umask())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def is_bundle(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / BUNDLE_META).is_file() and (p / BUNDLE_WEIGHTS).is_file()


def read_bundle_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: bundle directory not found")
    if not is_bundle(p):
        raise UserError(f"{p}: not a model bundle (expected {BUNDLE_META} and {BUNDLE_WEIGHTS} inside)")
    meta = read_json(p / BUNDLE_META, "bundle metadata")
    if not isinstance(meta, dict) or meta.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise UserError(f"{p / BUNDLE_META}: unsupported bundle format_version {meta.get('format_version')!r}")
    return meta


def read_calibration(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Calibration of a bundle; raises UserError if the bundle was never calibrated."""
    p = Path(path) / BUNDLE_CALIBRATION
    if not p.is_file():
        raise UserError(f"{Path(path)}: bundle has no calibration ({BUNDLE_CALIBRATION} missing); run `mae-ad calibrate`")
    cal = read_json(p, "calibration")
    if "threshold" not in cal:
        raise UserError(f"{p}: key 'threshold' missing")
    return cal


# --- resize policy: how an image of any shape becomes the model's square input ------------------------------------
# squash: the whole image resized to S x S (aspect ratio not kept; every pixel of the input is the image).
# letterbox: resized so its longer side is S (aspect ratio kept), centred, and the rest of the square filled by
#   mirroring the image at its edges (numpy "reflect"). Mirrored content rather than a constant colour: a pretrained
#   backbone and the MAE see no artificial edge at the border of the image, and a filled cell looks like normal
#   content, not like a flat defect. The filled part is then ignored: the map there is set to the valid minimum and
#   the image score is taken over the valid region only (`score_valid`).
# Every stage (training, calibration, evaluation, predict, the agent) goes through `fit_image` and `Placement`, and
# the bundle/ONNX metadata record the policy as input.resize; the exported graph keeps its fixed square input.
RESIZE_POLICIES = ("squash", "letterbox")


@dataclass(frozen=True)
class Placement:
    """Where an image of `src_h` x `src_w` pixels lies in the model's `size` x `size` input: the valid region is
    rows top..top+height, columns left..left+width (the whole square for squash)."""

    size: int
    top: int
    left: int
    height: int
    width: int
    src_h: int
    src_w: int

    @property
    def full(self) -> bool:
        return self.top == 0 and self.left == 0 and self.height == self.size and self.width == self.size


def placement(src_h: int, src_w: int, size: int, policy: str = "squash") -> Placement:
    """The `Placement` of an image of src_h x src_w pixels (>= 1 each) under `policy` ('squash' or 'letterbox').
    Letterbox: the longer side becomes `size`, the shorter round(side * size / longer) (at least 1), centred (an
    odd leftover puts the extra pixel after the image). Raises ValueError for an unknown policy or empty image."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"data.resize: unknown policy {policy!r}; choose one of {', '.join(RESIZE_POLICIES)}")
    if src_h < 1 or src_w < 1 or size < 1:
        raise ValueError(f"cannot place a {src_w}x{src_h} image in a {size}x{size} input")
    if policy == "squash":
        return Placement(size, 0, 0, size, size, src_h, src_w)
    scale = size / max(src_h, src_w)
    h = min(size, max(1, int(round(src_h * scale))))
    w = min(size, max(1, int(round(src_w * scale))))
    return Placement(size, (size - h) // 2, (size - w) // 2, h, w, src_h, src_w)


def fit_image(img: Any, size: int, policy: str = "squash") -> tuple[Any, Placement]:
    """An image [H, W] or [H, W, C] (any dtype cv2 resizes) -> ([S, S] or [S, S, C] of the same dtype, placement).
    Resize: area averaging when both sides shrink, else bilinear; letterbox fills the rest by reflection."""
    import cv2
    import numpy as np

    pl = placement(int(img.shape[0]), int(img.shape[1]), size, policy)
    if (pl.src_h, pl.src_w) != (pl.height, pl.width):
        shrink = pl.height < pl.src_h and pl.width < pl.src_w
        img = cv2.resize(np.ascontiguousarray(img), (pl.width, pl.height),
                         interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if pl.full:
        return img, pl
    pad = [(pl.top, size - pl.top - pl.height), (pl.left, size - pl.left - pl.width)] + [(0, 0)] * (img.ndim - 2)
    return np.pad(img, pad, mode="reflect"), pl


def valid_mask(pl: Placement) -> Any:
    """bool [S, S]: True on the image, False on the letterbox fill."""
    import numpy as np

    m = np.zeros((pl.size, pl.size), bool)
    m[pl.top:pl.top + pl.height, pl.left:pl.left + pl.width] = True
    return m


def crop_valid(amap: Any, pl: Placement) -> Any:
    """A model-size map [..., S, S] -> its valid region [..., height, width] (a view)."""
    return amap[..., pl.top:pl.top + pl.height, pl.left:pl.left + pl.width]


def mask_fill(amap: Any, pl: Placement) -> Any:
    """A model-size map [..., S, S] with the letterbox fill set to the valid region's minimum (a copy; the map
    itself for squash), so a heatmap or a box never shows the fill."""
    if pl.full:
        return amap
    import numpy as np

    out = np.array(amap, copy=True)
    lo = crop_valid(out, pl).min()
    out[..., ~valid_mask(pl)] = lo
    return out


def score_valid(amap: Any, pl: Placement, reduce: str = "max", topk_fraction: float = 0.01) -> float:
    """The image score from a model-size map [S, S] (or [1, S, S]) over the valid region only: its maximum, or
    (reduce='topk_mean') the mean of its round(topk_fraction * valid pixels) largest values (at least 1), the rule
    of `Scorer.reduce_map` applied to the image's own pixels."""
    import numpy as np

    v = np.asarray(crop_valid(amap, pl), dtype=np.float64).reshape(-1)
    if reduce == "max":
        return float(v.max())
    k = max(1, int(round(topk_fraction * v.size)))
    return float(np.partition(v, v.size - k)[v.size - k:].mean())


def map_to_source(amap: Any, pl: Placement) -> Any:
    """A model-size map [S, S] -> float32 [src_h, src_w]: the valid region cropped, then resized bilinearly to
    the image's own size (the map is upsampled, a mask never needs to be downsampled)."""
    import cv2
    import numpy as np

    v = np.ascontiguousarray(crop_valid(np.asarray(amap, dtype=np.float32).reshape(pl.size, pl.size), pl))
    if v.shape == (pl.src_h, pl.src_w):
        return v
    return cv2.resize(v, (pl.src_w, pl.src_h), interpolation=cv2.INTER_LINEAR)
