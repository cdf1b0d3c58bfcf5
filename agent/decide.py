"""Decisions: is a frame anomalous, and the alert lifecycle of one camera.

An alert opens after `open_after` consecutive anomalous frames and closes after `close_after` consecutive normal
ones. Its events: `start` (id, start time, first score and box), `update` (a new peak score, at most once per
`update_interval_s`), `end` (end time, duration, peak score and its box, frames counted, `reason`).

End reasons: `normal` (close_after normal frames), `camera_lost` (the camera stopped delivering: reconnecting,
stalled or failed; the alert ends at its last scored frame, so the blind time is not counted, and the next alert
needs open_after fresh anomalous frames), `source_ended` (a file without loop reached its end), `shutdown` (the
agent stopped). Pure logic: no I/O.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any


def iso(t: float) -> str:
    """Wall time as ISO-8601 UTC with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


@dataclass
class Alert:
    id: str
    camera: str
    start_t: float
    start_frame: int
    threshold: float
    peak_score: float
    peak_frame: int
    peak_box: list[int]
    frames: int = 0  # anomalous frames while open
    last_update_t: float = 0.0
    last_update_peak: float = 0.0


@dataclass
class Decision:
    anomalous: bool
    events: list[dict[str, Any]] = field(default_factory=list)
    new_peak: bool = False  # the open alert reached a new peak on this frame (evidence is refreshed)


class AlertTracker:
    """The alert state machine of one camera."""

    def __init__(self, camera: str, open_after: int, close_after: int, update_interval_s: float = 1.0,
                 id_factory: Any = None):
        self.camera = camera
        self.open_after, self.close_after = open_after, close_after
        self.update_interval_s = update_interval_s
        self.id_factory = id_factory or (lambda: uuid.uuid4().hex[:16])
        self.anomalous_run = 0
        self.normal_run = 0
        self.alert: Alert | None = None
        self.opened = 0
        self.closed = 0
        self._pending_peak: tuple[float, int, list[int]] | None = None  # best frame of the current anomalous run
        self.last_t: float | None = None  # wall time and frame id of the last frame fed
        self.last_frame: int = -1

    def update(self, score: float, threshold: float, frame_id: int, t: float, box: list[int] | None) -> Decision:
        """Feed one scored frame (`box` in frame pixels, needed only when anomalous)."""
        anomalous = bool(score > threshold)
        d = Decision(anomalous)
        self.last_t, self.last_frame = t, frame_id
        if anomalous:
            self.anomalous_run += 1
            self.normal_run = 0
            a = self.alert
            if a is None:
                if self._pending_peak is None or score > self._pending_peak[0]:
                    self._pending_peak = (score, frame_id, list(box or []))
                if self.anomalous_run >= self.open_after:
                    peak, pframe, pbox = self._pending_peak
                    a = Alert(self.id_factory(), self.camera, t, frame_id, threshold, peak, pframe, pbox,
                              frames=self.anomalous_run, last_update_t=t, last_update_peak=peak)
                    self.alert = a
                    self.opened += 1
                    self._pending_peak = None
                    d.new_peak = True
                    d.events.append(self._event("start", a, t, frame_id, score, box))
            else:
                a.frames += 1
                if score > a.peak_score:
                    a.peak_score, a.peak_frame, a.peak_box = score, frame_id, list(box or [])
                    d.new_peak = True
                if (a.peak_score > a.last_update_peak and t - a.last_update_t >= self.update_interval_s):
                    a.last_update_t, a.last_update_peak = t, a.peak_score
                    d.events.append(self._event("update", a, t, frame_id, score, box))
        else:
            self.normal_run += 1
            self.anomalous_run = 0
            self._pending_peak = None
            a = self.alert
            if a is not None and self.normal_run >= self.close_after:
                d.events.append(self.close(t, frame_id, "normal"))
        return d

    def lose(self, reason: str = "camera_lost") -> dict[str, Any] | None:
        """The camera stopped delivering frames: forget the anomalous/normal runs and close the open alert (if any)
        at the last frame it scored, with `reason`. Returns the `end` event or None."""
        self.anomalous_run = self.normal_run = 0
        self._pending_peak = None
        if self.alert is None:
            return None
        t = self.last_t if self.last_t is not None else time.time()
        return self.close(t, self.last_frame, reason)

    def close(self, t: float, frame_id: int, reason: str) -> dict[str, Any]:
        """Close the open alert now (also used at shutdown with reason 'shutdown')."""
        a = self.alert
        assert a is not None
        self.alert = None
        self.closed += 1
        ev = self._event("end", a, t, frame_id, None, None)
        ev.update(end=iso(t), duration_s=round(t - a.start_t, 3), reason=reason)
        return ev

    def _event(self, kind: str, a: Alert, t: float, frame_id: int, score: float | None,
               box: list[int] | None) -> dict[str, Any]:
        ev: dict[str, Any] = {
            "event": kind, "id": a.id, "camera": a.camera, "start": iso(a.start_t), "time": iso(t),
            "frame_id": frame_id, "start_frame_id": a.start_frame, "threshold": round(a.threshold, 6),
            "peak_score": round(a.peak_score, 6), "peak_frame_id": a.peak_frame, "box": a.peak_box,
            "frames": a.frames,
        }
        if score is not None:
            ev["score"] = round(score, 6)
            ev["frame_box"] = list(box or [])
        return ev
