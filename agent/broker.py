"""Local MQTT brokers for the demo and the tests: a real mosquitto on 127.0.0.1 with a temporary config, or, where
mosquitto is not installed, an in-process amqtt broker (MQTT 3.1.1 only, anonymous only).

`MosquittoBroker` can open three listeners: anonymous, password (a `mosquitto_passwd` file) and TLS (CA, server
certificate and key; optionally requiring client certificates). It can be stopped, killed and restarted on the
same ports, which is how the outage scenarios are played.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


class MosquittoBroker:
    """A mosquitto process on 127.0.0.1 with a generated config. Use as a context manager."""

    def __init__(self, workdir: str | os.PathLike[str], users: dict[str, str] | None = None,
                 tls: dict[str, str] | None = None, require_certificate: bool = False):
        exe = mosquitto_path()
        if exe is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.exe = exe
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports: dict[str, int] = {"anon": free_port()}
        lines = ["per_listener_settings true", "persistence false", "log_type error", "log_type warning",
                 "log_type notice", f"log_dest file {self.dir / 'mosquitto.log'}",
                 f"listener {self.ports['anon']} 127.0.0.1", "allow_anonymous true"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.insert(0, "user root")  # as root mosquitto would switch to user 'mosquitto' and lose the temp files
        if users:
            pw = self.dir / "passwd"
            pw.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True,
                               capture_output=True, timeout=30)
            os.chmod(pw, 0o600)
            self.ports["password"] = free_port()
            lines += [f"listener {self.ports['password']} 127.0.0.1", "allow_anonymous false",
                      f"password_file {pw}"]
        if tls:
            self.ports["tls"] = free_port()
            lines += [f"listener {self.ports['tls']} 127.0.0.1", "allow_anonymous true",
                      f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}"]
            if require_certificate:
                lines += ["require_certificate true"]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.ports["anon"]

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        for p in self.ports.values():
            if not wait_port(p, timeout):
                err = self.proc.stderr.read().decode() if self.proc.poll() is not None and self.proc.stderr else ""
                self.kill()
                raise RuntimeError(f"mosquitto did not open port {p}: {err or self.log_tail()}")
        return self

    def log_tail(self, n: int = 20) -> str:
        p = self.dir / "mosquitto.log"
        return "\n".join(p.read_text().splitlines()[-n:]) if p.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InProcessBroker:
    """An amqtt broker in a background thread (its own asyncio loop): MQTT 3.1.1, anonymous, no TLS."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.ports = {"anon": self.port}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 15.0) -> InProcessBroker:
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise RuntimeError("neither mosquitto nor the amqtt package is installed "
                               "(apt-get install mosquitto, or pip install amqtt)") from None
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._broker = Broker(config, loop=loop)
                loop.run_until_complete(self._broker.start())
            except BaseException as e:  # reported to start()
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            loop.run_forever()
            loop.close()

        logging.getLogger("amqtt").setLevel(logging.WARNING)
        logging.getLogger("transitions").setLevel(logging.WARNING)
        self._thread = threading.Thread(target=main, name="amqtt-broker", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self._error is not None:
            raise RuntimeError(f"in-process broker failed to start: {self._error}")
        if not wait_port(self.port, timeout):
            raise RuntimeError(f"in-process broker did not open port {self.port}")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._broker is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
        try:
            fut.result(10)
        except Exception as e:  # pragma: no cover - best effort at exit
            log.debug("in-process broker shutdown: %s", e)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> InProcessBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TcpGate:
    """A TCP forwarder 127.0.0.1:port -> target. While closed it accepts and drops connections at once, so the
    test decides when the agent may reach the broker again."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.port = free_port()
        self.open = threading.Event()
        self.open.set()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(16)
        self.alive = True
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.alive:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if not self.open.is_set():
                c.close()
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                c.close()
                continue
            self.conns += [c, up]
            for a, b in ((c, up), (up, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.alive = False
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def start_local_broker(workdir: str | os.PathLike[str], prefer: str = "auto") -> tuple[Any, str]:
    """Start a broker for the demo: mosquitto where installed, else amqtt. Returns (broker, protocol)."""
    if prefer in ("auto", "mosquitto") and mosquitto_path() is not None:
        return MosquittoBroker(workdir).start(), "5"
    if prefer == "mosquitto":
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    return InProcessBroker().start(), "3.1.1"
