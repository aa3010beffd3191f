"""HTTP endpoints for operators: ``/metrics``, ``/healthz`` and ``/readyz``.

Served from a small thread so that a wedged event loop can still be *reported* as wedged
(503) instead of merely not answering. The thread only reads what the loop writes (plain
attributes on ``Stats``); it never touches a connection.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from cdc_relay.errors import ConfigError
from cdc_relay.telemetry import Stats


class HasRegistry(Protocol):
    """What /metrics serves: the relay's ``Metrics``, or the consumer's."""

    registry: CollectorRegistry


log = logging.getLogger("cdc_relay")


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise ConfigError("http_address", f"expected host:port, got {text!r}") from None


class HealthServer:
    """Liveness: the loop ticks, and it is not stuck in a retry loop that never moves the slot.
    Readiness: both connections are up and the slot is streaming."""

    def __init__(self, address: str, stats: Stats, metrics: HasRegistry, timeout: float) -> None:
        self._stats = stats
        self._metrics = metrics
        self._timeout = timeout
        host, port = parse_address(address)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.handle(self)

            def log_message(self, format: str, *args: object) -> None:
                return

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(
                "http_address", f"cannot listen on {address}: {exc.strerror}"
            ) from None
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("http endpoints listening", extra={"port": self.port})
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def live(self) -> tuple[bool, dict[str, object]]:
        now = time.time()
        s = self._stats
        tick_age = now - s.last_loop_tick
        progress_age = now - s.last_progress
        # a connected relay that waits (broker alarm, idle database) is alive; one that keeps
        # failing and retrying without moving the slot is not, however busy its retries look
        retrying = s.consecutive_failures > 0
        ok = tick_age < self._timeout and not (retrying and progress_age >= self._timeout)
        return ok, {
            "loop_tick_age_s": round(tick_age, 3),
            "progress_age_s": round(progress_age, 3),
            "consecutive_failures": s.consecutive_failures,
            "timeout_s": self._timeout,
        }

    def ready(self) -> tuple[bool, dict[str, object]]:
        s = self._stats
        ok = s.streaming and s.broker_ready
        return ok, {"streaming": s.streaming, "broker_ready": s.broker_ready, "broker": s.broker}

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        path = req.path.split("?", 1)[0]
        if path == "/metrics":
            body = generate_latest(self._metrics.registry)
            self._send(req, 200, CONTENT_TYPE_LATEST, body)
            return
        if path in ("/healthz", "/readyz"):
            ok, detail = self.live() if path == "/healthz" else self.ready()
            detail["status"] = "ok" if ok else "failing"
            self._send(req, 200 if ok else 503, "application/json", json.dumps(detail).encode())
            return
        self._send(req, 404, "text/plain", b"not found: try /metrics, /healthz, /readyz\n")

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, code: int, ctype: str, body: bytes) -> None:
        req.send_response(code)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)
