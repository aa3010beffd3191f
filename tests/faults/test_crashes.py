"""Crashes and broken connections mid-flood, each ending with the one delivery verdict.

Every scenario floods the outbox from a background writer (``Flood``), breaks something while
events are in flight, lets the relay recover, drains the queue from an independent consumer and
calls ``verify``: nothing committed lost, nothing rolled back published, duplicates only from
transactions at or after the slot position reported before the (first) fault, first deliveries
in per-aggregate commit order. ``pytest -s`` prints each scenario's counts.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest

from cdc_relay.lsn import Lsn
from tests.faults.checks import Verdict, verify
from tests.faults.proxy import TcpProxy
from tests.integration.harness import Env, Flood, Relay, count_records, log_records

pytestmark = pytest.mark.integration

STREAMING = "streaming"
RETRYING = "retrying after failure"


# -- helpers ------------------------------------------------------------------------------------
def _records(relay: Relay) -> list[dict[str, Any]]:
    return log_records(relay.log())


def _count(relay: Relay, msg: str, contains: str = "") -> int:
    return count_records(relay.log(), msg, contains)


def _wait_log(
    relay: Relay, msg: str, at_least: int = 1, contains: str = "", timeout: float = 30
) -> float:
    """Wait until ``msg`` (whose error mentions ``contains``) was logged ``at_least`` times while
    the process stays alive; returns the seconds waited."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if _count(relay, msg, contains) >= at_least:
            return time.monotonic() - start
        assert relay.proc.poll() is None, f"relay exited {relay.proc.returncode}:\n{_tail(relay)}"
        time.sleep(0.05)
    raise AssertionError(f"no {at_least}x {msg!r} ({contains!r}) after {timeout}s:\n{_tail(relay)}")


def _streaming_lsns(relay: Relay) -> list[int]:
    """The slot position each streaming session of the relay started from."""
    return [int(Lsn.parse(r["lsn"])) for r in _records(relay) if r.get("msg") == STREAMING]


def _tail(relay: Relay, lines: int = 30) -> str:
    return "\n".join(relay.log().splitlines()[-lines:])


def _via(url: str, port: int) -> str:
    """``url`` with its loopback port replaced by ``port`` (to route it through a proxy)."""
    old = urlsplit(url).port
    new = url.replace(f"127.0.0.1:{old}", f"127.0.0.1:{port}", 1)
    assert new != url, url
    return new


def _report(name: str, verdict: Verdict, started: float, **extra: object) -> None:
    fields = " ".join(f"{k}={v}" for k, v in extra.items())
    print(f"\n[{name}] {verdict} {fields} took={time.monotonic() - started:.1f}s")


def _first_deliveries(env: Env, relay: Relay) -> None:
    env.wait_for(lambda: env.queue_depth() > 0, what="first deliveries")
    assert relay.proc.poll() is None, _tail(relay)


@contextmanager
def _proxies(*targets: int) -> Iterator[list[TcpProxy]]:
    proxies = [TcpProxy(t) for t in targets]
    try:
        yield proxies
    finally:
        for p in proxies:
            p.close()


StartFlood = Callable[[int, float], Flood]


@pytest.fixture
def flood_writer(env: Env) -> Iterator[StartFlood]:
    """Start background writers (batch size, pause between transactions); whatever happens in
    the test, they are stopped before the test's database is dropped."""
    floods: list[Flood] = []

    def start(batch: int, pause: float) -> Flood:
        flood = Flood(env, aggregates=16, batch=batch, limit=20_000, pause=pause).start()
        floods.append(flood)
        return flood

    yield start
    for flood in floods:
        flood.stop()


def _finish(
    name: str,
    env: Env,
    flood: Flood,
    relay: Relay,
    started: float,
    flushed_before: int | None,
    **extra: object,
) -> Verdict:
    committed = list(flood.stop())
    got = env.consume_all(committed)
    verdict = verify(
        committed,
        got,
        flushed_before=flushed_before,
        forbidden_ids=flood.rolled_back,
        uncertain_ids=flood.uncertain,
    )
    _report(name, verdict, started, **extra)
    assert relay.proc.poll() is None, f"relay exited:\n{_tail(relay)}"
    assert relay.terminate() == 0, _tail(relay)
    return verdict


# -- scenarios ----------------------------------------------------------------------------------
def test_kill_9_at_random_points_during_one_flood(env: Env, flood_writer: StartFlood) -> None:
    started = time.monotonic()
    seed = int(os.environ.get("CDC_RELAY_FAULT_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    env.init()
    relay = env.start_relay(reconnect_max="2")
    relay.wait_streaming()
    flood = flood_writer(5, 0.02)
    flood.wait_for(200)
    _first_deliveries(env, relay)
    flushed_before = env.slot_flush()
    kills = 0
    for _ in range(12):
        # streaming, with publishes in flight: kill at a random moment of it
        time.sleep(rng.uniform(0.05, 0.7))
        assert relay.proc.poll() is None, _tail(relay)
        relay.kill()
        assert relay.proc.returncode == -9
        kills += 1
        relay = env.start_relay(reconnect_max="2")
        relay.wait_streaming()
    verdict = _finish("kill -9", env, flood, relay, started, flushed_before, kills=kills, seed=seed)
    assert kills >= 10
    assert verdict.lost == 0


def test_sigterm_mid_flood_stops_cleanly_and_restart_resends_nothing(
    env: Env, flood_writer: StartFlood
) -> None:
    started = time.monotonic()
    env.init()
    relay = env.start_relay(reconnect_max="2")
    relay.wait_streaming()
    flood = flood_writer(20, 0.005)
    flood.wait_for(1000)
    _first_deliveries(env, relay)
    flushed_before = env.slot_flush()
    assert relay.terminate() == 0, _tail(relay)
    assert "stopped cleanly" in relay.log(), _tail(relay)
    committed = list(flood.stop())
    relay2 = env.start_relay(reconnect_max="2")
    relay2.wait_streaming()
    got = env.consume_all(committed)
    verdict = verify(
        committed,
        got,
        flushed_before=flushed_before,
        forbidden_ids=flood.rolled_back,
        uncertain_ids=flood.uncertain,
    )
    _report("sigterm", verdict, started)
    assert verdict.duplicates == 0, "a graceful stop must not cause a resend"
    assert relay2.terminate() == 0, _tail(relay2)


def test_postgres_crash_mid_flood(env: Env, flood_writer: StartFlood) -> None:
    started = time.monotonic()
    env.init()
    relay = env.start_relay(reconnect_max="2")
    relay.wait_streaming()
    flood = flood_writer(5, 0.02)
    flood.wait_for(800)
    _first_deliveries(env, relay)
    reported = env.slot_flush()
    crashed_at = len(flood.committed)
    try:
        env.pg.stop("immediate")
        time.sleep(1.0)
    finally:
        env.pg.start()
    # PostgreSQL 15 writes a logical slot's confirmed_flush_lsn to disk only when restart_lsn or
    # catalog_xmin move too (LogicalConfirmReceivedLocation does not mark the slot dirty
    # otherwise, so not even a CHECKPOINT saves it): after a crash the slot may restart *behind*
    # what the relay had reported ("the slot may go backwards", per the logical decoding docs).
    # The replay bound is then the position PostgreSQL kept: read it at once, before the relay
    # has had time to confirm much past it.
    kept = env.slot_flush()
    flood.wait_for(crashed_at + 800)
    _wait_log(relay, RETRYING, contains="PostgreSQL", timeout=30)
    _wait_log(relay, STREAMING, at_least=2, timeout=30)
    resumed = _streaming_lsns(relay)[1]
    # the relay resumed from the slot as PostgreSQL kept it, never ahead of what it confirmed
    assert resumed <= kept, f"resumed at {Lsn(resumed)}, slot was at {Lsn(kept)}"
    verdict = _finish(
        "postgres crash",
        env,
        flood,
        relay,
        started,
        min(reported, resumed),
        uncertain=len(flood.uncertain),
        retries=_count(relay, RETRYING),
        slot_moved_back=f"{max(0, reported - resumed)}B",
    )
    assert verdict.lost == 0


def test_rabbitmq_restart_mid_flood(env: Env, flood_writer: StartFlood) -> None:
    started = time.monotonic()
    env.init()
    relay = env.start_relay(reconnect_max="2")
    relay.wait_streaming()
    flood = flood_writer(5, 0.02)
    flood.wait_for(800)
    _first_deliveries(env, relay)
    flushed_before = env.slot_flush()
    down = time.monotonic()
    try:
        env.rabbit.stop()
        _wait_log(relay, RETRYING, contains="RabbitMQ", timeout=30)
        time.sleep(0.5)
    finally:
        env.rabbit.start()
    outage = time.monotonic() - down
    _wait_log(relay, STREAMING, at_least=2, timeout=30)
    verdict = _finish(
        "rabbitmq restart",
        env,
        flood,
        relay,
        started,
        flushed_before,
        outage=f"{outage:.1f}s",
        retries=_count(relay, RETRYING),
    )
    assert verdict.lost == 0


def test_half_open_broker_connection_detected_by_heartbeat(
    env: Env, flood_writer: StartFlood
) -> None:
    started = time.monotonic()
    env.init()
    with _proxies(env.rabbit.port) as (mq,):
        relay = env.start_relay(
            amqp_url=_via(env.rabbit.amqp_url, mq.port), amqp_heartbeat="2", reconnect_max="2"
        )
        relay.wait_streaming()
        flood = flood_writer(5, 0.02)
        flood.wait_for(500)
        _first_deliveries(env, relay)
        flushed_before = env.slot_flush()
        assert mq.blackhole() >= 1
        # pika checks every heartbeat + 5 s whether anything arrived: noticed after 7..14 s
        detected = _wait_log(relay, RETRYING, contains="heartbeat", timeout=25)
        _wait_log(relay, STREAMING, at_least=2, timeout=30)
        errors = [str(r.get("error")) for r in _records(relay) if r.get("msg") == RETRYING]
        # the stalled connection is dead to both peers by now; let the proxy reap it
        mq.restore()
        verdict = _finish(
            "half-open broker",
            env,
            flood,
            relay,
            started,
            flushed_before,
            detected_after=f"{detected:.1f}s",
        )
    assert any("heartbeat" in e.lower() for e in errors), errors
    assert detected < 20, f"half-open connection noticed only after {detected:.1f}s"
    assert verdict.lost == 0


def test_tcp_cuts_of_both_connections(env: Env, flood_writer: StartFlood) -> None:
    started = time.monotonic()
    rng = random.Random(int(os.environ.get("CDC_RELAY_FAULT_SEED", "7")))
    env.init()
    with _proxies(env.pg.port, env.rabbit.port) as (pgp, mq):
        relay = env.start_relay(
            pg_dsn=_via(env.dsn, pgp.port),
            amqp_url=_via(env.rabbit.amqp_url, mq.port),
            reconnect_max="2",
        )
        relay.wait_streaming()
        flood = flood_writer(5, 0.02)
        flood.wait_for(500)
        _first_deliveries(env, relay)
        flushed_before = env.slot_flush()
        cuts = 0
        for _ in range(3):
            for proxy in (mq, pgp):
                time.sleep(rng.uniform(0.2, 0.6))
                sessions = _count(relay, STREAMING)
                assert proxy.cut(reset=rng.random() < 0.5) >= 1
                cuts += 1
                _wait_log(relay, STREAMING, at_least=sessions + 1, timeout=30)
        verdict = _finish(
            "tcp cuts",
            env,
            flood,
            relay,
            started,
            flushed_before,
            cuts=cuts,
            retries=_count(relay, RETRYING),
        )
    assert verdict.lost == 0


def test_relay_started_before_servers_are_reachable(env: Env, flood_writer: StartFlood) -> None:
    started = time.monotonic()
    env.init()
    # the proxies' ports are reserved but nothing listens until start(): connecting is refused
    pgp = TcpProxy(env.pg.port, start=False)
    mq = TcpProxy(env.rabbit.port, start=False)
    try:
        flood = flood_writer(5, 0.05)
        relay = env.start_relay(
            pg_dsn=_via(env.dsn, pgp.port),
            amqp_url=_via(env.rabbit.amqp_url, mq.port),
            reconnect_max="2",
        )
        _wait_log(relay, RETRYING, at_least=2, contains="PostgreSQL", timeout=20)
        pgp.start()
        broker_down = _count(relay, RETRYING, "RabbitMQ")
        _wait_log(relay, RETRYING, at_least=broker_down + 2, contains="RabbitMQ", timeout=20)
        assert _count(relay, STREAMING) == 0
        written_while_down = len(flood.committed)
        mq.start()
        relay.wait_streaming()
        flood.wait_for(written_while_down + 200)
        verdict = _finish(
            "late servers",
            env,
            flood,
            relay,
            started,
            None,
            written_while_down=written_while_down,
            retries=_count(relay, RETRYING),
        )
    finally:
        pgp.close()
        mq.close()
    assert written_while_down > 0
    assert verdict.duplicates == 0  # nothing was published before the servers appeared
