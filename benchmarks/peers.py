"""What cdc-relay is compared with, each run as its own process (like the relay itself).

``pika``     the broker ceiling: a raw pika ``SelectConnection`` publisher with pipelined
             confirms (at most ``--window`` unconfirmed, like the relay's ``max_in_flight``),
             persistent + mandatory messages of the same size and property set as the relay's
             (its envelope-v1 body, its seven properties and three headers; ``--slot`` names
             the relay's slot, which the envelope carries). ``--minimal``: the body is the
             payload alone (the same bytes, no envelope) and the only properties are
             ``delivery_mode=2`` and ``message_id``. Bodies and properties are built before the
             clock starts.
``polling``  a polling outbox relay written well: ``SELECT ... ORDER BY seq FOR UPDATE SKIP
             LOCKED LIMIT batch``, publish the whole batch with pipelined confirms, ``DELETE`` the
             batch, commit; poll again at once after a non-empty batch, after ``--idle`` seconds
             when the table was empty.
``naive``    the same loop, but a ``BlockingConnection`` publishing and confirming one message at
             a time.
``consumer`` what ``cdc-relay consume`` is compared with: a bare pika consumer, the way it is
             written by hand: ``BlockingConnection``, ``basic_qos(prefetch)``, ``consume()``,
             one ``basic_ack`` per message, nothing else done with it. It stops after
             ``--count`` messages, or after the count it reads from stdin (sent once the
             producer knows it); ``--ages FILE`` keeps each receipt time and body and writes
             commit → receipt ages after the clock stopped.

Each prints JSON lines on stdout: ``{"event": "ready", "t": <unix time>}`` when connected (the
moment its clock starts), then ``{"event": "done", ...}`` with its own counts. Every loop is
bounded by ``--max-seconds``; SIGTERM stops the pollers after the batch in flight.

    python -m benchmarks.peers pika --url URL --exchange bench --count 100000 --payload 150
    python -m benchmarks.peers polling --dsn DSN --url URL --exchange bench
    python -m benchmarks.peers consumer --url URL --queue Q --prefetch 100 --count 20000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import select
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import psycopg
from pika.adapters.select_connection import SelectConnection

from benchmarks.probe import property_names, receipt_ages
from benchmarks.workload import POLL_OUTBOX, envelope, pad_length, payload_text, sample_message

ROUTING_KEY = "order.OrderPlaced"
POOL = 20_000  # distinct prebuilt messages of the pika ceiling
POOL_BYTES = 64 * 1024 * 1024  # ... and at most this many body bytes of them (64 KB payloads)
APP_ID = "cdc-relay"  # the same property set (and so the same header frame size) as the relay


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def properties(message_id: str, headers: dict[str, str], timestamp: int) -> Any:
    return pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,
        message_id=message_id,
        type="OrderPlaced",
        timestamp=timestamp,
        app_id=APP_ID,
        headers=headers,
    )


class _Stop:
    """SIGTERM/SIGINT → a flag the loops check between batches."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_: object) -> None:
        self.requested = True


def minimal_message(i: int, pad: int) -> tuple[bytes, Any]:
    """The least a publisher can send for one event: the payload bytes alone as the body, and
    two properties (persistent, and the event id as ``message_id``)."""
    body = payload_text(i, pad).encode()
    return body, pika.BasicProperties(delivery_mode=2, message_id=str(uuid.uuid4()))


# -- raw pika ceiling -------------------------------------------------------------------------
class PikaCeiling:
    def __init__(
        self,
        url: str,
        exchange: str,
        count: int,
        window: int,
        pad: int,
        minimal: bool = False,
        slot: str = "bench",
    ) -> None:
        self.exchange = exchange
        self.count = count
        self.window = window
        now = int(time.time())
        self.messages: list[tuple[bytes, Any]] = []
        # a pool of distinct messages, reused round-robin so a million needs no gigabyte
        pool = min(count, POOL, max(100, POOL_BYTES // (pad + 500)))
        for i in range(pool):
            if minimal:
                self.messages.append(minimal_message(i, pad))
            else:
                mid, body, headers = sample_message(i, pad, slot=slot)
                self.messages.append((body, properties(mid, headers, now)))
        self.pool = len(self.messages)
        self.body_bytes = len(self.messages[0][0]) if self.messages else 0
        first = self.messages[0][1] if self.messages else None
        self.property_names = property_names(first) if first is not None else []
        self.header_names = sorted((first.headers or {}) if first is not None else {})
        self.sent = 0
        self.acked = 0
        self.failures = 0
        self.channel: Any = None
        self.started = 0.0
        self.finished = 0.0
        self.cpu_started = 0.0
        self.cpu_used = 0.0
        params = pika.URLParameters(url)
        params.heartbeat = 30
        self.connection: Any = SelectConnection(
            params,
            on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel),
            on_open_error_callback=lambda _c, err: self._abort(f"connect failed: {err}"),
            on_close_callback=lambda _c, _reason: self.connection.ioloop.stop(),
        )

    def _abort(self, why: str) -> None:
        emit("error", error=why)
        self.connection.ioloop.stop()

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: Any) -> None:
        self.started = time.time()
        self.cpu_started = time.process_time()
        emit(
            "ready",
            body_bytes=self.body_bytes,
            properties=self.property_names,
            headers=self.header_names,
        )
        self._fill()

    def _fill(self) -> None:
        publish = self.channel.basic_publish
        pool = self.pool
        while self.sent < self.count and self.sent - self.acked < self.window:
            body, props = self.messages[self.sent % pool]
            publish(self.exchange, ROUTING_KEY, body, props, mandatory=True)
            self.sent += 1

    def _on_return(self, *_: Any) -> None:
        self.failures += 1

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self.failures += 1
        tag = method.delivery_tag
        self.acked = tag if method.multiple else max(self.acked, tag)
        if self.acked >= self.count:
            self.finished = time.time()
            self.cpu_used = time.process_time() - self.cpu_started
            self.connection.close()
            return
        self._fill()

    def run(self, max_seconds: float) -> int:
        self.connection.ioloop.call_later(max_seconds, self.connection.close)
        self.connection.ioloop.start()
        elapsed = (self.finished or time.time()) - self.started if self.started else 0.0
        emit(
            "done",
            published=self.sent,
            confirmed=self.acked,
            failures=self.failures,
            seconds=elapsed,
            rate=self.acked / elapsed if elapsed > 0 else 0.0,
            cpu_s=self.cpu_used,
        )
        return 0 if self.acked >= self.count and not self.failures else 1


class PacedPika:
    """Latency floor: publish ``burst`` messages every ``burst / rate`` s, each stamped with its
    publish time as ``committed_at``, so the consumer measures publish → receipt through the
    same broker, queue and consumer as the relays (no database, no relay)."""

    def __init__(self, url: str, exchange: str, rate: float, burst: int, seconds: float) -> None:
        self.exchange = exchange
        self.interval = burst / rate
        self.burst = burst
        self.total = int(rate * seconds) // burst * burst
        self.pad = 0
        self.sent = 0
        self.acked = 0
        self.start = 0.0
        self.worst_lag = 0.0
        self.channel: Any = None
        params = pika.URLParameters(url)
        params.heartbeat = 30
        self.connection: Any = SelectConnection(
            params,
            on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel),
            on_open_error_callback=lambda _c, err: emit("error", error=f"connect failed: {err}"),
            on_close_callback=lambda _c, _reason: self.connection.ioloop.stop(),
        )

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: Any) -> None:
        emit("ready")
        self.start = time.monotonic()
        self._tick()

    def _tick(self) -> None:
        now = time.time()
        stamp = dt.datetime.fromtimestamp(now, dt.UTC).isoformat().replace("+00:00", "Z")
        base = self.sent
        for i in range(base, base + self.burst):
            mid, body, headers = sample_message(i, self.pad, stamp)
            props = properties(mid, headers, int(now))
            self.channel.basic_publish(self.exchange, ROUTING_KEY, body, props, mandatory=True)
        self.sent += self.burst
        if self.sent >= self.total:
            return
        due = self.start + (self.sent // self.burst) * self.interval
        delay = due - time.monotonic()
        self.worst_lag = max(self.worst_lag, -delay)
        self.connection.ioloop.call_later(max(0.0, delay), self._tick)

    def _on_confirm(self, frame: Any) -> None:
        self.acked = max(self.acked, frame.method.delivery_tag)
        if self.acked >= self.total:
            self.connection.close()

    def run(self, max_seconds: float, pad: int) -> int:
        self.pad = pad
        self.connection.ioloop.call_later(max_seconds, self.connection.close)
        self.connection.ioloop.start()
        emit("done", committed=self.sent, confirmed=self.acked, worst_lag_s=self.worst_lag)
        return 0 if self.acked >= self.total else 1


# -- polling relays -----------------------------------------------------------------------------
SELECT_BATCH = f"""
SELECT seq, id::text, aggregateid, payload::text,
       to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
FROM {POLL_OUTBOX}
ORDER BY seq
FOR UPDATE SKIP LOCKED
LIMIT %s
"""
DELETE_BATCH = f"DELETE FROM {POLL_OUTBOX} WHERE seq = ANY(%s)"

Row = tuple[int, str, str, str | None, str]


def _message(row: Row) -> tuple[bytes, Any]:
    seq, event_id, aggregate_id, payload, created_at = row
    body = envelope(
        event_id,
        aggregate_id,
        b"null" if payload is None else payload.encode(),
        created_at,
        None,  # a poller cannot know the commit time
        {"seq": seq, "table": POLL_OUTBOX},
    )
    headers = {"aggregate_type": "order", "aggregate_id": aggregate_id, "source_seq": str(seq)}
    return body, properties(event_id, headers, int(time.time()))


def cycle_summary(cycles: list[tuple[float, float, float, int]]) -> dict[str, object]:
    """p50/p99/max in ms of each phase of the non-empty polling cycles, and batch sizes."""
    if not cycles:
        return {}

    def pct(values: list[float]) -> dict[str, float]:
        v = sorted(values)
        return {
            "p50": round(v[len(v) // 2], 2),
            "p99": round(v[min(len(v) - 1, int(len(v) * 0.99))], 2),
            "max": round(v[-1], 2),
        }

    names = ("select_ms", "confirm_wait_ms", "delete_commit_ms")
    out: dict[str, object] = {
        name: pct([c[i] * 1000 for c in cycles]) for i, name in enumerate(names)
    }
    out["batch_rows"] = pct([float(c[3]) for c in cycles])
    out["cycles"] = len(cycles)
    return out


class PollingRelay:
    """SELECT … FOR UPDATE SKIP LOCKED → publish batch, pipelined confirms → DELETE → COMMIT."""

    def __init__(self, dsn: str, url: str, exchange: str, batch: int, idle: float) -> None:
        self.exchange = exchange
        self.batch = batch
        self.idle = idle
        self.stop = _Stop()
        self.pg = psycopg.connect(dsn)
        self.cur = self.pg.cursor()
        self.outstanding: set[int] = set()
        self.seqs: list[int] = []
        self.next_tag = 1
        self.published = 0
        self.polls = 0
        self.empty_polls = 0
        self.failures = 0
        self.deadline = 0.0
        # where a cycle's time goes: (select, wait for confirms, delete + commit) seconds, rows
        self.cycles: list[tuple[float, float, float, int]] = []
        self._t_select = 0.0
        self._t_published = 0.0
        params = pika.URLParameters(url)
        params.heartbeat = 30
        self.channel: Any = None
        self.connection: Any = SelectConnection(
            params,
            on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel),
            on_open_error_callback=lambda _c, err: self._fail(f"connect failed: {err}"),
            on_close_callback=lambda _c, _reason: self.connection.ioloop.stop(),
        )

    def _fail(self, why: str) -> None:
        self.failures += 1
        emit("error", error=why)
        self.connection.ioloop.stop()

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_return_callback(lambda *_: self._fail("message returned unroutable"))
        channel.confirm_delivery(self._on_confirm, callback=lambda _f: self._ready())

    def _ready(self) -> None:
        emit("ready")
        self._poll()

    def _poll(self) -> None:
        if self.stop.requested or time.monotonic() > self.deadline:
            self.pg.rollback()
            self.connection.close()
            return
        self.polls += 1
        t0 = time.perf_counter()
        rows: list[Row] = self.cur.execute(SELECT_BATCH, (self.batch,), prepare=True).fetchall()
        self._t_select = time.perf_counter() - t0
        if not rows:
            self.empty_polls += 1
            self.pg.rollback()  # end the snapshot; nothing to delete
            self.connection.ioloop.call_later(self.idle, self._poll)
            return
        publish = self.channel.basic_publish
        self.seqs = [r[0] for r in rows]
        first = self.next_tag
        for row in rows:
            body, props = _message(row)
            publish(self.exchange, ROUTING_KEY, body, props, mandatory=True)
        self.next_tag += len(rows)
        self.outstanding = set(range(first, self.next_tag))
        self._t_published = time.perf_counter()

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self._fail("broker nacked a message")
            return
        tag = method.delivery_tag
        if method.multiple:
            self.outstanding = {t for t in self.outstanding if t > tag}
        else:
            self.outstanding.discard(tag)
        if self.outstanding or not self.seqs:
            return
        t0 = time.perf_counter()
        self.cur.execute(DELETE_BATCH, (self.seqs,), prepare=True)
        self.pg.commit()
        t1 = time.perf_counter()
        self.cycles.append((self._t_select, t0 - self._t_published, t1 - t0, len(self.seqs)))
        self.published += len(self.seqs)
        self.seqs = []
        self.connection.ioloop.add_callback_threadsafe(self._poll)

    def run(self, max_seconds: float) -> int:
        self.deadline = time.monotonic() + max_seconds
        self.connection.ioloop.start()
        self.pg.close()
        emit(
            "done",
            published=self.published,
            polls=self.polls,
            empty_polls=self.empty_polls,
            failures=self.failures,
            cycles=cycle_summary(self.cycles),
        )
        return 1 if self.failures else 0


def naive_relay(dsn: str, url: str, exchange: str, batch: int, idle: float, seconds: float) -> int:
    """The relay people write first: a blocking publish that waits for each confirm."""
    stop = _Stop()
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    published = 0
    deadline = time.monotonic() + seconds
    with psycopg.connect(dsn) as pg:
        cur = pg.cursor()
        emit("ready")
        while not stop.requested and time.monotonic() < deadline:
            rows: list[Row] = cur.execute(SELECT_BATCH, (batch,), prepare=True).fetchall()
            if not rows:
                pg.rollback()
                time.sleep(idle)
                continue
            for row in rows:
                body, props = _message(row)
                # raises UnroutableError / NackError; waits for this message's confirm
                channel.basic_publish(exchange, ROUTING_KEY, body, props, mandatory=True)
            cur.execute(DELETE_BATCH, ([r[0] for r in rows],), prepare=True)
            pg.commit()
            published += len(rows)
    connection.close()
    emit("done", published=published, failures=0)
    return 0


# -- bare consumer ----------------------------------------------------------------------------
def bare_consumer(
    url: str,
    queue: str,
    prefetch: int,
    count: int | None,
    ages: Path | None,
    max_seconds: float,
) -> int:
    """Take messages off ``queue`` and acknowledge each: the least a consumer with manual acks
    does, so the kit's ratio to it is what the kit itself adds (decode, inbox, transaction).

    Its clock runs from ``ready`` (just before ``consume()``) to the last ``basic_ack``; its CPU
    over the same span. Without ``count`` it waits for one line on stdin with the number to
    take, read between messages only when the queue is idle or every 256 messages.
    """
    stop = _Stop()
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)
    kept: list[tuple[float, bytes]] = []
    expected = count
    acked = 0
    last_ack = 0.0
    emit("ready")
    cpu0 = time.process_time()
    cpu = 0.0
    deadline = time.monotonic() + max_seconds
    for method, _props, body in channel.consume(queue, inactivity_timeout=0.05):
        if method is not None:
            if ages is not None:
                kept.append((time.time(), body))
            channel.basic_ack(method.delivery_tag)
            acked += 1
            last_ack = time.time()
            cpu = time.process_time() - cpu0
        idle_or_due = method is None or acked % 256 == 0
        if expected is None and idle_or_due and select.select([sys.stdin], [], [], 0)[0]:
            line = sys.stdin.readline()
            expected = int(line) if line.strip() else 0
        if expected is not None and acked >= expected:
            break
        if stop.requested or time.monotonic() > deadline:
            break
    channel.cancel()
    connection.close()
    if ages is not None:
        receipts = [t for t, _ in kept]
        ages.write_text(
            json.dumps({"expected": expected, "receipts": receipts, **receipt_ages(kept)})
        )
    emit("done", acked=acked, expected=expected, last_ack_t=last_ack, cpu_s=cpu)
    return 0 if expected is not None and acked >= expected else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pika", help="raw pika publisher with pipelined confirms (ceiling)")
    p.add_argument("--url", required=True)
    p.add_argument("--exchange", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--window", type=int, default=2000)
    p.add_argument("--payload", type=int, default=150)
    p.add_argument("--max-seconds", type=float, default=300)
    p.add_argument(
        "--minimal",
        action="store_true",
        help="body = the payload alone, properties = delivery_mode and message_id only",
    )
    p.add_argument("--slot", default="bench", help="the slot name the envelope carries")
    p = sub.add_parser("paced", help="raw pika at a fixed rate, for the latency floor")
    p.add_argument("--url", required=True)
    p.add_argument("--exchange", required=True)
    p.add_argument("--rate", type=float, default=2000)
    p.add_argument("--burst", type=int, default=10)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--payload", type=int, default=150)
    p.add_argument("--max-seconds", type=float, default=300)
    for name in ("polling", "naive"):
        q = sub.add_parser(name, help=f"{name} outbox relay")
        q.add_argument("--dsn", required=True)
        q.add_argument("--url", required=True)
        q.add_argument("--exchange", required=True)
        q.add_argument("--batch", type=int, default=2000)
        q.add_argument("--idle", type=float, default=0.01, help="sleep after an empty poll (s)")
        q.add_argument("--max-seconds", type=float, default=300)
    p = sub.add_parser("consumer", help="bare pika consumer with manual acks (the kit's peer)")
    p.add_argument("--url", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--prefetch", type=int, default=100)
    p.add_argument("--count", type=int, help="messages to take (default: a number on stdin)")
    p.add_argument("--ages", type=Path, help="write commit → receipt ages to this file")
    p.add_argument("--max-seconds", type=float, default=300)
    args = parser.parse_args(argv)
    if not 0 < args.max_seconds <= 3600:
        parser.error("--max-seconds must be in (0, 3600]")
    if args.command == "pika":
        ceiling = PikaCeiling(
            args.url,
            args.exchange,
            args.count,
            args.window,
            pad_length(args.payload),
            minimal=args.minimal,
            slot=args.slot,
        )
        return ceiling.run(args.max_seconds)
    if args.command == "paced":
        paced = PacedPika(args.url, args.exchange, args.rate, args.burst, args.seconds)
        return paced.run(args.max_seconds, pad_length(args.payload))
    if args.command == "consumer":
        if not 0 < args.prefetch <= 65535:
            parser.error("--prefetch must be in (0, 65535]")
        return bare_consumer(
            args.url, args.queue, args.prefetch, args.count, args.ages, args.max_seconds
        )
    if args.command == "polling":
        relay = PollingRelay(args.dsn, args.url, args.exchange, args.batch, args.idle)
        return relay.run(args.max_seconds)
    return naive_relay(args.dsn, args.url, args.exchange, args.batch, args.idle, args.max_seconds)


if __name__ == "__main__":
    sys.exit(main())
