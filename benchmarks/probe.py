"""Measuring instruments: queue depth, process CPU/RSS, and the latency consumer.

The latency consumer runs as its own process so that its receipt timestamps are not delayed by
the harness. It consumes (auto-ack) from one queue, stamps every delivery with ``time.time()``
and, at the end, writes per-event latencies from the envelope's ``committed_at`` and
``occurred_at`` (RFC 3339, written by PostgreSQL on this machine, so the same clock)::

    python -m benchmarks.probe consume --url URL --queue Q --out latencies.json

It prints ``{"event": "ready"}`` once consuming, reads the number of events to expect from its
standard input (one line, whenever the producer knows it), and stops when it has them all or at
``--max-seconds``.

The OTLP sink stands in for Jaeger when the benchmark runs the relay with tracing on: an
OTLP/HTTP (protobuf) receiver on loopback, in its own process so its CPU is not the relay's, that
counts the spans it is sent and drops them::

    python -m benchmarks.probe otlp-sink

It prints ``{"event": "ready", "port": P}``, then on SIGTERM ``{"event": "done", "spans": S,
"requests": R, "bytes": B}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pika

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- /proc --------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_or_none(pid: int | None) -> float | None:
    """utime+stime of ``pid`` in seconds; None without a pid or once it is gone."""
    if pid is None:
        return None
    try:
        return cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return None


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` value from /proc/<pid>/status, e.g. ``VmHWM`` (peak RSS) or ``VmRSS``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


_PROPERTY_NAMES = (
    "content_type", "content_encoding", "headers", "delivery_mode", "priority", "correlation_id",
    "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id", "cluster_id",
)  # fmt: skip


def property_names(props: Any) -> list[str]:
    """The AMQP basic properties that are set on ``props`` (what goes on the wire), sorted."""
    return sorted(n for n in _PROPERTY_NAMES if getattr(props, n, None) is not None)


# -- queue depth --------------------------------------------------------------------------------
class Broker:
    """A blocking admin connection: declare, bind, count and delete queues."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def keep_alive(self) -> None:
        """Answer the broker's heartbeats. A BlockingConnection does that only while it is
        used; a step that leaves it idle past the heartbeat timeout (the kit draining 100k
        events takes about two minutes) would find it closed by the broker."""
        self.connection.process_data_events(time_limit=0)

    def declare_exchange(self, exchange: str) -> None:
        """Exactly as cdc-relay declares it (topic, durable, with its alternate exchange)."""
        self.channel.exchange_declare(
            exchange,
            "topic",
            durable=True,
            arguments={"alternate-exchange": f"{exchange}.unroutable"},
        )

    def fresh_queue(self, queue: str, exchange: str, quorum: bool = False) -> None:
        self.channel.queue_delete(queue)
        arguments = {"x-queue-type": "quorum"} if quorum else None
        self.channel.queue_declare(queue, durable=True, arguments=arguments)
        self.channel.queue_bind(queue, exchange, "#")

    def delete_queue(self, queue: str) -> None:
        self.channel.queue_delete(queue)

    def sample(self, queue: str) -> dict[str, Any] | None:
        """Take one message off ``queue``: its body size, property and header names (what a
        publisher really sent); None when the queue is empty."""
        method, props, body = self.channel.basic_get(queue, auto_ack=True)
        if method is None or props is None or body is None:
            return None
        return {
            "body_bytes": len(body),
            "properties": property_names(props),
            "headers": sorted(props.headers or {}),
        }

    def depth(self, queue: str) -> int:
        ok = self.channel.queue_declare(queue, durable=True, passive=True)
        return int(ok.method.message_count)

    def wait_depth(
        self, queue: str, n: int, timeout: float, interval: float = 0.02, alive: Any = None
    ) -> tuple[float, int]:
        """Poll until ``queue`` holds ``n`` messages → (unix time seen, depth).

        Gives up at ``timeout``, or when ``alive()`` turns false and the depth has not moved
        for two seconds (the publisher died or lost messages); the caller checks the depth.
        """
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while True:
            d = self.depth(queue)
            now = time.monotonic()
            if d >= n:
                return time.time(), d
            if d != last:
                last, last_change = d, now
            if now > deadline:
                return time.time(), d
            if alive is not None and not alive() and now - last_change > 2:
                return time.time(), d
            time.sleep(interval)


# -- latency consumer ---------------------------------------------------------------------------
class _Times(msgspec.Struct):
    committed_at: str | None = None
    occurred_at: str | None = None


_decoder = msgspec.json.Decoder(_Times)


def _epoch(text: str | None) -> float | None:
    if text is None:
        return None
    return dt.datetime.fromisoformat(text).timestamp()


def receipt_ages(received: list[tuple[float, bytes]]) -> dict[str, Any]:
    """Per-event age at receipt, from (receipt time, envelope body) pairs: receipt minus the
    envelope's ``committed_at`` and its ``occurred_at``, in seconds. Decoded after the clock
    stopped, so a consumer measuring itself pays nothing for it while it consumes."""
    committed: list[float] = []
    occurred: list[float] = []
    size = 0
    for t, body in received:
        times = _decoder.decode(body)
        size += len(body)
        c = _epoch(times.committed_at)
        o = _epoch(times.occurred_at)
        if c is not None:
            committed.append(t - c)
        if o is not None:
            occurred.append(t - o)
    return {
        "received": len(received),
        "first_receipt": received[0][0] if received else 0.0,
        "last_receipt": received[-1][0] if received else 0.0,
        "avg_body_bytes": size / len(received) if received else 0,
        "commit_latency_s": committed,
        "created_latency_s": occurred,
    }


def consume(url: str, queue: str, out: Path, max_seconds: float) -> int:
    received: list[tuple[float, bytes]] = []
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()

    def on_message(_ch: Any, _method: Any, _props: Any, body: bytes) -> None:
        received.append((time.time(), body))

    channel.basic_consume(queue, on_message, auto_ack=True)
    print(json.dumps({"event": "ready", "t": time.time()}), flush=True)
    expected: int | None = None
    deadline = time.monotonic() + max_seconds
    stdin = sys.stdin
    while time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.05)
        if expected is None and select.select([stdin], [], [], 0)[0]:
            line = stdin.readline()
            expected = int(line) if line.strip() else 0
        if expected is not None and len(received) >= expected:
            break
    connection.close()
    out.write_text(json.dumps({"expected": expected, **receipt_ages(received)}))
    print(json.dumps({"event": "done", "t": time.time(), "received": len(received)}), flush=True)
    return 0


def otlp_sink(max_seconds: float) -> int:
    """Accept OTLP/HTTP trace exports, count spans, answer 200; stop on SIGTERM."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    counts = {"spans": 0, "requests": 0, "bytes": 0, "publish_spans": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            spans = [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
            with lock:
                counts["requests"] += 1
                counts["bytes"] += len(body)
                counts["spans"] += len(spans)
                counts["publish_spans"] += sum(s.name.startswith("publish ") for s in spans)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(json.dumps({"event": "ready", "t": time.time(), "port": server.server_port}), flush=True)
    stop.wait(max_seconds)
    server.shutdown()
    server.server_close()
    with lock:
        print(json.dumps({"event": "done", "t": time.time(), **counts}), flush=True)
    return 0


@contextmanager
def broker(url: str) -> Iterator[Broker]:
    b = Broker(url)
    try:
        yield b
    finally:
        b.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("consume", help="latency consumer")
    p.add_argument("--url", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-seconds", type=float, default=120)
    s = sub.add_parser("otlp-sink", help="OTLP/HTTP trace receiver that counts spans")
    s.add_argument("--max-seconds", type=float, default=1800)
    args = parser.parse_args(argv)
    if not 0 < args.max_seconds <= 3600:
        parser.error("--max-seconds must be in (0, 3600]")
    if args.command == "otlp-sink":
        return otlp_sink(args.max_seconds)
    return consume(args.url, args.queue, args.out, args.max_seconds)


if __name__ == "__main__":
    sys.exit(main())
