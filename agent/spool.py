"""A durable, ordered, bounded spool of MQTT messages that must not be lost (alerts).

Each message is one JSON file `<seq>.msg` written atomically (temp file, fsync, rename) BEFORE it is handed to the
broker; it is deleted only when the broker acknowledged it (PUBACK). At start the files left by a previous run are
replayed in sequence order. At `max_messages`, `on_full` decides: `drop_oldest` deletes the oldest message not
yet handed to the broker (the newest alerts survive), `drop_newest` refuses the new message. Either way a warning
is logged and `dropped` is counted (the `stats` topic and /metrics report it).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class SpooledMessage:
    seq: int
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class Spool:
    def __init__(self, directory: str | os.PathLike[str], max_messages: int = 10000, on_full: str = "drop_oldest",
                 fsync: bool = True):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_messages = max_messages
        self.on_full = on_full
        self.fsync = fsync
        self.dropped = 0
        self._lock = threading.Lock()
        self._pending: dict[int, SpooledMessage] = {}  # seq -> message, insertion = sequence order
        self._handed: set[int] = set()  # seqs given to the broker, waiting for their PUBACK
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)  # a crash between write and rename
        seqs = []
        for p in self.dir.glob("*.msg"):
            try:
                seqs.append(int(p.stem))
            except ValueError:
                log.warning("spool %s: ignoring unexpected file %s", self.dir, p.name)
        for s in sorted(seqs):
            m = self._read(s)
            if m is not None:
                self._pending[s] = m
        self._next = (max(seqs) + 1) if seqs else 1
        if self._pending:
            log.info("spool %s: %d message(s) from a previous run will be replayed", self.dir, len(self._pending))

    def _path(self, seq: int) -> Path:
        return self.dir / f"{seq:012d}.msg"

    def _read(self, seq: int) -> SpooledMessage | None:
        p = self._path(seq)
        try:
            d = json.loads(p.read_text())
            return SpooledMessage(seq, d["topic"], base64.b64decode(d["payload_b64"]), int(d.get("qos", 1)),
                                  bool(d.get("retain", False)))
        except (OSError, ValueError, KeyError) as e:
            log.error("spool %s: unreadable message %s (%s); moving it aside", self.dir, p.name, e)
            p.rename(p.with_suffix(".bad"))
            return None

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> SpooledMessage | None:
        """Write a message durably. Returns it, or None if the spool is full and on_full is drop_newest."""
        with self._lock:
            if len(self._pending) >= self.max_messages:
                if self.on_full == "drop_newest":
                    self.dropped += 1
                    log.warning("spool %s full (%d): dropping the new message on %s", self.dir, self.max_messages,
                                topic)
                    return None
                victim = next((s for s in self._pending if s not in self._handed), None)
                if victim is None:
                    self.dropped += 1
                    log.warning("spool %s full and all in flight: dropping the new message on %s", self.dir, topic)
                    return None
                old = self._pending.pop(victim)
                self._path(victim).unlink(missing_ok=True)
                self.dropped += 1
                log.warning("spool %s full (%d): dropped the oldest message (seq %d on %s)", self.dir,
                            self.max_messages, victim, old.topic)
            seq = self._next
            self._next += 1
            msg = SpooledMessage(seq, topic, payload, qos, retain)
            body = json.dumps({"topic": topic, "payload_b64": base64.b64encode(payload).decode(), "qos": qos,
                               "retain": retain}).encode()
            fd, tmp = tempfile.mkstemp(prefix=f".{seq:012d}.", suffix=".tmp", dir=self.dir)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, self._path(seq))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._pending[seq] = msg
            return msg

    def next_unsent(self) -> SpooledMessage | None:
        """The oldest message not yet handed to the broker; marks it handed."""
        with self._lock:
            for s, m in self._pending.items():
                if s not in self._handed:
                    self._handed.add(s)
                    return m
        return None

    def unhand(self, seq: int) -> None:
        """The broker client did not take the message after all: it goes back in line."""
        with self._lock:
            self._handed.discard(seq)

    def ack(self, seq: int) -> None:
        """The broker acknowledged the message: delete it."""
        with self._lock:
            self._handed.discard(seq)
            if self._pending.pop(seq, None) is not None:
                self._path(seq).unlink(missing_ok=True)

    @property
    def depth(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._handed)
