"""Building blocks for integration tests: a per-test database, the relay as a real process, an
independent consumer, and an outbox writer. Each test gets its own database, slot, exchange and
queue on the suite's shared servers, so tests cannot see each other's events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pika
import psycopg
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.sandbox import PostgresSandbox, RabbitSandbox

REPO = Path(__file__).resolve().parents[2]


def dsn_for(pg: PostgresSandbox, dbname: str) -> str:
    return pg.url.rsplit("/", 1)[0] + "/" + dbname


def drop_database(pg: PostgresSandbox, name: str) -> None:
    """A test's database and its slot (named like it), after the test."""
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active",
            (name,),
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def log_records(log: str) -> list[dict[str, Any]]:
    """The structured lines of a relay's or consumer's log (a traceback's lines are skipped)."""
    out: list[dict[str, Any]] = []
    for line in log.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def count_records(log: str, msg: str, contains: str = "") -> int:
    """Log lines with this message whose error contains ``contains``."""
    return sum(
        1 for r in log_records(log) if r.get("msg") == msg and contains in str(r.get("error", ""))
    )


@contextmanager
def inbox_database(pg: PostgresSandbox, source_dbname: str) -> Iterator[str]:
    """A consumer's own database beside the source one, with the table the test handlers
    (``tests.integration.handlers``) write to; yields its DSN, drops it afterwards."""
    name = f"{source_dbname}_inbox"[:63]
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    dsn = dsn_for(pg, name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE applied_events (n bigserial PRIMARY KEY, event_id text NOT NULL, "
            "aggregate_id text NOT NULL, seq int)"
        )
    try:
        yield dsn
    finally:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


@dataclass
class Delivery:
    message_id: str
    routing_key: str
    body: dict[str, Any]
    headers: dict[str, Any]
    properties: pika.BasicProperties
    raw: bytes

    @classmethod
    def from_pika(cls, method: Any, props: pika.BasicProperties, body: bytes) -> Delivery:
        """One message as a consumer received it (pika's basic.deliver, properties, body)."""
        return cls(
            message_id=props.message_id,
            routing_key=method.routing_key,
            body=json.loads(body),
            headers=dict(props.headers or {}),
            properties=props,
            raw=body,
        )


@dataclass
class Env:
    """Everything one test needs: names, DSNs, and helpers bound to them."""

    pg: PostgresSandbox
    rabbit: RabbitSandbox
    name: str
    dbname: str
    dsn: str
    exchange: str
    queue: str
    tmp: Path
    relays: list[Relay] = field(default_factory=list)

    def relay_env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_RELAY_")}
        env.update(
            CDC_RELAY_PG_DSN=self.dsn,
            CDC_RELAY_AMQP_URL=self.rabbit.amqp_url,
            CDC_RELAY_SLOT=self.name,
            CDC_RELAY_PUBLICATION=self.name,
            CDC_RELAY_EXCHANGE=self.exchange,
            CDC_RELAY_STATUS_INTERVAL="1",
            CDC_RELAY_LOG_LEVEL="info",
            CDC_RELAY_RECONNECT_MIN="0.2",
            CDC_RELAY_RECONNECT_MAX="2",
            CDC_RELAY_HTTP_ADDRESS="127.0.0.1:0",
            # idle WAL is confirmed only up to the last publication check: check often here
            CDC_RELAY_PUBLICATION_CHECK_INTERVAL="2",
            PYTHONUNBUFFERED="1",
        )
        env.update({f"CDC_RELAY_{k.upper()}": v for k, v in overrides.items()})
        return env

    def cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cdc_relay.cli", *args],
            env=env or self.relay_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            check=False,
        )

    def init(self) -> None:
        out = self.cli("init", "--create-outbox")
        assert out.returncode == 0, out.stderr
        self.bind_queue()

    def start_relay(self, **overrides: str) -> Relay:
        return self.start_relay_with_env({}, **overrides)

    def start_relay_with_env(self, env_extra: dict[str, str], **overrides: str) -> Relay:
        """Like ``start_relay`` with extra process environment (OTEL_*, failpoints)."""
        relay = Relay(self, {**self.relay_env(**overrides), **env_extra}, len(self.relays))
        self.relays.append(relay)
        return relay

    @contextmanager
    def sql(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            yield conn

    def bind_queue(self) -> None:
        """Declare the exchange exactly as the relay does (with its alternate exchange)."""
        with self.channel() as ch:
            ch.exchange_declare(
                self.exchange,
                "topic",
                durable=True,
                arguments={"alternate-exchange": f"{self.exchange}.unroutable"},
            )
            ch.queue_declare(self.queue, durable=True)
            ch.queue_bind(self.queue, self.exchange, "#")

    @contextmanager
    def channel(self) -> Iterator[Any]:
        conn = pika.BlockingConnection(pika.URLParameters(self.rabbit.amqp_url))
        try:
            yield conn.channel()
        finally:
            if conn.is_open:
                conn.close()

    def consume_all(
        self, expected_ids: list[str], timeout: float = 90, settle: float = 1.5
    ) -> list[Delivery]:
        """Consume until every expected id arrived at least once (across reconnects and
        faults), then ``settle`` seconds more to catch late duplicates or events that should
        not exist."""
        want = set(expected_ids)
        seen: set[str] = set()
        got: list[Delivery] = []
        deadline = time.monotonic() + timeout
        while not want <= seen and time.monotonic() < deadline:
            batch = self.consume(
                len(want - seen), timeout=max(0.5, deadline - time.monotonic()), settle=0.2
            )
            got.extend(batch)
            seen.update(d.message_id for d in batch)
        got.extend(self.consume(0, timeout=settle + 5, settle=settle))
        return got

    def consume(self, expected: int, timeout: float = 60, settle: float = 0.5) -> list[Delivery]:
        """Read until ``expected`` messages arrived (or timeout), then ``settle`` more seconds
        to catch extras (duplicates or events that should not exist)."""
        out: list[Delivery] = []
        deadline = time.monotonic() + timeout
        with self.channel() as ch:
            ch.basic_qos(prefetch_count=1000)
            settle_until: float | None = None
            for method, props, body in ch.consume(self.queue, inactivity_timeout=0.2):
                if method is not None:
                    out.append(Delivery.from_pika(method, props, body))
                    ch.basic_ack(method.delivery_tag)
                now = time.monotonic()
                if len(out) >= expected and settle_until is None:
                    settle_until = now + settle
                if (settle_until is not None and now >= settle_until) or now >= deadline:
                    break
            ch.cancel()
        return out

    def queue_depth(self) -> int:
        with self.channel() as ch:
            return int(
                ch.queue_declare(self.queue, durable=True, passive=True).method.message_count
            )

    def slot_flush(self) -> int:
        with self.sql() as c:
            row = c.execute(
                "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (self.name,),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def current_lsn(self) -> int:
        with self.sql() as c:
            row = c.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        assert row is not None
        return int(row[0])

    def invalidate_slot(self) -> None:
        """Make the test's slot lost for real: a 1 MB ``max_slot_wal_keep_size`` and WAL
        switched and checkpointed past it; the limit is reset before returning (the server is
        shared with the other tests)."""
        with psycopg.connect(self.pg.url, autocommit=True) as admin:
            try:
                admin.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
                admin.execute("SELECT pg_reload_conf()")
                deadline = time.monotonic() + 30
                with self.sql() as conn:
                    conn.execute("CREATE TABLE IF NOT EXISTS wal_filler (x int)")
                    while True:
                        row = conn.execute(
                            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                            (self.name,),
                        ).fetchone()
                        if row is not None and row[0] == "lost":
                            break
                        assert time.monotonic() < deadline, f"slot never invalidated: {row}"
                        conn.execute("INSERT INTO wal_filler VALUES (1)")
                        conn.execute("SELECT pg_switch_wal()")
                        conn.execute("CHECKPOINT")
            finally:
                admin.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
                admin.execute("SELECT pg_reload_conf()")
        self.wait_for(
            lambda: self._setting("max_slot_wal_keep_size") == "-1",
            timeout=10,
            what="max_slot_wal_keep_size to be reset",
        )

    def _setting(self, name: str) -> str | None:
        with self.sql() as conn:
            row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
        return None if row is None else str(row[0])

    def wait_for(self, predicate: Any, timeout: float = 30, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Relay:
    """cdc-relay as a real child process, so signals and kill -9 behave as in production."""

    def __init__(self, env: Env, proc_env: dict[str, str], index: int) -> None:
        self.log_path = env.tmp / f"relay-{index}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdc_relay.cli", "run"],
            env=proc_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http_port(self, timeout: float = 30) -> int:
        """The port the relay's /metrics, /healthz and /readyz listen on (from its log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if '"http endpoints listening"' in line:
                    return int(json.loads(line)["port"])
            time.sleep(0.05)
        raise AssertionError(f"relay did not report its http port:\n{self.log()}")

    def wait_streaming(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if '"msg": "streaming"' in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"relay not streaming after {timeout}s:\n{self.log()}")

    def terminate(self, timeout: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"relay ignored SIGTERM:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        self._log.close()


def outbox_row(
    aggregate: str, seq: int, payload: Any = None, type_: str = "OrderPlaced"
) -> tuple[str, str, str, str, str | None]:
    body = {"seq": seq, "aggregate": aggregate} if payload is None else payload
    return (str(uuid.uuid4()), "order", aggregate, type_, None if body is ... else json.dumps(body))


def insert_events(
    conn: psycopg.Connection[tuple[Any, ...]], rows: Iterable[tuple[str, str, str, str, str | None]]
) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
            "VALUES (%s, %s, %s, %s, %s::jsonb)",
            list(rows),
        )


def assert_per_aggregate_order(deliveries: list[Delivery]) -> None:
    """First deliveries of each aggregate arrive in ascending ``seq`` order."""
    seen: set[str] = set()
    last: dict[str, int] = {}
    for d in deliveries:
        if d.message_id in seen:
            continue
        seen.add(d.message_id)
        agg = d.body["aggregate_id"]
        seq = d.body["payload"]["seq"]
        assert seq > last.get(agg, -1), f"aggregate {agg}: seq {seq} after {last[agg]}"
        last[agg] = seq


class Flood:
    """Writes outbox transactions from a background thread until stopped (bounded by ``limit``).

    Commit order is recorded, so checks can compare per-aggregate order with what committed.
    Transactions that fail because the server went away are retried; ones the test rolls back
    on purpose are remembered as forbidden.
    """

    def __init__(
        self,
        env: Env,
        aggregates: int = 20,
        batch: int = 50,
        limit: int = 100_000,
        pause: float = 0.0,
    ) -> None:
        import threading

        self.env = env
        self.aggregates = aggregates
        self.batch = batch
        self.limit = limit
        self.pause = pause
        self.committed: list[str] = []
        self.rolled_back: set[str] = set()
        # a commit whose answer was lost with the connection may or may not have happened
        self.uncertain: set[str] = set()
        self._stop = threading.Event()
        self._seq: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Flood:
        self._thread.start()
        return self

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(120)
        return self.committed

    def wait_for(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.committed) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.committed) >= n, f"flood wrote only {len(self.committed)} of {n}"

    def _rows(self) -> list[tuple[str, str, str, str, str | None]]:
        rows = []
        for i in range(self.batch):
            agg = f"AGG-{(len(self.committed) + i) % self.aggregates}"
            seq = self._seq.get(agg, -1) + 1
            self._seq[agg] = seq
            rows.append(outbox_row(agg, seq))
        return rows

    def _run(self) -> None:
        conn: psycopg.Connection[tuple[Any, ...]] | None = None
        n = 0
        while not self._stop.is_set() and len(self.committed) < self.limit:
            saved = dict(self._seq)
            rows: list[tuple[str, str, str, str, str | None]] = []
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.env.dsn, autocommit=True, connect_timeout=3)
                rows = self._rows()
                n += 1
                if n % 7 == 0:
                    conn.execute("BEGIN")
                    insert_events(conn, rows)
                    conn.execute("ROLLBACK")
                    self._seq = saved
                    self.rolled_back.update(r[0] for r in rows)
                else:
                    with conn.transaction():
                        insert_events(conn, rows)
                    self.committed.extend(r[0] for r in rows)
            except psycopg.Error:
                # server restarting: the commit may or may not have happened
                self.uncertain.update(r[0] for r in rows)
                self._seq = saved
                conn = None
                time.sleep(0.2)
            if self.pause:
                time.sleep(self.pause)
        if conn is not None:
            conn.close()


class OtlpReceiver:
    """A minimal OTLP/HTTP (protobuf) trace receiver on loopback: the spans, and every export
    body as it arrived (protobuf carries strings verbatim, so a secret can be searched for)."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.bodies: list[bytes] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.bodies.append(body)
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        receiver.spans.extend(ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
