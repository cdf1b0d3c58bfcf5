"""Evidence of alerts on disk: `<dir>/<camera>/<time>_<alert id>/` with the frame, its heatmap overlay and the alert
JSON, refreshed when the alert reaches a new peak. Retention: at most `max_alerts` folders (oldest deleted first)
and, optionally, none older than `max_age_days`. Files are written to temporary names and renamed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mae_ad.contract import write_bytes_atomic

from .config import EvidenceSection

log = logging.getLogger(__name__)


def encode_jpeg(bgr: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


class EvidenceStore:
    def __init__(self, cfg: EvidenceSection):
        self.cfg = cfg
        self.root = Path(cfg.dir)
        self.saved = 0
        self.deleted = 0
        self._folders: dict[str, Path] = {}  # alert id -> folder

    def folder(self, camera: str, alert_id: str, t: float) -> Path:
        d = self._folders.get(alert_id)
        if d is None:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t))
            d = self.root / camera / f"{stamp}_{alert_id}"
            d.mkdir(parents=True, exist_ok=True)
            self._folders[alert_id] = d
            self.enforce_retention()
        return d

    def save(self, camera: str, alert_id: str, t: float, frame_bgr: np.ndarray, overlay_jpeg: bytes,
             event: dict[str, Any], tag: str) -> Path | None:
        """Write frame_<tag>.jpg, overlay_<tag>.jpg and alert.json (the latest event) for an alert."""
        if not self.cfg.enabled:
            return None
        try:
            d = self.folder(camera, alert_id, t)
            write_bytes_atomic(d / f"frame_{tag}.jpg", encode_jpeg(frame_bgr, self.cfg.jpeg_quality))
            write_bytes_atomic(d / f"overlay_{tag}.jpg", overlay_jpeg)
            write_bytes_atomic(d / "alert.json", json.dumps(event, indent=2).encode())
            self.saved += 1
            return d
        except OSError as e:  # a full disk must not stop the agent
            log.error("evidence: cannot write for alert %s: %s", alert_id, e)
            return None

    def finish(self, alert_id: str, event: dict[str, Any]) -> None:
        d = self._folders.pop(alert_id, None)
        if d is not None and d.is_dir():
            try:
                write_bytes_atomic(d / "alert.json", json.dumps(event, indent=2).encode())
            except OSError as e:
                log.error("evidence: cannot write %s: %s", d / "alert.json", e)

    def enforce_retention(self) -> None:
        if not self.root.is_dir():
            return
        folders = [p for cam in self.root.iterdir() if cam.is_dir() for p in cam.iterdir() if p.is_dir()]
        folders.sort(key=lambda p: p.name)  # names start with the UTC start time
        keep = set(self._folders.values())
        victims = [p for p in folders[: max(0, len(folders) - self.cfg.max_alerts)] if p not in keep]
        if self.cfg.max_age_days is not None:
            limit = time.time() - self.cfg.max_age_days * 86400
            victims += [p for p in folders if p.stat().st_mtime < limit and p not in keep and p not in victims]
        for p in victims:
            shutil.rmtree(p, ignore_errors=True)
            self.deleted += 1
