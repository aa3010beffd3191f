"""The benchmark harness: cdc-relay against its ceilings and its peers, side by side, in one run.

One invocation starts one throwaway PostgreSQL 15 + RabbitMQ (``tests.sandbox``), runs every
scenario on them with the same event shape (an outbox row with a ~``--payload``-byte JSON payload,
an envelope-v1 body, a durable queue, persistent mandatory messages), stops them, and reports each
figure as a ratio against something measured in the same run:

ceilings   raw pika publisher with pipelined confirms (window 2000) on the same broker;
           ``pg_recvlogical`` draining the same WAL with pgoutput (decode ceiling)
peers      a well-written polling relay (FOR UPDATE SKIP LOCKED, batch publish with pipelined
           confirms, DELETE, commit, 10 ms idle poll); the naive relay (one confirm at a time)
cdc-relay  backlog drain (N committed events, then the relay starts; time from its ``streaming``
           log record to the queue holding N); steady load (a producer commits R events/s in
           10-event transactions for T s; an independent consumer measures commit→receipt
           latency); the same steady load through the polling relay
scale      drain time, peak RSS (VmHWM) and CPU µs/event at larger N and for one huge transaction
shapes     the shapes outboxes really have (1, 3 and 1,000 events per transaction, one huge
           transaction, 2 KB and 64 KB payloads), each drained by cdc-relay in interleaved rounds
           with two raw pika ceilings of the same N and payload: the relay's exact message shape,
           and a minimal message (payload as the body, two properties); relay and walsender CPU
           per event; the relay's idle CPU and its start-up time (spawn → ``streaming``)
recovery   ``init --backfill`` against the streaming drain of the same rows
tls        the backlog drain over TLS on both sides against plain connections
consumer   the consumer kit (``cdc-relay consume``) against a bare pika consumer with manual
           acks: draining the same backlog of envelopes (no-op handler), and the age of each
           event when applied at a steady 2,000 ev/s (a warehouse handler) vs when received

scale      (``--only scale``) one relay draining the same backlog into a quorum queue on a
           three-node cluster (``tests.cluster``, all nodes in ``amqp_url``) and into a classic
           queue on one node, in interleaved rounds; relay and broker CPU per event for each;
           and the same backlog in an outbox hash-partitioned four ways, drained by two relays
           side by side (two partitions each, own slots) against one relay over all four

Output: a table on stdout, ``<out>/<timestamp>.json`` and ``<out>/latest.json``, and
``<out>/latest.png`` (needs the ``bench`` extra: ``pip install -e '.[bench]'``).

    python -m benchmarks.run [--quick] [--only shapes|recovery|tls|consumer]
                             [--payload 150|1024|16384] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import report
from benchmarks.consumer import ConsumerBench
from benchmarks.probe import CLK_TCK, Broker, cpu_or_none
from benchmarks.procs import (
    REPO,
    CdcRelay,
    Child,
    ChildError,
    python_child,
    relay_cli,
    relay_env,
)
from benchmarks.workload import (
    OUTBOX,
    POLL_OUTBOX,
    POLL_OUTBOX_DDL,
    average_payload,
    pad_length,
    write_backlog,
)
from tests.cluster import RabbitCluster
from tests.sandbox import PG_BIN, PostgresSandbox, RabbitSandbox, free_port
from tests.tls import Authority, make_authority

DB = "bench"
EXCHANGE = "bench"
# the pika ceiling is re-measured at every scale N up to this size: the broker itself slows as
# its queue grows towards a million persistent messages, and the relay cannot be faster than it
SCALE_CEILING_MAX = 1_000_000
STATUS_INTERVAL = 5.0  # seconds; the sandbox's wal_sender_timeout is 10 s
SPLIT_PARTITIONS = 4  # the scale section's partitioned outbox (relays side by side)
WINDOW = 2000  # the relay's default max_in_flight; the pika ceiling uses the same window
STEADY_POLL_IDLE = 0.1  # a second polling relay in the latency comparison: a common setting
# what a full run does; ``--only shapes`` (or recovery, tls, scale, consumer) runs one section
# alone
SECTIONS = ("main", "shapes", "recovery", "tls", "scale", "consumer")

Result = dict[str, Any]


@dataclass(frozen=True)
class Shape:
    """One shape of outbox traffic, judged against two raw pika ceilings of the same N and
    payload; its results are ``shape_<key>_same``, ``shape_<key>_minimal``, ``shape_<key>_relay``.
    """

    key: str
    label: str
    n: int
    txn_size: int  # events per transaction; >= n is one single transaction
    payload: int  # approximate payload bytes
    bytes_target: bool = False  # also judged in message-body bytes per second
    payload_type: str = "jsonb"  # the outbox payload column's type for the relay's rounds


def make_shapes(quick: bool, payload: int, n: int, big_txn: int) -> tuple[Shape, ...]:
    """The shapes section: ``n`` events in transactions of 1, 3 and 1,000 events, one
    transaction of ``big_txn`` rows, and 2 KB / 64 KB payloads one event per transaction."""
    p = f"{payload:,} B"
    return (
        Shape("txn1", f"1 ev/txn, {p}", n, 1, payload),
        Shape("txn3", f"3 ev/txn, {p}", n, 3, payload),
        Shape("txn1000", f"1,000 ev/txn, {p}", n, 1000, payload),
        Shape(
            "bigtxn",
            f"one txn of {report.count_text(big_txn)} rows, {p}",
            big_txn,
            big_txn,
            payload,
        ),
        Shape(
            "kb2",
            "2 KB payload, 1 ev/txn",
            10_000 if quick else 50_000,
            1,
            2048,
            bytes_target=True,
        ),
        Shape("kb64", "64 KB payload, 1 ev/txn", 2_000 if quick else 10_000, 1, 65536),
        # the same events with a json (not jsonb) payload column: the walsender then sends
        # the stored text instead of rebuilding it from jsonb, the large payloads' real cost
        Shape(
            "kb64json",
            "64 KB payload in a json column, 1 ev/txn",
            2_000 if quick else 10_000,
            1,
            65536,
            payload_type="json",
        ),
    )


@dataclass(frozen=True)
class Plan:
    quick: bool
    payload: int
    backlog: int  # ceilings, peers and the cdc-relay backlog drain
    scale: tuple[int, ...]  # further cdc-relay backlog drains (linearity, peak RSS)
    big_txn: int  # one transaction of this many rows
    naive: int  # the naive relay is slow: a smaller backlog, compared by rate
    txn_size: int
    rate: float
    seconds: float
    rounds: int  # interleaved repetitions of the headline drains (pika, cdc-relay, polling)
    poll_idle: float = 0.01  # the polling relays' sleep after an empty poll
    # the steady-load comparison runs the polling relay at each of these sleeps
    steady_poll_idles: tuple[float, ...] = (0.01, 0.1)
    sections: tuple[str, ...] = SECTIONS
    shapes: tuple[Shape, ...] = ()
    idle_seconds: float = 10.0  # cdc-relay's idle cost, measured once per round
    recovery: int = 100_000  # rows of the backfill-vs-stream comparison
    consumer_seconds: float = 12.0  # the consumer section's steady load (its N is ``backlog``)
    # ... and a light load beside it, which the kit sustains even when ``rate`` is above what
    # it can apply: what it adds to each event's age when it is not the bottleneck
    consumer_light_rate: float = 500.0
    consumer_light_seconds: float = 10.0

    @staticmethod
    def make(
        quick: bool,
        payload: int,
        rate: float,
        seconds: float | None,
        poll_idle: float = 0.01,
        only: str | None = None,
    ) -> Plan:
        # large payloads shrink N so a run stays within its disk and time budget
        shrink = 1 if payload <= 256 else 4 if payload <= 2048 else 32
        extra = () if poll_idle == STEADY_POLL_IDLE else (STEADY_POLL_IDLE,)
        backlog = (20_000 if quick else 100_000) // shrink
        big_txn = (100_000 if quick else 1_000_000) // shrink
        common: dict[str, Any] = {
            **{"quick": quick, "payload": payload, "rate": rate, "txn_size": 10},
            "poll_idle": poll_idle,
            "steady_poll_idles": (poll_idle, *extra),
            "sections": SECTIONS if only is None else (only,),
            "shapes": make_shapes(quick, payload, backlog, big_txn),
            "backlog": backlog,
            "big_txn": big_txn,
            "recovery": (100_000 if quick else 1_000_000) // shrink,
            "consumer_seconds": seconds or (12.0 if quick else 30.0),
        }
        if quick:
            return Plan(
                scale=(60_000 // shrink,),
                naive=max(2_000 // shrink, 100),
                seconds=seconds or 10.0,
                rounds=2,
                **common,
            )
        return Plan(
            scale=(1_000_000 // shrink,),
            naive=max(5_000 // shrink, 500),
            seconds=seconds or 30.0,
            rounds=3,
            **common,
        )


class Bench:
    """Owns the servers, one SQL connection and one admin AMQP connection for a run."""

    def __init__(self, plan: Plan, root: Path, logdir: Path) -> None:
        self.plan = plan
        self.root = root
        self.logdir = logdir
        self.pad = pad_length(plan.payload)
        self.pg = PostgresSandbox(root / "postgres")
        self.rabbit = RabbitSandbox(root / "rabbitmq")
        self.dsn = ""
        self.amqp = ""
        self._sql: psycopg.Connection[tuple[Any, ...]] | None = None
        self._broker: Broker | None = None
        self.children: list[Child] = []
        self.cluster: RabbitCluster | None = None  # the scale section's three nodes
        self._cluster_broker: Broker | None = None
        self.meta: dict[str, Any] = {}
        self.pki: Authority
        self.consumers = ConsumerBench(self, EXCHANGE)

    # -- servers --------------------------------------------------------------------------------
    def start(self) -> Result:
        t = time.monotonic()
        if "tls" in self.plan.sections:
            self._enable_tls()
        self.pg.start()
        self.rabbit.start()
        self.amqp = self.rabbit.amqp_url
        with psycopg.connect(self.pg.url, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {DB}")
            row = c.execute("SHOW server_version").fetchone()
        self.dsn = self.pg.url.rsplit("/", 1)[0] + "/" + DB
        self.sql.execute(POLL_OUTBOX_DDL)
        # the outbox table itself comes from the relay, as a user would create it
        relay_cli(self._relay_env("bench_setup"), "init", "--create-outbox")
        relay_cli(self._relay_env("bench_setup"), "drop", "--yes")
        self.broker.declare_exchange(EXCHANGE)
        if "scale" in self.plan.sections:
            self.cluster = RabbitCluster(self.root / "cluster").start()
            self.cluster_broker.declare_exchange(EXCHANGE)
        if "consumer" in self.plan.sections:
            self.consumers.setup()
        props = getattr(self.broker.connection, "_impl", None)
        server = getattr(props, "server_properties", {}) or {}
        version = server.get("version", b"?")
        self.meta.update(
            postgres=row[0] if row else "?",
            rabbitmq=version.decode() if isinstance(version, bytes) else str(version),
            servers_start_s=round(time.monotonic() - t, 1),
            cdc_relay_imported_from=_children_import(),
        )
        return dict(self.meta)

    def _enable_tls(self) -> None:
        """TLS listeners on both servers, with a throwaway CA (the tls section's drains)."""
        pki = make_authority(self.root / "pki")
        self.pki = pki
        self.pg.init()
        certs = self.pg.data / "certs"
        certs.mkdir(exist_ok=True)
        for name, source in (("server.crt", pki.server.cert), ("server.key", pki.server.key)):
            (certs / name).write_bytes(source.read_bytes())
            (certs / name).chmod(0o600)
            self.pg.chown(certs / name)
        self.pg.chown(certs)
        self.pg.settings.update(
            ssl="on",
            ssl_cert_file=str(certs / "server.crt"),
            ssl_key_file=str(certs / "server.key"),
        )
        self.rabbit.tls_port = free_port()
        self.rabbit.extra_conf.update(
            {
                "listeners.ssl.default": f"127.0.0.1:{self.rabbit.tls_port}",
                "ssl_options.cacertfile": str(pki.ca),
                "ssl_options.certfile": str(pki.server.cert),
                "ssl_options.keyfile": str(pki.server.key),
                "ssl_options.verify": "verify_none",
            }
        )

    def plain_settings(self) -> dict[str, str]:
        """No TLS at all: libpq's default sslmode=prefer would use it once the server offers it."""
        return {"PG_DSN": f"{self.dsn}?sslmode=disable"}

    def tls_settings(self) -> dict[str, str]:
        """Relay settings for the same servers over TLS, peers verified against the test CA."""
        ca = str(self.pki.ca)
        return {
            "PG_DSN": f"{self.dsn}?sslmode=verify-full&sslrootcert={ca}",
            "AMQP_URL": f"amqps://guest:guest@localhost:{self.rabbit.tls_port}/%2F?cacertfile={ca}",
        }

    def end_children(self) -> None:
        """Kill whatever a scenario left running (a failed step must not leak a relay)."""
        for child in self.children:
            child.close()
        self.children.clear()

    def stop(self) -> None:
        self.end_children()
        for broker in (self._broker, self._cluster_broker):
            if broker is not None:
                with suppress(Exception):
                    broker.close()
        if self._sql is not None:
            self._sql.close()
        if self.cluster is not None:
            try:
                self.cluster.destroy()
            except AssertionError as exc:  # a VM that would not die: say so, stop the rest
                print(f"  cluster: {exc}", flush=True)
        self.rabbit.destroy()
        self.pg.destroy()

    @property
    def sql(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._sql is None or self._sql.closed:
            self._sql = psycopg.connect(self.dsn, autocommit=True)
        return self._sql

    @property
    def broker(self) -> Broker:
        if self._broker is None or not self._broker.connection.is_open:
            self._broker = Broker(self.amqp)
        return self._broker

    @property
    def cluster_broker(self) -> Broker:
        """An admin connection to the cluster's first node (where its queues' leaders go)."""
        assert self.cluster is not None, "the cluster runs only for the scale section"
        if self._cluster_broker is None or not self._cluster_broker.connection.is_open:
            self._cluster_broker = Broker(self.cluster.nodes[0].amqp_url)
        return self._cluster_broker

    # -- helpers --------------------------------------------------------------------------------
    def relay_settings(self, slot: str, extra_env: dict[str, str]) -> dict[str, str]:
        """The relay's environment for ``slot``, as ``relay`` gives it, with ``extra_env``."""
        return {**self._relay_env(slot), **extra_env}

    def _relay_env(self, slot: str) -> dict[str, str]:
        # The metrics endpoint stays on, as in production, on a port nobody else holds.
        # status_interval must stay below the server's wal_sender_timeout (README); the sandbox
        # runs a short 10 s timeout, and the default interval of 10 s got the walsender to cut
        # a one-million-row transaction mid-stream (then replayed: duplicates).
        return relay_env(
            self.dsn,
            self.amqp,
            slot,
            EXCHANGE,
            max_in_flight=str(WINDOW),
            http_address=f"127.0.0.1:{free_port()}",
            status_interval=str(STATUS_INTERVAL),
        )

    def _peer_args(self, kind: str, idle: float | None = None) -> list[str]:
        return [
            *(kind, "--dsn", self.dsn, "--url", self.amqp, "--exchange", EXCHANGE),
            *("--idle", str(self.plan.poll_idle if idle is None else idle)),
        ]

    def child(self, name: str, module: str, args: list[str], stdin: bool = False) -> Child:
        c = python_child(name, module, args, self.logdir, stdin=stdin)
        self.children.append(c)
        return c

    def relay(self, name: str, slot: str, extra_env: dict[str, str] | None = None) -> CdcRelay:
        r = CdcRelay(name, {**self._relay_env(slot), **(extra_env or {})}, self.logdir)
        self.children.append(r)
        return r

    def reset(self, table: str) -> None:
        """Empty ``table``, drop every slot (no WAL retained between scenarios), checkpoint."""
        self.sql.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active"
        )
        self.sql.execute(f"TRUNCATE {table}")
        self.sql.execute("CHECKPOINT")

    @contextmanager
    def queue(self, name: str, cluster: bool = False) -> Iterator[str]:
        """A fresh durable queue bound to the exchange, deleted afterwards (frees the broker);
        on the cluster a quorum queue (members on all three nodes)."""
        q = f"bench.{name}"
        broker = self.cluster_broker if cluster else self.broker
        broker.fresh_queue(q, EXCHANGE, quorum=cluster)
        try:
            yield q
        finally:
            broker.delete_queue(q)

    def backlog(self, table: str, n: int, txn_size: int, pad: int | None = None) -> Result:
        seconds = write_backlog(self.sql, table, n, txn_size, self.pad if pad is None else pad)
        payload = average_payload(self.sql, table)
        self.sql.execute(f"VACUUM ANALYZE {table}")
        self.sql.execute("CHECKPOINT")
        return {"write_s": round(seconds, 2), "avg_payload_bytes": round(payload, 1)}

    def drain_timeout(self, n: int) -> float:
        return 60 + n / 2000

    # -- ceilings ------------------------------------------------------------------------------
    def ceiling_pika(
        self,
        n: int,
        payload: int | None = None,
        minimal: bool = False,
        slot: str = "bench",
    ) -> Result:
        """Raw pika with pipelined confirms: the relay's message shape (``slot``: the slot
        name its envelope carries), or with ``minimal`` the payload alone and two properties."""
        settled = self.settle()
        payload = self.plan.payload if payload is None else payload
        with self.queue("pika") as q:
            args = ["pika", "--url", self.amqp, "--exchange", EXCHANGE, "--count", str(n)]
            args += ["--window", str(WINDOW), "--payload", str(payload), "--slot", slot]
            args += ["--max-seconds", str(self.drain_timeout(n))]
            args += ["--minimal"] if minimal else []
            pub = self.child("pika-minimal" if minimal else "pika", "benchmarks.peers", args)
            ready = pub.expect("ready", timeout=60 + n / 5000)
            broker0 = self.broker_cpu()
            t1, depth = self.broker.wait_depth(q, n, self.drain_timeout(n), alive=pub.alive)
            broker1 = self.broker_cpu()
            done = pub.expect("done", timeout=60)
            pub.wait(30)
        seconds = t1 - ready["t"]
        return {
            "n": n,
            "delivered": depth,
            "seconds": seconds,
            "rate": n / seconds,
            "body_bytes": ready.get("body_bytes"),
            "properties": ready.get("properties"),
            "headers": ready.get("headers"),
            "minimal": minimal,
            "payload": payload,
            "publisher_confirm_rate": done.get("rate"),
            "settle_s": round(settled, 1),
            "cpu_us_per_event": float(done.get("cpu_s", 0.0)) / n * 1e6,
            "broker_cpu_us_per_event": (broker1 - broker0) / n * 1e6,
        }

    def ceiling_recvlogical(self, n: int, txn_size: int) -> Result:
        self.reset(OUTBOX)
        name = "bench_recvlogical"
        self.sql.execute(
            f"CREATE PUBLICATION {name} FOR TABLE {OUTBOX} WITH (publish = 'insert, truncate')"
        )
        try:
            self.sql.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
            info = self.backlog(OUTBOX, n, txn_size)
            row = self.sql.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            endpos = str(row[0])
            # a record beyond endpos, so pg_recvlogical sees it has read everything
            write_backlog(self.sql, OUTBOX, 1, 1, self.pad)
            argv = [str(PG_BIN / "pg_recvlogical"), "-d", self.dsn, "--slot", name, "--start"]
            argv += ["-o", "proto_version=1", "-o", f"publication_names={name}"]
            argv += ["-E", endpos, "--no-loop", "-f", "/dev/null"]
            t0 = time.perf_counter()
            out = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.drain_timeout(n), check=False
            )
            seconds = time.perf_counter() - t0
            if out.returncode != 0:
                raise RuntimeError(f"pg_recvlogical exited {out.returncode}: {out.stderr}")
        finally:
            self.reset(OUTBOX)
            self.sql.execute(f"DROP PUBLICATION IF EXISTS {name}")
        return {
            "n": n,
            "txn_size": txn_size,
            "seconds": seconds,
            "rate": n / seconds,
            "endpos": endpos,
            **info,
        }

    # -- cdc-relay ------------------------------------------------------------------------------
    def cdc_drain(
        self,
        label: str,
        n: int,
        txn_size: int,
        tracing: bool = False,
        sample: float = 1.0,
        settings: dict[str, str] | None = None,
        payload: int | None = None,
        payload_type: str = "jsonb",
        cluster: bool = False,
    ) -> Result:
        """``tracing``: the relay exports a span per event over OTLP/HTTP to a counting sink
        (Jaeger's stand-in, its own process), with the SDK's default batch processor settings;
        ``sample`` < 1 keeps that fraction of traces (``parentbased_traceidratio``).
        ``settings``: extra relay settings (e.g. ``{"MAX_IN_FLIGHT_PER_AGGREGATE": "1"}``).
        ``payload``: payload bytes of the events (default: the plan's). ``payload_type``:
        the payload column's type for this drain (json or jsonb; set back to jsonb after).
        ``cluster``: the relay gets the three nodes of the scale section's cluster in
        ``amqp_url`` and drains into a quorum queue there; broker CPU is then the three nodes'
        (each node's also reported).

        Besides the relay's own CPU it reads the CPU the walsender serving the relay's slot
        used from its start to the end of the drain (reading and decoding the WAL), the
        relay's start-up time (spawn → its
        ``streaming`` record), and one message off the queue afterwards (body size, property
        and header names: what the relay really sent)."""
        slot = f"bench_{label}"
        self.reset(OUTBOX)
        env = self._relay_env(slot)
        relay_cli(env, "init", "--create-outbox")
        if payload_type != "jsonb":
            self.sql.execute(f"ALTER TABLE {OUTBOX} ALTER COLUMN payload TYPE {payload_type}")
        otel: dict[str, str] = {f"CDC_RELAY_{k}": v for k, v in (settings or {}).items()}
        broker = self.cluster_broker if cluster else self.broker
        if cluster:
            assert self.cluster is not None
            otel["CDC_RELAY_AMQP_URL"] = self.cluster.amqp_url
        per_node: dict[str, float] = {}
        sink: Child | None = None
        traced: Result = {}
        try:
            if tracing:
                sink = self.child(f"otlp-sink-{label}", "benchmarks.probe", ["otlp-sink"])
                port = sink.expect("ready", 60)["port"]
                otel.update(
                    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://127.0.0.1:{port}/v1/traces",
                    OTEL_SERVICE_NAME="cdc-relay-bench",
                )
                if sample < 1:
                    otel["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
                    otel["OTEL_TRACES_SAMPLER_ARG"] = str(sample)
            pad = None if payload is None else pad_length(payload)
            info = self.backlog(OUTBOX, n, txn_size, pad)
            info["settle_s"] = round(self.settle(), 1)
            with self.queue(label, cluster) as q:
                spawned = time.time()
                relay = self.relay(f"relay-{label}", slot, otel)
                t0 = relay.wait_streaming()
                cpu0, broker0 = relay.cpu(), self.broker_cpu(cluster)
                nodes0 = self.node_cpu() if cluster else {}
                walsender = self.walsender_pid(slot)
                t1, depth = broker.wait_depth(q, n, self.drain_timeout(n), alive=relay.alive)
                cpu1, broker1 = relay.cpu(), self.broker_cpu(cluster)
                for name, used in (self.node_cpu() if cluster else {}).items():
                    per_node[name] = (used - nodes0.get(name, 0.0)) / n * 1e6
                # from the walsender's start: it serves this relay's connection alone, and it
                # decodes ahead of the relay, some of it before its pid could be read
                wal1 = cpu_or_none(walsender)
                rss = relay.peak_rss_mb()
                relay.stop()  # flushes the spans still buffered, then exits
                problems = relay.log_problems()
                time.sleep(0.2)
                final = broker.depth(q)
                message = broker.sample(q) if final else None
                if sink is not None:
                    sink.terminate()
                    done = sink.expect("done", 10)
                    traced = {
                        "tracing": True,
                        "sample": sample,
                        "spans_exported": done["publish_spans"],
                        "otlp_requests": done["requests"],
                        "otlp_bytes": done["bytes"],
                    }
        finally:
            self.end_children()
            with suppress(ChildError):  # never hide the error that got us here
                relay_cli(env, "drop", "--yes")
            if payload_type != "jsonb":  # emptied first: converting the rows back is slow
                self.reset(OUTBOX)
                self.sql.execute(f"ALTER TABLE {OUTBOX} ALTER COLUMN payload TYPE jsonb")
        seconds = t1 - t0
        return {
            "n": n,
            "txn_size": txn_size,
            "delivered": depth,
            "final_depth": final,
            "seconds": seconds,
            "rate": n / seconds,
            "seconds_incl_startup": t1 - spawned,
            "startup_s": t0 - spawned,
            "cpu_us_per_event": (cpu1 - cpu0) / n * 1e6,
            "cpu_total_us_per_event": cpu1 / n * 1e6,
            "walsender_cpu_us_per_event": None if wal1 is None else wal1 / n * 1e6,
            "broker_cpu_us_per_event": (broker1 - broker0) / n * 1e6,
            **({"node_cpu_us_per_event": per_node} if cluster else {}),
            "peak_rss_mb": rss,
            "relay_log_problems": problems,
            **({"message": message} if message else {}),
            **info,
            **traced,
        }

    def split_drain(self, label: str, n: int, txn_size: int, relays: int) -> Result:
        """The backlog in an outbox hash-partitioned ``SPLIT_PARTITIONS`` ways (``init
        --partitions``), drained into one queue by ``relays`` relays side by side, each with its
        own slot and publication over every ``relays``-th partition: the aggregate rate from
        the first relay's streaming start to the last event, and the CPU all relays and all
        walsenders spent. One relay over every partition is the baseline on the same table."""
        parts = SPLIT_PARTITIONS
        self.sql.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active"
        )
        self.sql.execute(f"DROP TABLE IF EXISTS {OUTBOX} CASCADE")
        relay_cli(
            self._relay_env(f"bench_{label}"), "init", "--create-outbox", "--partitions", str(parts)
        )
        members: list[dict[str, str]] = []
        for k in range(relays):
            tables = ",".join(f"public.{OUTBOX}_p{p}" for p in range(parts) if p % relays == k)
            env = {
                **self._relay_env(f"bench_{label}_{k}"),
                "CDC_RELAY_OUTBOX_TABLE": tables,
                "CDC_RELAY_LOGICAL_MESSAGES": "false",
            }
            relay_cli(env, "init")
            members.append(env)
        try:
            info = self.backlog(OUTBOX, n, txn_size)
            info["settle_s"] = round(self.settle(), 1)
            with self.queue(label) as q:
                procs = []
                for k, env in enumerate(members):
                    r = CdcRelay(f"relay-{label}-{k}", env, self.logdir)
                    self.children.append(r)
                    procs.append(r)
                started = []
                for r in procs:  # each relay's CPU from its own start of streaming
                    started.append((r.wait_streaming(), r.cpu()))
                t0 = min(t for t, _ in started)
                walsenders = [self.walsender_pid(env["CDC_RELAY_SLOT"]) for env in members]
                alive = lambda: all(r.alive() for r in procs)  # noqa: E731 - a one-line check
                t1, depth = self.broker.wait_depth(q, n, self.drain_timeout(n), alive=alive)
                cpu = sum(r.cpu() - c0 for r, (_, c0) in zip(procs, started, strict=True))
                wal = [cpu_or_none(pid) for pid in walsenders]
                rss = max(r.peak_rss_mb() for r in procs)
                for r in procs:
                    r.stop()
                problems = [p for r in procs for p in r.log_problems()]
        finally:
            self.end_children()
            for env in members:
                with suppress(ChildError):
                    relay_cli(env, "drop", "--yes")
            # the other sections stream an ordinary outbox table
            self.sql.execute(f"DROP TABLE IF EXISTS {OUTBOX} CASCADE")
            restore = self._relay_env(f"bench_{label}_restore")
            relay_cli(restore, "init", "--create-outbox")
            relay_cli(restore, "drop", "--yes")
        seconds = t1 - t0
        return {
            "n": n,
            "txn_size": txn_size,
            "relays": relays,
            "partitions": parts,
            "delivered": depth,
            "seconds": seconds,
            "rate": n / seconds,
            "cpu_us_per_event": cpu / n * 1e6,  # every relay's, from its start of streaming
            "walsender_cpu_us_per_event": None
            if None in wal
            else sum(w or 0.0 for w in wal) / n * 1e6,
            "peak_rss_mb": rss,
            "relay_log_problems": problems,
            **info,
        }

    def backfill_drain(self, label: str, n: int, txn_size: int) -> Result:
        """``cdc-relay init --backfill`` over ``n`` rows already in the outbox: spawn → every
        row in the queue. Its CPU and peak RSS come from ``wait4`` on the finished process
        (exact, including the last confirms), its walsender's from the slot's creation on."""
        slot = f"bench_{label}"
        self.reset(OUTBOX)
        env = self._relay_env(slot)
        relay_cli(env, "init", "--create-outbox")
        relay_cli(env, "drop", "--yes")  # the table stays, without publication or slot
        info = self.backlog(OUTBOX, n, txn_size)
        info["settle_s"] = round(self.settle(), 1)
        try:
            with self.queue(label) as q:
                broker0 = self.broker_cpu()
                spawned = time.time()
                child = Child(
                    f"backfill-{label}",
                    [sys.executable, "-m", "cdc_relay.cli", "init", "--backfill"],
                    self.logdir,
                    env=env,
                )
                self.children.append(child)
                t1, depth = self.broker.wait_depth(q, n, self.drain_timeout(n), alive=child.alive)
                broker1 = self.broker_cpu()
                _pid, status, usage = os.wait4(child.pid, 0)
                child.proc.returncode = os.waitstatus_to_exitcode(status)
                if child.proc.returncode != 0:
                    raise ChildError(f"init --backfill exited {child.proc.returncode}")
                final = self.broker.depth(q)
        finally:
            self.end_children()
            with suppress(ChildError):
                relay_cli(env, "drop", "--yes")
        seconds = t1 - spawned
        cpu = usage.ru_utime + usage.ru_stime
        return {
            "n": n,
            "delivered": depth,
            "final_depth": final,
            "seconds": seconds,
            "rate": n / seconds,
            "cpu_us_per_event": cpu / n * 1e6,
            "broker_cpu_us_per_event": (broker1 - broker0) / n * 1e6,
            "peak_rss_mb": usage.ru_maxrss / 1024,
            **info,
        }

    def walsender_pid(self, slot: str, timeout: float = 5.0) -> int | None:
        """The pid of the walsender streaming ``slot`` (``pg_replication_slots.active_pid``),
        once it has the slot; None if none holds it within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.sql.execute(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            if row is not None and row[0] is not None:
                return int(row[0])
            time.sleep(0.01)
        return None

    def steady(self, kind: str, idle: float | None = None) -> Result:
        """Producer at ``rate`` → relay → consumer measuring latency.

        ``kind``: ``cdc`` (cdc-relay), ``polling`` (the polling relay) or ``floor`` (no database
        and no relay: a raw pika publisher paced the same way, stamping its publish time).
        ``idle``: the polling relay's sleep after an empty poll (default: the plan's).
        """
        plan = self.plan
        table = POLL_OUTBOX if kind == "polling" else OUTBOX
        slot = "bench_steady"
        self.reset(table)
        env = self._relay_env(slot)
        if kind == "cdc":
            relay_cli(env, "init", "--create-outbox")
        out = self.logdir / f"latency-{kind}.json"
        limit = str(plan.seconds + 120)
        settled = self.settle()
        relay: Child | None = None
        try:
            with self.queue(f"steady_{kind}") as q:
                if kind == "cdc":
                    cdc = self.relay("relay-steady", slot)
                    cdc.wait_streaming()
                    relay = cdc
                elif kind == "polling":
                    relay = self.child(
                        "polling-steady",
                        "benchmarks.peers",
                        [*self._peer_args("polling", idle), "--max-seconds", limit],
                    )
                    relay.expect("ready", 60)
                consumer = self.child(
                    f"consumer-{kind}",
                    "benchmarks.probe",
                    [
                        *("consume", "--url", self.amqp, "--queue", q, "--out", str(out)),
                        "--max-seconds",
                        limit,
                    ],
                    stdin=True,
                )
                consumer.expect("ready", 60)
                pace = ["--max-seconds", limit, "--rate", str(plan.rate)]
                pace += ["--seconds", str(plan.seconds), "--payload", str(plan.payload)]
                pace += ["--burst" if kind == "floor" else "--txn-size", str(plan.txn_size)]
                if kind == "floor":
                    producer = self.child(
                        "producer-floor",
                        "benchmarks.peers",
                        [*("paced", "--url", self.amqp, "--exchange", EXCHANGE), *pace],
                    )
                else:
                    producer = self.child(
                        f"producer-{kind}",
                        "benchmarks.workload",
                        [*("produce", "--dsn", self.dsn, "--table", table), *pace],
                    )
                producer.expect("ready", 60)
                cpu0 = relay.cpu() if relay else 0.0
                produced = producer.expect("done", plan.seconds + 60)
                producer.wait(30)
                consumer.send(str(produced["committed"]))
                consumer.expect("done", 60)
                consumer.wait(30)
                cpu1 = relay.cpu() if relay else 0.0
                rss = relay.peak_rss_mb() if relay else None
                peer_stats: Result = {}
                problems: list[str] = []
                if isinstance(relay, CdcRelay):
                    relay.stop()
                    problems = relay.log_problems()
                elif relay is not None:
                    relay.terminate()
                    peer_stats = relay.expect("done", 10)
        finally:
            self.end_children()
            if kind == "cdc":
                with suppress(ChildError):  # never hide the error that got us here
                    relay_cli(env, "drop", "--yes")
        data = json.loads(out.read_text())
        committed = int(produced["committed"])
        res: Result = {
            "offered_rate": plan.rate,
            "achieved_rate": produced.get("achieved_rate", plan.rate),
            "producer_worst_lag_s": produced["worst_lag_s"],
            "seconds": plan.seconds,
            "committed": committed,
            "received": data["received"],
            "avg_body_bytes": data["avg_body_bytes"],
            "cpu_us_per_event": (cpu1 - cpu0) / committed * 1e6 if relay and committed else None,
            "peak_rss_mb": rss,
            "settle_s": round(settled, 1),
        }
        if kind == "cdc":
            res["relay_log_problems"] = problems
        if peer_stats.get("cycles"):
            res["poll_cycles"] = peer_stats["cycles"]
        if kind == "polling":
            res["poll_idle_s"] = plan.poll_idle if idle is None else idle
        for basis in ("commit", "created"):
            values = data[f"{basis}_latency_s"]
            if values:
                res[f"{basis}_latency_ms"] = report.latency_summary(values)
        return res

    def idle_cost(self, kind: str, seconds: float = 5.0, idle: float | None = None) -> Result:
        """What a relay costs while nothing is written: its CPU, and the transactions it
        makes the database run (``pg_stat_database.xact_commit``, less the probe's own).
        For cdc-relay also its start-up time (spawn → ``streaming``) and its walsender's CPU."""
        table = POLL_OUTBOX if kind == "polling" else OUTBOX
        slot = "bench_idle"
        startup: float | None = None
        walsender: int | None = None
        self.reset(table)
        env = self._relay_env(slot)
        relay: Child
        try:
            if kind == "cdc":
                relay_cli(env, "init", "--create-outbox")
                spawned = time.time()
                cdc = self.relay("relay-idle", slot)
                startup = cdc.wait_streaming() - spawned
                walsender = self.walsender_pid(slot)
                relay = cdc
            else:
                relay = self.child(
                    "polling-idle",
                    "benchmarks.peers",
                    [*self._peer_args("polling", idle), "--max-seconds", str(seconds + 120)],
                )
                relay.expect("ready", 60)
            time.sleep(1.0)  # past start-up
            xacts0, cpu0, pg0 = self._xacts(), relay.cpu(), self._server_cpu(broker=False)
            wal0 = cpu_or_none(walsender)
            time.sleep(seconds)
            xacts1, cpu1, pg1 = self._xacts(), relay.cpu(), self._server_cpu(broker=False)
            wal1 = cpu_or_none(walsender)
            if isinstance(relay, CdcRelay):
                relay.stop()
            else:
                relay.terminate()
        finally:
            self.end_children()
            if kind == "cdc":
                with suppress(ChildError):
                    relay_cli(env, "drop", "--yes")
        return {
            "seconds": seconds,
            "db_xacts_per_s": max(0, xacts1 - xacts0 - 2) / seconds,
            "cpu_ms_per_s": (cpu1 - cpu0) / seconds * 1000,
            "postgres_cpu_ms_per_s": (pg1 - pg0) / seconds * 1000,
            **(
                {"poll_idle_s": self.plan.poll_idle if idle is None else idle}
                if kind == "polling"
                else {
                    "startup_s": startup,
                    "walsender_cpu_ms_per_s": (
                        None if wal0 is None or wal1 is None else (wal1 - wal0) / seconds * 1000
                    ),
                }
            ),
        }

    def broker_cpu(self, cluster: bool = False) -> float:
        """CPU seconds of the broker (the node's Erlang VM, or the three cluster nodes'), read
        per scenario: the broker shares the two cores, so what a message shape costs it bounds
        every publisher. Only our own VMs count (from their pid files), not every beam.smp on
        the machine: the scale section runs four, and other work may run its own."""
        if cluster:
            return sum(self.node_cpu().values())
        return cpu_or_none(_pid_of(self.rabbit.pidfile)) or 0.0

    def node_cpu(self) -> dict[str, float]:
        """CPU seconds of each cluster node's VM, by node name."""
        assert self.cluster is not None
        return {n.node: cpu_or_none(n.pid) or 0.0 for n in self.cluster.nodes}

    def _server_cpu(self, broker: bool = True) -> float:
        """CPU seconds of every PostgreSQL process (postmaster and its children) and, with
        ``broker``, of the broker (every beam.smp): one pass over /proc."""
        postmaster = int((self.pg.data / "postmaster.pid").read_text().split()[0])
        total = 0.0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                # stat[1] is the parent pid; stat[11], stat[12] are utime and stime
                ours = int(entry.name) == postmaster or int(stat[1]) == postmaster
                if not ours and broker:
                    ours = b"beam.smp" in (entry / "cmdline").read_bytes()
                if ours:
                    total += (int(stat[11]) + int(stat[12])) / CLK_TCK
        return total

    def settle(self, limit: float = 30.0) -> float:
        """Wait until the servers are quiet (< 0.15 cores over 0.5 s), at most ``limit`` s.

        A scenario must not pay for the last one's clean-up: the broker deleting a queue of a
        million persistent messages, PostgreSQL checkpointing. Returns the seconds waited.
        """
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            c0, w0 = self._server_cpu(), time.monotonic()
            time.sleep(0.5)
            if (self._server_cpu() - c0) / (time.monotonic() - w0) < 0.15:
                break
        return time.monotonic() - t0

    def _xacts(self) -> int:
        self.sql.execute("SELECT pg_stat_clear_snapshot()")
        row = self.sql.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (DB,)
        ).fetchone()
        return int(row[0]) if row else 0

    # -- peers ----------------------------------------------------------------------------------
    def peer_drain(self, kind: str, n: int) -> Result:
        self.reset(POLL_OUTBOX)
        info = self.backlog(POLL_OUTBOX, n, self.plan.txn_size)
        info["settle_s"] = round(self.settle(), 1)
        with self.queue(kind) as q:
            peer = self.child(
                f"{kind}-backlog",
                "benchmarks.peers",
                [*self._peer_args(kind), "--max-seconds", str(self.drain_timeout(n) + 30)],
            )
            ready = peer.expect("ready", 60)
            cpu0 = peer.cpu()
            t1, depth = self.broker.wait_depth(q, n, self.drain_timeout(n), alive=peer.alive)
            cpu1 = peer.cpu()
            rss = peer.peak_rss_mb()
            peer.terminate()
            stats = peer.expect("done", 10)
        seconds = t1 - ready["t"]
        return {
            "n": n,
            "delivered": depth,
            "seconds": seconds,
            "rate": n / seconds,
            "cpu_us_per_event": (cpu1 - cpu0) / n * 1e6,
            "peak_rss_mb": rss,
            **info,
            **({"poll_cycles": stats["cycles"]} if stats.get("cycles") else {}),
        }


def _pid_of(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def tracing_off_path(txn_size: int) -> Result:
    """What tracing costs the relay when it is off, measured on the relay's own object.

    With tracing off the hot path runs no OpenTelemetry code at all: it tests
    ``Tracing.enabled`` once per published event and once per confirm callback (at most one
    per event), and tests the list of open spans once per commit. This times that test on a
    real ``Tracing(False)`` against an empty loop (best of 7, 1M iterations each) and scales
    it to the checks one event costs; the report sets it against the relay's CPU per event.
    """
    from cdc_relay.telemetry import Tracing

    tracing = Tracing(False)
    n = 1_000_000

    def guarded() -> float:
        t = time.perf_counter()
        for _ in range(n):
            if tracing.enabled:
                raise AssertionError("tracing is off")
        return time.perf_counter() - t

    def bare() -> float:
        t = time.perf_counter()
        for _ in range(n):
            pass
        return time.perf_counter() - t

    with_check = min(guarded() for _ in range(7))
    without = min(bare() for _ in range(7))
    per_check = max(with_check - without, 0.0) / n * 1e9
    checks = 2 + 1 / txn_size
    return {
        "ns_per_check": per_check,
        "checks_per_event": checks,
        "ns_per_event": per_check * checks,
    }


def _children_import() -> str:
    """Where the children's ``cdc_relay`` comes from: they run in this checkout (cwd), which
    must win over the editable install of another one (a worktree shares its venv)."""
    out = subprocess.run(
        [sys.executable, "-c", "import cdc_relay; print(cdc_relay.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    path = Path(out.stdout.strip())
    if not path.is_relative_to(REPO):
        raise RuntimeError(f"children would import {path}, not this checkout's ({REPO})")
    return str(path)


def _git() -> dict[str, Any]:
    def run(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        )
        return out.stdout.strip()

    return {"commit": run("rev-parse", "--short", "HEAD"), "dirty": bool(run("status", "-s"))}


def _step(
    bench: Bench, results: dict[str, Result], key: str, title: str, fn: Callable[[], Result]
) -> None:
    print(f"  {title} ...", end="", flush=True)
    t = time.monotonic()
    try:
        results[key] = fn()
        results[key]["loadavg_1m"] = round(os.getloadavg()[0], 2)
        extra = ""
        r = results[key]
        if "rate" in r:
            extra = f"{r['rate']:,.0f} ev/s"
            if r.get("walsender_cpu_us_per_event") is not None:
                extra += (
                    f", CPU µs/event: relay {r['cpu_us_per_event']:.1f}, "
                    f"walsender {r['walsender_cpu_us_per_event']:.1f}"
                )
            elif key.startswith("consumer_") and r.get("cpu_us_per_event") is not None:
                extra += f", consumer CPU {r['cpu_us_per_event']:.1f} µs/event"
                if r.get("inbox_backend_cpu_us_per_event") is not None:
                    extra += f", its inbox backend {r['inbox_backend_cpu_us_per_event']:.1f}"
        elif "age_ms" in r:
            a = r["age_ms"]
            extra = (
                f"age p50 {a['p50']:.1f}, p99 {a['p99']:.1f}, max {a['max']:.1f} ms "
                f"({r['received']:,} of {r['committed']:,}); "
                f"writer {r['achieved_rate']:,.0f} ev/s of {r['offered_rate']:,.0f}"
            )
        elif "commit_latency_ms" in r:
            extra = f"p99 {r['commit_latency_ms']['p99']:.1f} ms (commit)"
        elif "created_latency_ms" in r:
            extra = f"p99 {r['created_latency_ms']['p99']:.1f} ms (created_at)"
        elif "db_xacts_per_s" in r:
            extra = (
                f"{r['db_xacts_per_s']:.0f} db xacts/s, CPU ms/s: relay "
                f"{r['cpu_ms_per_s']:.1f}, postgres {r['postgres_cpu_ms_per_s']:.1f}"
            )
            if r.get("startup_s") is not None:
                extra += f"; start-up {r['startup_s']:.2f} s"
        elif "ns_per_event" in r:
            extra = f"{r['ns_per_event']:.0f} ns/event"
        print(f" {extra} [{time.monotonic() - t:.0f}s]", flush=True)
    except Exception as exc:
        results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f" FAILED: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
        traceback.print_exc(file=sys.stderr)
    finally:
        bench.end_children()


Step = tuple[str, str, Callable[[], Result]]


def _steps(bench: Bench, plan: Plan) -> list[Step]:
    """Every step of the plan's sections; ``key#r`` keys are rounds, combined after the run."""
    steps: list[Step] = []
    if "main" in plan.sections:
        steps += _main_steps(bench, plan)
    if "shapes" in plan.sections:
        steps += _shape_steps(bench, plan)
    if "recovery" in plan.sections:
        steps += _recovery_steps(bench, plan)
    if "tls" in plan.sections:
        steps += _tls_steps(bench, plan)
    if "scale" in plan.sections:
        steps += _scale_steps(bench, plan)
    if "consumer" in plan.sections:
        steps += _consumer_steps(bench, plan)
    return steps


def _scale_steps(bench: Bench, plan: Plan) -> list[Step]:
    """Round after round, the same backlog drained by one relay into a classic queue on one
    node, then into a quorum queue on the three-node cluster (all nodes in ``amqp_url``)."""
    n = plan.backlog
    steps: list[Step] = []
    for r in range(1, plan.rounds + 1):
        tag = f" (round {r}/{plan.rounds})"
        steps += [
            (
                f"single_classic#{r}",
                f"cdc-relay drain, one node, classic queue, N={n:,}{tag}",
                partial(bench.cdc_drain, "single_classic", n, plan.txn_size),
            ),
            (
                f"cluster_quorum#{r}",
                f"cdc-relay drain, 3-node cluster, quorum queue, N={n:,}{tag}",
                partial(bench.cdc_drain, "cluster_quorum", n, plan.txn_size, cluster=True),
            ),
            (
                f"split_one#{r}",
                f"cdc-relay drain, 1 relay over {SPLIT_PARTITIONS} partitions, N={n:,}{tag}",
                partial(bench.split_drain, "split_one", n, plan.txn_size, 1),
            ),
            (
                f"split_two#{r}",
                f"cdc-relay drain, 2 relays over {SPLIT_PARTITIONS // 2} partitions each, "
                f"N={n:,}{tag}",
                partial(bench.split_drain, "split_two", n, plan.txn_size, 2),
            ),
        ]
    if "consumer" in plan.sections:
        steps += _consumer_steps(bench, plan)
    return steps


def _consumer_steps(bench: Bench, plan: Plan) -> list[Step]:
    """Round after round: the relay fills both consumers' queues with the same N envelopes,
    the bare consumer and the kit each drain one, then each takes the steady load and the
    light load; which of the two goes first alternates by round, so neither always inherits
    the other's clean-up."""
    n, c = plan.backlog, bench.consumers
    who = {"bare": "bare pika consumer", "kit": "cdc-relay consume"}
    loads = {
        "steady": (plan.rate, plan.consumer_seconds),
        "light": (plan.consumer_light_rate, plan.consumer_light_seconds),
    }
    steps: list[Step] = []
    for r in range(1, plan.rounds + 1):
        tag = f" (round {r}/{plan.rounds})"
        order = ("bare", "kit") if r % 2 else ("kit", "bare")
        steps.append(
            (
                f"consumer_fill#{r}",
                f"cdc-relay fills both consumers' queues, N={n:,}{tag}",
                partial(c.fill, n, plan.txn_size),
            )
        )
        for kind in order:
            handler = " (no-op handler)" if kind == "kit" else ""
            steps.append(
                (
                    f"consumer_{kind}#{r}",
                    f"{who[kind]}{handler} drains N={n:,}{tag}",
                    partial(c.drain, kind, n),
                )
            )
        for load, (rate, seconds) in loads.items():
            for kind in order:
                handler = " (warehouse handler)" if kind == "kit" else ""
                steps.append(
                    (
                        f"consumer_{load}_{kind}#{r}",
                        f"{load} {rate:,.0f} ev/s for {seconds:.0f} s, {who[kind]}{handler}{tag}",
                        partial(c.steady, kind, rate, seconds, plan.txn_size, plan.payload),
                    )
                )
        # the delivery ledger's price on the relay: the same drain without and with it
        steps += [
            (
                f"ledger_off#{r}",
                f"cdc-relay drain, ledger off, N={n:,}{tag}",
                partial(bench.cdc_drain, "ledger_off", n, plan.txn_size),
            ),
            (
                f"ledger_on#{r}",
                f"cdc-relay drain, ledger = true, N={n:,}{tag}",
                partial(
                    bench.cdc_drain, "ledger_on", n, plan.txn_size, settings={"LEDGER": "true"}
                ),
            ),
        ]
    return steps


def _tls_steps(bench: Bench, plan: Plan) -> list[Step]:
    """Round after round, the backlog drain over plain connections (sslmode=disable), then over
    TLS on both sides (verify-full to PostgreSQL, amqps with the CA to RabbitMQ)."""
    n = plan.backlog
    steps: list[Step] = []
    for r in range(1, plan.rounds + 1):
        tag = f" (round {r}/{plan.rounds})"
        steps += [
            (
                f"tls_plain#{r}",
                f"cdc-relay drain, plain, N={n:,}{tag}",
                lambda: bench.cdc_drain(
                    "tls_plain", n, plan.txn_size, settings=bench.plain_settings()
                ),
            ),
            (
                f"tls_tls#{r}",
                f"cdc-relay drain, TLS on both sides, N={n:,}{tag}",
                lambda: bench.cdc_drain("tls_tls", n, plan.txn_size, settings=bench.tls_settings()),
            ),
        ]
    return steps


def _recovery_steps(bench: Bench, plan: Plan) -> list[Step]:
    """Round after round, at the same N: the relay draining N rows from its slot, then
    ``init --backfill`` publishing the same N rows from the table."""
    n = plan.recovery
    steps: list[Step] = []
    for r in range(1, plan.rounds + 1):
        tag = f" (round {r}/{plan.rounds})"
        steps += [
            (
                f"recovery_stream#{r}",
                f"cdc-relay streaming drain, N={n:,}{tag}",
                partial(bench.cdc_drain, "recovery_stream", n, plan.txn_size),
            ),
            (
                f"recovery_backfill#{r}",
                f"cdc-relay init --backfill, N={n:,}{tag}",
                partial(bench.backfill_drain, "recovery_backfill", n, plan.txn_size),
            ),
        ]
    return steps


def _shape_steps(bench: Bench, plan: Plan) -> list[Step]:
    """Round after round: for each shape the same-shape ceiling, the minimal ceiling, then the
    relay, all at the shape's N and payload; then the relay idle. A change in machine load hits
    a shape's three publishers alike, and every shape once per round."""
    steps: list[Step] = []
    for r in range(1, plan.rounds + 1):
        tag = f" (round {r}/{plan.rounds})"
        for shape in plan.shapes:
            key, label, n = f"shape_{shape.key}", f"s_{shape.key}", shape.n
            steps += [
                (
                    f"{key}_same#{r}",
                    f"shape {shape.label}: ceiling, relay's message shape, N={n:,}{tag}",
                    partial(bench.ceiling_pika, n, shape.payload, False, f"bench_{label}"),
                ),
                (
                    f"{key}_minimal#{r}",
                    f"shape {shape.label}: ceiling, minimal message, N={n:,}{tag}",
                    partial(bench.ceiling_pika, n, shape.payload, True),
                ),
                (
                    f"{key}_relay#{r}",
                    f"shape {shape.label}: cdc-relay, N={n:,}{tag}",
                    partial(
                        bench.cdc_drain,
                        label,
                        n,
                        shape.txn_size,
                        payload=shape.payload,
                        payload_type=shape.payload_type,
                    ),
                ),
            ]
        steps.append(
            (
                f"cdc_idle#{r}",
                f"cdc-relay idle for {plan.idle_seconds:.0f} s{tag}",
                partial(bench.idle_cost, "cdc", plan.idle_seconds),
            )
        )
    return steps


def _main_steps(bench: Bench, plan: Plan) -> list[Step]:
    """The comparison with ceilings and peers, latency, tracing and scale. The relay's idle
    cost and its one huge transaction are measured in the shapes section, in rounds."""
    n = plan.backlog
    steps: list[Step] = []
    # the headline comparison, interleaved so that a change in machine load hits all three
    for r in range(1, plan.rounds + 1):
        tag = f" (round {r}/{plan.rounds})"
        steps += [
            (
                f"ceiling_pika#{r}",
                f"ceiling: raw pika, N={n:,}{tag}",
                partial(bench.ceiling_pika, n),
            ),
            (
                f"cdc_backlog#{r}",
                f"cdc-relay backlog drain, N={n:,}{tag}",
                partial(bench.cdc_drain, "backlog", n, plan.txn_size),
            ),
            (
                f"cdc_traced#{r}",
                f"cdc-relay backlog drain, tracing on, N={n:,}{tag}",
                partial(bench.cdc_drain, "traced", n, plan.txn_size, True),
            ),
            (
                f"polling_backlog#{r}",
                f"polling relay drain, N={n:,}{tag}",
                partial(bench.peer_drain, "polling", n),
            ),
        ]
    rate = f"{plan.rate:,.0f} ev/s"
    steps += [
        (
            "cdc_strict_order",
            f"cdc-relay backlog drain, max_in_flight_per_aggregate = 1, N={n:,}",
            partial(
                bench.cdc_drain,
                "strict",
                n,
                plan.txn_size,
                settings={"MAX_IN_FLIGHT_PER_AGGREGATE": "1"},
            ),
        ),
        (
            "cdc_traced_sampled",
            f"cdc-relay backlog drain, tracing on, 1% sampled, N={n:,}",
            partial(bench.cdc_drain, "sampled", n, plan.txn_size, True, 0.01),
        ),
        (
            "tracing_off_path",
            "tracing off: the hot path's checks, timed in-process",
            partial(tracing_off_path, plan.txn_size),
        ),
        (
            "ceiling_recvlogical",
            f"ceiling: pg_recvlogical, N={n:,}",
            partial(bench.ceiling_recvlogical, n, plan.txn_size),
        ),
        (
            "naive_backlog",
            f"naive relay drain, N={plan.naive:,}",
            partial(bench.peer_drain, "naive", plan.naive),
        ),
        ("floor_steady", f"latency floor: raw pika at {rate}", partial(bench.steady, "floor")),
        ("cdc_steady", f"cdc-relay steady {rate}", partial(bench.steady, "cdc")),
    ]
    steps.append(
        (
            "polling_idle",
            f"polling relay idle for 5 s, {plan.poll_idle * 1000:.0f} ms idle poll",
            partial(bench.idle_cost, "polling"),
        )
    )
    for i, idle in enumerate(plan.steady_poll_idles):
        steps.append(
            (
                report.polling_steady_key(i, idle),
                f"polling relay steady {rate}, {idle * 1000:.0f} ms idle poll",
                partial(bench.steady, "polling", idle),
            )
        )
    for size in plan.scale:
        if size <= SCALE_CEILING_MAX:
            steps.append(
                (
                    f"ceiling_pika_{size}",
                    f"ceiling: raw pika, N={size:,}",
                    partial(bench.ceiling_pika, size),
                )
            )
        steps += [
            (
                f"cdc_scale_{size}",
                f"cdc-relay backlog drain, N={size:,}",
                partial(bench.cdc_drain, f"scale_{size}", size, plan.txn_size),
            ),
        ]
    steps.append(
        (
            "ceiling_recvlogical_big_txn",
            f"ceiling: pg_recvlogical, one transaction of {plan.big_txn:,} rows",
            partial(bench.ceiling_recvlogical, plan.big_txn, plan.big_txn),
        )
    )
    return steps


def _combine_rounds(results: dict[str, Result]) -> None:
    """Replace every ``key#r`` with one ``key``: the median of its rounds (``_combine``, or
    ``_combine_idle`` for idle-cost rounds), every round kept in ``samples``."""
    groups: dict[str, list[Result]] = {}
    for key in [k for k in results if "#" in k]:
        groups.setdefault(key.split("#", 1)[0], []).append(results.pop(key))
    for key, samples in groups.items():
        if any("cpu_ms_per_s" in s for s in samples):
            results[key] = _combine_idle(samples)
            continue
        if any("age_ms" in s for s in samples):
            results[key] = _combine_ages(samples)
            continue
        combined = _combine(samples)
        rss = [s["peak_rss_mb"] for s in samples if "error" not in s and s.get("peak_rss_mb")]
        if rss and "samples" in combined:
            combined["peak_rss_mb"] = max(rss)  # the worst round, for the peak RSS target
        results[key] = combined


_IDLE_FIELDS = (
    "cpu_ms_per_s",
    "db_xacts_per_s",
    "postgres_cpu_ms_per_s",
    "walsender_cpu_ms_per_s",
    "startup_s",
)


def _combine_idle(samples: list[Result]) -> Result:
    """Rounds of an idle measurement → the median of each figure; every round in ``samples``."""
    ok = [s for s in samples if "error" not in s]
    if not ok:
        return samples[0]
    out: Result = dict(ok[0])
    for field in _IDLE_FIELDS:
        values = [float(s[field]) for s in ok if s.get(field) is not None]
        if values:
            out[field] = statistics.median(values)
    out["round_cpu_ms_per_s"] = [float(s["cpu_ms_per_s"]) for s in ok]
    out["failed_rounds"] = len(samples) - len(ok)
    out["samples"] = samples
    return out


_AGE_FIELDS = ("p50", "p95", "p99", "max", "mean")


def _combine_ages(samples: list[Result]) -> Result:
    """Rounds of a steady-load age measurement → the median of each percentile over the
    rounds (the CDF of the median-p99 round); each round's figures, writer's rate included,
    stay in the rounds' ``samples``."""
    ok = [s for s in samples if "error" not in s and "age_ms" in s]
    if not ok:
        return samples[0]
    p99 = statistics.median(float(s["age_ms"]["p99"]) for s in ok)
    base = min(ok, key=lambda s: abs(float(s["age_ms"]["p99"]) - p99))
    ages = {f: statistics.median(float(s["age_ms"][f]) for s in ok) for f in _AGE_FIELDS}
    return {
        **base,
        "age_ms": {**base["age_ms"], **ages, "n": sum(int(s["age_ms"]["n"]) for s in ok)},
        "achieved_rate": statistics.median(float(s["achieved_rate"]) for s in ok),
        "failed_rounds": len(samples) - len(ok),
        "samples": samples,
    }


def _combine(samples: list[Result]) -> Result:
    """Rounds of one drain → the median rate; every round stays in ``samples``."""
    ok = [s for s in samples if "error" not in s]
    if not ok:
        return samples[0]
    rates = [float(s["rate"]) for s in ok]
    median = statistics.median(rates)
    base = min(ok, key=lambda s: abs(float(s["rate"]) - median))
    return {
        **base,
        "rate": median,
        "seconds": base["n"] / median,
        "round_rates": rates,
        "failed_rounds": len(samples) - len(ok),
        "samples": samples,
    }


def _steady_seconds(plan: Plan) -> str:
    """The steady load's length as the header shows it: the consumer section's is its own."""
    if plan.sections == ("consumer",):
        return f"{plan.consumer_seconds:.0f} s"
    if "consumer" in plan.sections and plan.consumer_seconds != plan.seconds:
        return f"{plan.seconds:.0f} s (consumer section {plan.consumer_seconds:.0f} s)"
    return f"{plan.seconds:.0f} s"


def run(plan: Plan, out_dir: Path, sandbox_dir: Path | None) -> int:
    started = dt.datetime.now(dt.UTC)
    root = Path(tempfile.mkdtemp(prefix="cdc-relay-bench-", dir=sandbox_dir))
    logdir = root / "logs"
    logdir.mkdir()
    bench = Bench(plan, root, logdir)
    results: dict[str, Result] = {}
    t_run = time.monotonic()
    load_start = os.getloadavg()
    if load_start[0] > (os.cpu_count() or 1) * 0.5:
        print(
            f"note: load average {load_start[0]:.1f} on {os.cpu_count()} CPUs before starting; "
            "other work on this machine makes every figure noisier (ratios less so)"
        )
    print(
        f"cdc-relay benchmark ({'quick' if plan.quick else 'full'}"
        f"{'' if plan.sections == SECTIONS else ', only ' + ', '.join(plan.sections)}): "
        f"payload ~{plan.payload} B, backlog N={plan.backlog:,}, "
        f"steady {plan.rate:,.0f} ev/s x {_steady_seconds(plan)}, "
        f"window {WINDOW}, poll idle {plan.poll_idle * 1000:.0f} ms, {plan.rounds} rounds; "
        f"servers under {root}",
        flush=True,
    )
    try:
        _step(bench, results, "servers", "starting PostgreSQL + RabbitMQ", bench.start)
        if "error" not in results["servers"]:
            for key, title, fn in _steps(bench, plan):
                _step(bench, results, key, title, fn)
            _combine_rounds(results)
    finally:
        print("  stopping servers ...", flush=True)
        bench.stop()
    failed = [k for k, v in results.items() if "error" in v]
    anomalies = report.anomalies(results)
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "mode": "quick" if plan.quick else "full",
        "plan": asdict(plan),
        "window": WINDOW,
        "relay_status_interval_s": STATUS_INTERVAL,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "git": _git(),
        "total_s": round(time.monotonic() - t_run, 1),
        **bench.meta,
    }
    main_section = "main" in plan.sections
    rows = report.rows(results, plan) if main_section else []
    targets = report.targets(results, plan) if main_section else []
    shape_rows: list[Result] = []
    if "shapes" in plan.sections:
        shape_rows = report.shape_rows(results, plan)
        targets += report.shape_targets(results, plan)
    if "recovery" in plan.sections:
        targets += report.recovery_targets(results)
    if "tls" in plan.sections:
        targets += report.tls_summary(results)
    if "scale" in plan.sections:
        targets += report.scale_summary(results) + report.split_summary(results)
    if "consumer" in plan.sections:
        targets += report.consumer_summary(results, plan) + report.ledger_summary(results)
    print()
    if main_section:
        print(report.table(rows))
        print()
    if shape_rows:
        print(report.shapes_table(shape_rows, plan))
        print()
    print(report.targets_text(targets))
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    doc = {
        "meta": meta,
        "results": results,
        "rows": rows,
        "shape_rows": shape_rows,
        "targets": targets,
        "anomalies": anomalies,
    }
    text = json.dumps(doc, indent=2, default=str)
    # a partial run (--only) does not replace the full run's latest.json
    suffix = "" if plan.sections == SECTIONS else "-" + "-".join(plan.sections)
    (out_dir / f"{stamp}{suffix}.json").write_text(text)
    (out_dir / f"latest{suffix}.json").write_text(text)
    written = [out_dir / f"{stamp}{suffix}.json", out_dir / f"latest{suffix}.json"]
    png = report.plot(doc, out_dir / "latest.png") if main_section else None
    if png is not None:
        written.append(png)
    elif main_section:
        print("(no plot: matplotlib is missing; install it with: pip install -e '.[bench]')")
    print("\nwrote " + ", ".join(str(p) for p in written))
    if anomalies:
        print("anomalies:\n  " + "\n  ".join(anomalies))
    print(f"total {meta['total_s']:.0f} s")
    if failed or anomalies:
        if failed:
            print(f"scenarios that failed: {', '.join(failed)}")
        print(f"child logs (relay, peers, producer, consumer) kept in {logdir}")
        shutil.rmtree(root / "postgres", ignore_errors=True)
        shutil.rmtree(root / "rabbitmq", ignore_errors=True)
        # a scenario that could not run is a failed benchmark; anomalies are findings
        return 1 if failed else 0
    shutil.rmtree(root, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smaller N, 10 s steady load")
    parser.add_argument("--payload", type=int, default=150, choices=[150, 1024, 16384])
    parser.add_argument("--rate", type=float, default=2000.0, help="steady load, events/s")
    parser.add_argument("--seconds", type=float, help="steady load duration (10 quick, 30 full)")
    parser.add_argument(
        "--poll-idle",
        type=float,
        default=0.01,
        help="seconds the polling relays sleep after an empty poll (default 0.01)",
    )
    parser.add_argument(
        "--only",
        choices=["shapes", "recovery", "tls", "scale", "consumer"],
        help="run one section: 'shapes' (the outbox shapes against their two ceilings, the "
        "relay's idle cost and start-up time) or 'recovery' (init --backfill against the "
        "streaming drain of the same rows) or 'tls' (the drain over TLS on both sides "
        "against plain) or 'scale' (the drain into a quorum queue on a three-node cluster "
        "against a classic queue on one node; two relays over a partitioned outbox against "
        "one) or 'consumer' (cdc-relay consume against a bare pika consumer: drain rate and "
        "the age of events applied at a steady rate)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--sandbox-dir", type=Path, help="parent directory for the servers (default: system tmp)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 20_000:
        parser.error("--rate must be in (0, 20000]")
    if args.seconds is not None and not 0 < args.seconds <= 300:
        parser.error("--seconds must be in (0, 300]")
    if not 0 < args.poll_idle <= 5:
        parser.error("--poll-idle must be in (0, 5]")
    plan = Plan.make(
        args.quick, args.payload, args.rate, args.seconds, args.poll_idle, only=args.only
    )
    return run(plan, args.out, args.sandbox_dir)


if __name__ == "__main__":
    sys.exit(main())
