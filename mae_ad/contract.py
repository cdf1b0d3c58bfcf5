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
