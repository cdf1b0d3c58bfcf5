"""Checking the values of the MQTT commands (`cmd/<camera>/<command>`) before the agent acts on them.

Each check raises ValueError with a message fit for the `{"ok": false, "error": ...}` reply; nothing is changed
when a check fails.
"""

from __future__ import annotations

import json
import math
from typing import Any

# A threshold set by command must lie within [reference / THRESHOLD_FACTOR, reference * THRESHOLD_FACTOR], where the
# reference is the camera's threshold without the command (camera, model.threshold, or the model's calibrated one).
# Above the range no frame would ever be anomalous (detection silently off); below it every frame would be.
THRESHOLD_FACTOR = 10.0

NO_VALUE_COMMANDS = ("pause", "resume", "snapshot")


def _decode(command: str, payload: bytes) -> str:
    try:
        return payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{command}: the payload is not UTF-8 text") from None


def parse_threshold(payload: bytes) -> float | None:
    """The value of a `threshold` command: a JSON number, `{"value": number}`, or null / "reset" / empty (= back to
    the configured threshold, returned as None). Booleans, strings, NaN and infinities are refused (ValueError)."""
    text = _decode("threshold", payload)
    if text == "" or text.lower() == "reset":
        return None
    try:
        v: Any = json.loads(text)
    except ValueError:
        raise ValueError(f"threshold: expected a number, {{\"value\": number}}, null or 'reset'; got {text[:80]!r}"
                         ) from None
    if isinstance(v, dict):
        extra = sorted(set(v) - {"value"})
        if extra or "value" not in v:
            raise ValueError(f"threshold: an object must hold only 'value'; got keys {sorted(v)}")
        v = v["value"]
    if v is None or (isinstance(v, str) and v.lower() == "reset"):
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"threshold: expected a number, got {json.dumps(v)[:80]}")
    value = float(v)
    if not math.isfinite(value):
        raise ValueError(f"threshold: {text[:80]!r} is not a finite number")
    return value


def threshold_range(reference: float) -> tuple[float, float]:
    """The (low, high) bounds a commanded threshold must lie within, inclusive, for a camera whose threshold without
    the command is `reference` (> 0)."""
    return reference / THRESHOLD_FACTOR, reference * THRESHOLD_FACTOR


def check_threshold(value: float, reference: float, camera: str) -> None:
    """Raise ValueError unless 0 < value and value lies within threshold_range(reference)."""
    if value <= 0:
        raise ValueError(f"threshold: {value:g} for camera {camera!r}: must be > 0 (scores are >= 0, so a threshold "
                         "<= 0 makes every frame anomalous)")
    if reference > 0:
        lo, hi = threshold_range(reference)
        if not lo <= value <= hi:
            raise ValueError(f"threshold: {value:g} for camera {camera!r} is outside [{lo:.6g}, {hi:.6g}] "
                             f"(1/{THRESHOLD_FACTOR:g} to {THRESHOLD_FACTOR:g} times its configured threshold "
                             f"{reference:.6g}); a higher one would turn detection off, a lower one flag every frame")


def check_no_value(command: str, payload: bytes) -> None:
    """pause, resume and snapshot take no value: the payload must be empty, `null` or `{}` (ValueError otherwise),
    so that e.g. `pause` with `false` is refused rather than pausing the camera."""
    text = _decode(command, payload)
    if text in ("", "null", "{}"):
        return
    raise ValueError(f"{command}: takes no value (send an empty payload); got {text[:80]!r}")
