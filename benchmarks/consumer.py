"""The consumer section: ``cdc-relay consume`` (the kit) against a bare pika consumer.

drain   The relay streams N committed outbox rows (10 per transaction) into two durable queues
        at once, so both consumers get the very same envelopes. Then, in alternating order per
        round, a bare pika consumer (``peers.py consumer``: manual acks, the kit's prefetch,
        nothing done per message) drains one queue and the kit, with a handler that does nothing
        (``handlers.apply_nothing``), the other: the ratio is what the kit itself costs per
        event (decode, the inbox row and ordering guard, one transaction, the ack). Bare: its
        ``ready`` line → its last ack. Kit: its ``consuming`` log record → the newest
        ``applied_at`` in its inbox once the inbox holds N rows (counted there); then it is
        stopped. CPU per event: the consumer process over the same span, and for the kit also
        the PostgreSQL backend serving its inbox connection (from that backend's start).
steady  A writer commits 10-row transactions at the plan's rate (2,000 ev/s) for
        ``consumer_seconds``, the relay streams them, and either the kit applies them with a
        warehouse handler (``handlers.reserve_stock``: one upsert of a stock row) or the bare
        consumer takes them. Age per event, kit: ``applied_at - committed_at`` read from its
        inbox (``applied_at`` is ``clock_timestamp()`` at the inbox insert, inside the
        transaction: before the handler, the commit and the ack); bare: its receipt time minus
        the envelope's ``committed_at``. Both clocks are this machine's. The worst age per
        second of commit time is kept too, to tell a stall from a growing backlog.
light   The same at 500 ev/s, a rate the kit sustains even while 2,000 is beyond it: what it
        adds to an event's age when it is not the bottleneck (and what batching costs there).

The consumer's database is its own (``warehouse``, on the same PostgreSQL server: there is one
machine). Every connection of this section is plain (``sslmode=disable``): a full run turns TLS
on in the servers for the tls section, and libpq's default would then use it here.

The kit runs only through its command line and ``CDC_RELAY_*`` settings, so a faster kit
(batched transactions or acks) is measured by the same code.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import psycopg

from benchmarks import report
from benchmarks.handlers import WAREHOUSE_DDL
from benchmarks.probe import cpu_or_none
from benchmarks.procs import CdcConsumer, ChildError, relay_cli
from benchmarks.workload import OUTBOX
from tests.sandbox import free_port

if TYPE_CHECKING:
    from benchmarks.run import Bench

Result = dict[str, Any]

INBOX_DB = "warehouse"
PREFETCH = 300  # the kit's default consumer_prefetch, set explicitly: the bare consumer's too
NOOP_HANDLER = "benchmarks.handlers:apply_nothing"
WAREHOUSE_HANDLER = "benchmarks.handlers:reserve_stock"
QUEUES = {"bare": "bench.consumer_bare", "kit": "bench.consumer_kit"}
INBOX_POLL = 0.2  # seconds between counts of the inbox; the clock is applied_at, not the poll
INBOX_TABLES = "cdc_relay_inbox, cdc_relay_inbox_positions, cdc_relay_inbox_parked, warehouse_stock"
FILL_SLOT = "bench_consumer_fill"
STEADY_SLOT = "bench_consumer_steady"


class ConsumerBench:
    """The consumer section's steps, on a harness's servers (``Bench``)."""

    def __init__(self, bench: Bench, exchange: str) -> None:
        self.bench = bench
        self.exchange = exchange
        self.inbox_dsn = ""
        self.filled: set[str] = set()  # queues the last fill left holding its N envelopes

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """The consumer's own database, its inbox (made by the kit, as a user would) and the
        warehouse's stock table."""
        b = self.bench
        with psycopg.connect(b.pg.url, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {INBOX_DB}")
        self.inbox_dsn = b.pg.url.rsplit("/", 1)[0] + f"/{INBOX_DB}?sslmode=disable"
        relay_cli(self._kit_env(), "consume", "--init", "--queue", QUEUES["kit"])
        with psycopg.connect(self.inbox_dsn, autocommit=True) as c:
            c.execute(WAREHOUSE_DDL)

    def _relay_settings(self, slot: str) -> dict[str, str]:
        return self.bench.relay_settings(slot, {"CDC_RELAY_PG_DSN": self._source_dsn()})

    def _source_dsn(self) -> str:
        return self.bench.plain_settings()["PG_DSN"]

    def _kit_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_RELAY_")}
        env.update(
            CDC_RELAY_AMQP_URL=self.bench.amqp,
            CDC_RELAY_INBOX_DSN=self.inbox_dsn,
            CDC_RELAY_CONSUMER_PREFETCH=str(PREFETCH),
            # the endpoint stays on, as in production, on a port nobody else holds
            CDC_RELAY_HTTP_ADDRESS=f"127.0.0.1:{free_port()}",
            CDC_RELAY_LOG_LEVEL="info",
            PYTHONUNBUFFERED="1",
        )
        return env

    def _kit(self, name: str, queue: str, handler: str) -> CdcConsumer:
        kit = CdcConsumer(name, self._kit_env(), self.bench.logdir, queue, handler)
        self.bench.children.append(kit)
        return kit

    def _bare_args(self, queue: str, max_seconds: float, count: int | None = None) -> list[str]:
        """``count`` known up front (a drain), or sent on stdin later (steady load)."""
        return [
            *("consumer", "--url", self.bench.amqp, "--queue", queue),
            *("--prefetch", str(PREFETCH), "--max-seconds", str(max_seconds)),
            *(() if count is None else ("--count", str(count))),
        ]

    def _empty_inbox(self) -> None:
        with psycopg.connect(self.inbox_dsn, autocommit=True) as c:
            c.execute(f"TRUNCATE {INBOX_TABLES}")
            c.execute("CHECKPOINT")

    @staticmethod
    def drain_timeout(n: int) -> float:
        """Generous: the kit may be several times slower than the broker."""
        return 60 + n / 200

    # -- the backlog ----------------------------------------------------------------------------
    def fill(self, n: int, txn_size: int) -> Result:
        """The relay streams ``n`` committed outbox rows into both consumers' queues; they stay
        for the two drains that follow. Timed like the backlog drain (its ``streaming`` record
        → both queues hold ``n``), as a check that the relay is not what the drains wait for."""
        b = self.bench
        self.filled = set()
        b.reset(OUTBOX)
        env = self._relay_settings(FILL_SLOT)
        relay_cli(env, "init", "--create-outbox")
        info = b.backlog(OUTBOX, n, txn_size)
        for q in QUEUES.values():
            b.broker.fresh_queue(q, self.exchange)
        info["settle_s"] = round(b.settle(), 1)
        try:
            relay = b.relay("relay-consumer-fill", FILL_SLOT, env)
            t0 = relay.wait_streaming()
            t1, delivered = 0.0, n
            for q in QUEUES.values():
                t, depth = b.broker.wait_depth(q, n, b.drain_timeout(n), alive=relay.alive)
                t1, delivered = max(t1, t), min(delivered, depth)
            relay.stop()
            problems = relay.log_problems()
            time.sleep(0.2)
            depths = {kind: b.broker.depth(q) for kind, q in QUEUES.items()}
        finally:
            b.end_children()
            with suppress(ChildError):  # never hide the error that got us here
                relay_cli(env, "drop", "--yes")
        odd = [d for d in depths.values() if d != n]
        if not odd:
            self.filled = set(QUEUES.values())
        return {
            "n": n,
            "txn_size": txn_size,
            "delivered": delivered,
            "final_depth": odd[0] if odd else n,
            "queue_depths": depths,
            "seconds": t1 - t0,
            "rate": n / (t1 - t0),
            "relay_log_problems": problems,
            **info,
        }

    def _take_filled(self, kind: str, n: int) -> str:
        q = QUEUES[kind]
        if q not in self.filled:
            raise RuntimeError(f"no backlog of {n:,} in {q}: the fill before this drain failed")
        self.filled.discard(q)
        return q

    # -- drains ---------------------------------------------------------------------------------
    def drain(self, kind: str, n: int) -> Result:
        """One consumer drains the ``n`` envelopes the last fill left in its queue."""
        q = self._take_filled(kind, n)
        try:
            return self._bare_drain(q, n) if kind == "bare" else self._kit_drain(q, n)
        finally:
            self.bench.end_children()
            self.bench.broker.delete_queue(q)

    def _bare_drain(self, q: str, n: int) -> Result:
        b = self.bench
        settled = b.settle()
        limit = self.drain_timeout(n)
        bare = b.child("consumer-bare-drain", "benchmarks.peers", self._bare_args(q, limit, n))
        ready = bare.expect("ready", 60)
        done = bare.expect("done", limit + 10)
        bare.wait(30)
        acked = int(done["acked"])
        seconds = float(done["last_ack_t"]) - float(ready["t"])
        return {
            "n": n,
            "delivered": acked,
            "seconds": seconds,
            "rate": acked / seconds,
            "cpu_us_per_event": float(done["cpu_s"]) / n * 1e6,
            "prefetch": PREFETCH,
            "queue_left": b.broker.depth(q),
            "settle_s": round(settled, 1),
        }

    def _kit_drain(self, q: str, n: int) -> Result:
        b = self.bench
        self._empty_inbox()
        settled = b.settle()
        limit = self.drain_timeout(n)
        spawned = time.time()
        kit = self._kit("consumer-kit-drain", q, NOOP_HANDLER)
        t0 = kit.wait_consuming()
        cpu0 = kit.cpu()
        with psycopg.connect(self.inbox_dsn, autocommit=True) as inbox:
            backend = _inbox_backend(inbox)
            _wait_inbox(inbox, n, limit, kit.alive, b.broker.keep_alive)
            cpu1, db1 = kit.cpu(), cpu_or_none(backend)
            rss = kit.peak_rss_mb()
            kit.stop()
            problems = kit.log_problems()
            row = inbox.execute(
                "SELECT extract(epoch FROM max(applied_at))::float8, count(*) FILTER "
                "(WHERE outcome = 'applied') FROM cdc_relay_inbox"
            ).fetchone()
            outcomes = _outcomes(inbox)
        assert row is not None
        last, applied = float(row[0] or t0), int(row[1])
        seconds = last - t0
        return {
            "n": n,
            "delivered": applied,
            "seconds": seconds,
            "rate": applied / seconds,
            "cpu_us_per_event": (cpu1 - cpu0) / n * 1e6,
            "inbox_backend_cpu_us_per_event": None if db1 is None else db1 / n * 1e6,
            "peak_rss_mb": rss,
            "startup_s": t0 - spawned,
            "prefetch": PREFETCH,
            "outcomes": outcomes,
            "queue_left": b.broker.depth(q),
            "consumer_log_problems": problems,
            "settle_s": round(settled, 1),
        }

    # -- steady load ----------------------------------------------------------------------------
    def steady(self, kind: str, rate: float, seconds: float, txn_size: int, payload: int) -> Result:
        """Writer at ``rate`` → relay → the kit applying with the warehouse handler (``kit``) or
        the bare consumer (``bare``); every event's age when applied / received, and the worst
        age per second of the run (when it happened: start-up, a stall, a growing backlog)."""
        b = self.bench
        b.reset(OUTBOX)
        env = self._relay_settings(STEADY_SLOT)
        relay_cli(env, "init", "--create-outbox")
        if kind == "kit":
            self._empty_inbox()
        ages_file = b.logdir / f"ages-consumer-{kind}.json"
        limit = seconds + 120
        q = f"bench.consumer_steady_{kind}"
        b.broker.fresh_queue(q, self.exchange)
        settled = b.settle()
        try:
            relay = b.relay(f"relay-consumer-steady-{kind}", STEADY_SLOT, env)
            relay.wait_streaming()
            kit: CdcConsumer | None = None
            if kind == "kit":
                kit = self._kit("consumer-kit-steady", q, WAREHOUSE_HANDLER)
                kit.wait_consuming()
                cpu0 = kit.cpu()
            else:
                args = [*self._bare_args(q, limit + 60), "--ages", str(ages_file)]
                bare = b.child("consumer-bare-steady", "benchmarks.peers", args, stdin=True)
                bare.expect("ready", 60)
            writer = b.child(
                f"producer-consumer-{kind}",
                "benchmarks.workload",
                [
                    *("produce", "--dsn", self._source_dsn(), "--table", OUTBOX),
                    *("--rate", str(rate), "--seconds", str(seconds)),
                    *("--txn-size", str(txn_size), "--payload", str(payload)),
                    *("--max-seconds", str(limit)),
                ],
            )
            writer.expect("ready", 60)
            produced = writer.expect("done", seconds + 60)
            writer.wait(30)
            committed = int(produced["committed"])
            consumer: Result
            if kit is not None:
                consumer = self._kit_ages(kit, committed, cpu0)
            else:
                bare.send(str(committed))
                done = bare.expect("done", 60 + committed / 1000)
                bare.wait(30)
                data = json.loads(ages_file.read_text())
                ages = data["commit_latency_s"]
                consumer = {
                    "received": int(data["received"]),
                    "ages_s": ages,
                    "commits": [t - a for t, a in zip(data["receipts"], ages, strict=True)],
                    "cpu_us_per_event": float(done["cpu_s"]) / max(committed, 1) * 1e6,
                }
            relay.stop()
            problems = relay.log_problems()
        finally:
            b.end_children()
            with suppress(ChildError):
                relay_cli(env, "drop", "--yes")
            b.broker.delete_queue(q)
        ages = consumer.pop("ages_s")
        timeline = report.age_timeline(consumer.pop("commits"), ages)
        return {
            "kind": kind,
            "offered_rate": rate,
            "achieved_rate": float(produced["achieved_rate"]),
            "producer_worst_lag_s": float(produced["worst_lag_s"]),
            "seconds": seconds,
            "committed": committed,
            **consumer,
            **({"age_ms": report.latency_summary(ages)} if ages else {}),
            "age_by_second": timeline,
            "prefetch": PREFETCH,
            "relay_log_problems": problems,
            "settle_s": round(settled, 1),
        }

    def _kit_ages(self, kit: CdcConsumer, committed: int, cpu0: float) -> Result:
        """Wait until the kit applied ``committed`` events, stop it, read every age from its
        inbox."""
        with psycopg.connect(self.inbox_dsn, autocommit=True) as inbox:
            _wait_inbox(
                inbox, committed, 60 + committed / 200, kit.alive, self.bench.broker.keep_alive
            )
            cpu1 = kit.cpu()
            kit.stop()
            rows = inbox.execute(
                "SELECT extract(epoch FROM committed_at)::float8, "
                "extract(epoch FROM applied_at - committed_at)::float8 "
                "FROM cdc_relay_inbox WHERE outcome = 'applied'"
            ).fetchall()
            outcomes = _outcomes(inbox)
        return {
            "received": len(rows),
            "ages_s": [float(r[1]) for r in rows],
            "commits": [float(r[0]) for r in rows],
            "outcomes": outcomes,
            "cpu_us_per_event": (cpu1 - cpu0) / max(committed, 1) * 1e6,
            "consumer_log_problems": kit.log_problems(),
        }


def _wait_inbox(
    inbox: psycopg.Connection[tuple[Any, ...]],
    n: int,
    timeout: float,
    alive: Callable[[], bool],
    between: Callable[[], None],
) -> int:
    """Poll the inbox's row count until it holds ``n`` → the count; the kit dying or the
    timeout passing is an error (the caller's result would be a partial drain). ``between``
    runs between polls (the harness's broker connection must answer its heartbeats)."""
    deadline = time.monotonic() + timeout
    while True:
        between()
        row = inbox.execute("SELECT count(*) FROM cdc_relay_inbox").fetchone()
        count = int(row[0]) if row else 0
        if count >= n:
            return count
        if not alive():
            raise ChildError(f"the kit exited with {count:,} of {n:,} events in its inbox")
        if time.monotonic() > deadline:
            raise ChildError(f"the kit's inbox holds {count:,} of {n:,} after {timeout:.0f}s")
        time.sleep(INBOX_POLL)


def _inbox_backend(inbox: psycopg.Connection[tuple[Any, ...]], timeout: float = 5.0) -> int | None:
    """The PostgreSQL backend serving the kit's inbox connection (its application_name)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = inbox.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s "
            "AND application_name = 'cdc-relay-consumer'",
            (INBOX_DB,),
        ).fetchone()
        if row is not None:
            return int(row[0])
        time.sleep(0.01)
    return None


def _outcomes(inbox: psycopg.Connection[tuple[Any, ...]]) -> dict[str, int]:
    rows = inbox.execute("SELECT outcome, count(*) FROM cdc_relay_inbox GROUP BY 1").fetchall()
    return {str(r[0]): int(r[1]) for r in rows}
