"""What every stage agrees on, with no torch import: tensor names, bundle file names, metadata, predictions.

The agent (which must run without torch) and the exporter both read this module, so names cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
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


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON so that a reader never sees half a file (temp file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
