"""Fixtures of the watch-stage tests: a real mosquitto (anonymous, password and TLS listeners), certificates made
with openssl, a synthetic product video with defects, an MJPEG-over-HTTP camera, a gate-able TCP proxy, and a
subscriber that records what arrives."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.broker import TcpGate as GateProxy  # noqa: F401  (used by the tests)

USER, PASSWORD = "alice", "correct horse"


# --- certificates -----------------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=mae-ad test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn in (("server", "localhost"), ("client", "mae-ad-agent")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)
        extra = ["-extfile", "san.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", *extra, cwd=d)
    return {k: str(d / v) for k, v in (("ca", "ca.crt"), ("cert", "server.crt"), ("key", "server.key"),
                                        ("client_cert", "client.crt"), ("client_key", "client.key"))}


# --- broker -----------------------------------------------------------------------------------------------------
@pytest.fixture
def broker(tmp_path, pki):
    from agent.broker import MosquittoBroker

    b = MosquittoBroker(tmp_path / "broker", users={USER: PASSWORD},
                        tls={"ca": pki["ca"], "cert": pki["cert"], "key": pki["key"]})
    b.start()
    yield b
    b.stop()


class Recorder:
    """A paho subscriber on `<base>/#` that keeps every message (topic, payload) in arrival order. `stop()` checks
    every JSON payload the agent published against its topic's schema (agent/schemas, agent.payloads), so every
    test that records the agent also checks what it really publishes."""

    def __init__(self, port: int, base: str = "mae-ad/t"):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.port, self.base = port, base
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"rec-{time.time_ns()}", protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(base + "/#", qos=1)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(1, 1)

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def start(self) -> Recorder:
        self.subscribed.clear()
        self.c.connect("127.0.0.1", self.port, keepalive=10)
        self.c.loop_start()
        assert self.subscribed.wait(10), "recorder could not subscribe"
        return self

    def stop(self, check: bool = True) -> None:
        self.c.disconnect()
        self.c.loop_stop()
        if check:
            self.check_payloads()

    def check_payloads(self) -> Counter[str]:
        """Validate every recorded JSON payload of the agent against the JSON Schema of its topic (AssertionError
        listing each message and field at fault); returns how many messages each schema checked."""
        from jsonschema import Draft202012Validator

        from agent.payloads import load_schema, schema_for_topic

        validators: dict[str, Draft202012Validator] = {}
        seen: Counter[str] = Counter()
        errors: list[str] = []
        with self.lock:
            messages = list(self.messages)
        for topic, payload, _ in messages:
            name = schema_for_topic(topic[len(self.base) + 1:]) if topic.startswith(self.base + "/") else None
            if name is None:
                continue
            if name not in validators:
                validators[name] = Draft202012Validator(load_schema(name))
            seen[name] += 1
            for e in validators[name].iter_errors(json.loads(payload)):
                errors.append(f"{topic} ({name}): {e.json_path}: {e.message}")
        assert not errors, "payloads that do not match their schema:\n" + "\n".join(errors[:20])
        return seen

    def payloads(self, suffix: str, state: bool = False) -> list[bytes]:
        """Payloads of topics ending in /suffix (command replies under state/ only with state=True)."""
        with self.lock:
            return [p for t, p, _ in self.messages
                    if t.endswith("/" + suffix) and "/cmd/" not in t and (("/state/" in t) == state)]

    def json(self, suffix: str, state: bool = False) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.payloads(suffix, state)]

    def wait_for(self, pred: Any, timeout: float = 15.0) -> bool:
        return wait_until(pred, timeout)

    def publish(self, topic: str, payload: bytes | str) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)


@pytest.fixture
def recorder(broker):
    r = Recorder(broker.port).start()
    yield r
    r.stop()


# --- video and camera -------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def video(tmp_path_factory) -> dict[str, Any]:
    """60 frames at 20 fps with defects in frames [12, 20) and [36, 44)."""
    from app.agent_demo import write_product_video

    return write_product_video(tmp_path_factory.mktemp("video") / "product.avi", n_frames=60, fps=20.0, size=96,
                               defect_segments=[(12, 20), (36, 44)], seed=3)


class MjpegServer:
    """An MJPEG-over-HTTP camera (multipart/x-mixed-replace) on 127.0.0.1 that can be stopped and restarted."""

    def __init__(self, port: int | None = None, fps: float = 20.0, size: int = 96):
        from agent.broker import free_port

        self.port = port or free_port()
        self.fps, self.size = fps, size
        self.server: ThreadingHTTPServer | None = None
        self.running = threading.Event()
        self.frames_sent = 0

    def _frames(self) -> Any:
        import cv2

        from mae_ad.synthetic import normal_tile

        rng = np.random.default_rng(7)
        jpegs = [cv2.imencode(".jpg", normal_tile(rng, self.size))[1].tobytes() for _ in range(10)]
        i = 0
        while True:
            yield jpegs[i % len(jpegs)]
            i += 1

    def start(self) -> MjpegServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for jpg in outer._frames():
                        if not outer.running.is_set():
                            break
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\n"
                                         + f"Content-Length: {len(jpg)}\r\n\r\n".encode() + jpg + b"\r\n")
                        outer.frames_sent += 1
                        time.sleep(1.0 / outer.fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            def log_message(self, *a: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.running.set()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.running.clear()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"


@pytest.fixture
def mjpeg_server():
    s = MjpegServer().start()
    yield s
    s.stop()


# --- agent helpers ----------------------------------------------------------------------------------------------
def agent_cfg(tmp_path: Path, port: int, cameras: list[dict[str, Any]], **sections: Any):
    """An AgentConfig for the tests: brightness engine, fast reconnects, everything under tmp_path."""
    from agent.config import agent_config_from_dict

    data: dict[str, Any] = {
        "agent_id": "t",
        "model": {"backend": "brightness", "input_size": 64},
        "cameras": cameras,
        "capture": {"reconnect_initial_s": 0.2, "reconnect_max_s": 1.0, "watchdog_s": 3.0,
                    "open_timeout_s": 2.0, "read_timeout_s": 2.0},
        "alerts": {"open_after": 2, "close_after": 3, "update_interval_s": 0.2},
        "evidence": {"dir": str(tmp_path / "evidence")},
        "mqtt": {"port": port, "keepalive_s": 5, "reconnect_min_s": 1, "reconnect_max_s": 2,
                 "stats_interval_s": 1.0, "spool": {"dir": str(tmp_path / "spool")}},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return agent_config_from_dict(data, "<test>")


class AgentThread:
    """Runs an Agent in a background thread (no signal handlers)."""

    def __init__(self, cfg: Any, backend: Any = None):
        from agent.loop import Agent

        self.agent = Agent(cfg, backend)
        self.result: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.agent.run(install_signals=False)
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def start(self) -> AgentThread:
        self.thread.start()
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        self.agent.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "agent did not stop"
        if self.error is not None:
            raise self.error
        return self.result


def wait_until(pred: Any, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())
