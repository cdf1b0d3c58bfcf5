"""Optional HTTP endpoint: GET /healthz (JSON, 200 or 503) and GET /metrics (Prometheus text format).

A `ThreadingHTTPServer` in a daemon thread; the agent hands it two callables so this module knows nothing of it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


class HealthServer:
    def __init__(self, host: str, port: int, health: Callable[[], tuple[bool, dict[str, Any]]],
                 metrics: Callable[[], str]):
        self.health, self.metrics = health, metrics
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                try:
                    if self.path.split("?")[0] == "/healthz":
                        ok, body = outer.health()
                        self._send(200 if ok else 503, json.dumps(body).encode(), "application/json")
                    elif self.path.split("?")[0] == "/metrics":
                        self._send(200, outer.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
                    else:
                        self._send(404, b"not found\n", "text/plain")
                except Exception as e:  # never kill the server thread
                    log.exception("health endpoint failed")
                    self._send(500, f"{type(e).__name__}\n".encode(), "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("http: " + format, *args)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("health: http://%s:%d/healthz and /metrics", self.server.server_address[0], self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def prom_lines(name: str, help_text: str, kind: str, samples: list[tuple[dict[str, str], float]]) -> list[str]:
    """One metric family in the Prometheus text exposition format."""
    out = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
        out.append(f"{name}{{{lab}}} {value:g}" if lab else f"{name} {value:g}")
    return out


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
