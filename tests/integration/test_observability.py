"""What an operator sees: traces in an OTLP receiver, /metrics, /healthz, /readyz, alerts."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cdc_relay.lsn import Lsn
from tests.integration.harness import Delivery, Env, OtlpReceiver, insert_events, outbox_row

pytestmark = pytest.mark.integration

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exposed")


def _lag_once_confirmed(env: Env, got: list[Delivery], lag: Callable[[], float]) -> float:
    """Once the slot has passed the last delivered transaction, ``replication_lag_bytes`` (the
    relay's WAL end minus its confirmed flush) can be no more than the server's own view: its
    WAL end now minus the slot position read before the gauge. On a quiet server that is ~0, so
    a gauge that keeps counting confirmed WAL fails here. (It need not be exactly 0: WAL the
    walsender announced while events were unconfirmed can stay counted until more WAL comes.)"""
    last_commit = max(int(Lsn.parse(d.body["source"]["commit_lsn"])) for d in got)
    env.wait_for(lambda: env.slot_flush() > last_commit, timeout=20, what="slot past the events")
    flushed = env.slot_flush()
    value = lag()
    server_view = env.current_lsn() - flushed
    assert 0 <= value <= server_view, f"lag {value} > server WAL end - slot flush {server_view}"
    return value


def test_spans_continue_the_rows_trace_and_reach_the_consumer(env: Env, otlp: OtlpReceiver) -> None:
    env.init()
    relay = env.start_relay_with_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp.port}",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_SERVICE_NAME": "cdc-relay-test",
        }
    )
    relay.wait_streaming()
    row = outbox_row("TR-1", 0)
    with env.sql() as conn, conn.transaction():
        conn.execute(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, traceparent) "
            "VALUES (%s, %s, %s, %s, %s::jsonb, %s)",
            (*row, f"00-{TRACE_ID}-{PARENT_SPAN}-01"),
        )
        insert_events(conn, [outbox_row("TR-2", 0)])  # no traceparent: a new trace
    got = {d.message_id: d for d in env.consume(2, settle=0.5)}
    env.wait_for(lambda: len(otlp.spans) >= 2, timeout=20, what="spans exported")
    by_id = {
        next(a.value.string_value for a in s.attributes if a.key == "messaging.message.id"): s
        for s in otlp.spans
    }
    span = by_id[row[0]]
    assert span.trace_id.hex() == TRACE_ID
    assert span.parent_span_id.hex() == PARENT_SPAN
    assert span.name == f"publish {env.exchange}"
    assert span.kind == 4  # PRODUCER
    attrs = {a.key: a.value for a in span.attributes}
    assert attrs["messaging.system"].string_value == "rabbitmq"
    assert attrs["messaging.destination.name"].string_value == env.exchange
    assert attrs["messaging.rabbitmq.destination.routing_key"].string_value == "order.OrderPlaced"
    assert attrs["cdc_relay.source.lsn"].string_value == got[row[0]].body["source"]["lsn"]
    assert attrs["cdc_relay.source.txid"].int_value == got[row[0]].body["source"]["txid"]
    events = [e.name for e in span.events]
    assert events == ["broker.confirm", "checkpoint.flush"]
    # the consumer continues the same trace, as a child of the relay's span
    header = got[row[0]].headers["traceparent"]
    _, trace_id, span_id, _ = header.split("-")
    assert trace_id == TRACE_ID
    assert span_id == span.span_id.hex()
    other = by_id[got[next(k for k in got if k != row[0])].message_id]
    assert other.trace_id.hex() != TRACE_ID
    assert len(other.parent_span_id) == 0
    assert relay.terminate() == 0


def test_metrics_move_as_events_flow_and_probes_answer(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    port = relay.http_port()
    assert _get(port, "/readyz")[0] == 200
    assert _get(port, "/healthz")[0] == 200
    _, before = _get(port, "/metrics")
    assert _metric(before, "cdc_relay_events_published_total") == 0
    with env.sql() as conn, conn.transaction():
        insert_events(conn, [outbox_row(f"M{i % 3}", i) for i in range(40)])
    got = env.consume(40)
    env.wait_for(
        lambda: _metric(_get(port, "/metrics")[1], "cdc_relay_events_confirmed_total") == 40,
        what="confirmed counter",
    )
    _, text = _get(port, "/metrics")
    assert _metric(text, "cdc_relay_events_published_total") == 40
    assert _metric(text, "cdc_relay_in_flight") == 0
    assert _metric(text, "cdc_relay_commit_to_confirm_seconds_count") >= 1
    assert _metric(text, "cdc_relay_confirm_latency_seconds_count") >= 1
    assert _metric(text, "cdc_relay_streaming") == 1
    assert 0 <= _metric(text, "cdc_relay_last_status_update_age_seconds") < 5
    assert _metric(text, "cdc_relay_propagation_alert") == 0
    lag = _lag_once_confirmed(
        env, got, lambda: _metric(_get(port, "/metrics")[1], "cdc_relay_replication_lag_bytes")
    )
    print(f"lag once confirmed: {lag:.0f}")
    assert 'cdc_relay_reconnects_total{side="postgres"' in text
    assert _get(port, "/nope")[0] == 404
    assert relay.terminate() == 0


def test_healthz_fails_while_the_loop_is_wedged_and_recovers(env: Env) -> None:
    """The wedge (6 s asleep inside the event loop) must show as a stale loop tick, not merely
    as "nothing happened lately": a quiet relay can fail on progress_age alone (review 4.1)."""
    env.init()
    timeout = 3.0
    relay = env.start_relay_with_env(
        {"CDC_RELAY_FAILPOINTS": "loop.wedge=6"},
        health_timeout=str(timeout),
        status_interval="1",
    )
    port = relay.http_port()
    seen: list[tuple[int, dict[str, Any]]] = []
    wedged: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        code, body = _get(port, "/healthz")
        seen.append((code, json.loads(body)))
        if code == 503 and seen[-1][1]["loop_tick_age_s"] > timeout:
            wedged.append(seen[-1][1])
        if wedged and code == 200:
            break
        time.sleep(0.25)
    codes = [code for code, _ in seen]
    assert wedged, f"a wedged loop must fail /healthz with a stale loop tick: {seen}"
    worst = max(wedged, key=lambda b: float(b["loop_tick_age_s"]))
    assert worst["status"] == "failing"
    assert worst["timeout_s"] == timeout
    # the loop really stood still for most of the wedge, not just past the timeout
    assert worst["loop_tick_age_s"] > 4.5, worst
    assert codes[-1] == 200, f"after the wedge /healthz must recover: {seen}"
    _code, body = _get(port, "/healthz")
    ok = json.loads(body)
    assert ok["status"] == "ok"
    assert ok["loop_tick_age_s"] < timeout
    assert relay.terminate() == 0


def test_replication_lag_bytes_cover_unconfirmed_wal_and_clear_once_confirmed(env: Env) -> None:
    """``cdc_relay_replication_lag_bytes`` is the server's WAL end minus the relay's confirmed
    flush. With the broker blocked, the relay reads a transaction but cannot confirm it, so the
    gauge must cover that transaction's WAL and stay within what the server itself reports;
    once the broker confirms, it returns to 0."""
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    port = relay.http_port()

    def lag() -> float:
        return _metric(_get(port, "/metrics")[1], "cdc_relay_replication_lag_bytes")

    with env.sql() as conn, conn.transaction():
        insert_events(conn, [outbox_row("LAG-0", 0)])
    env.consume(1)
    env.wait_for(lambda: lag() == 0, timeout=15, what="no lag before the test")
    flushed_before = env.slot_flush()
    env.rabbit.block_publishers()
    try:
        time.sleep(0.5)
        wal_before = env.current_lsn()
        # random padding: jsonb would compress a repeated string to almost nothing
        pad = [os.urandom(1000).hex() for _ in range(20)]
        rows = [outbox_row("LAG", i, payload={"seq": i, "pad": pad[i]}) for i in range(20)]
        with env.sql() as conn, conn.transaction():
            insert_events(conn, rows)
        written_to = env.current_lsn()
        events_wal = written_to - wal_before
        assert events_wal > 40_000
        # a few background WAL records (running xacts) may land around the transaction
        env.wait_for(
            lambda: lag() >= events_wal - 8192,
            timeout=20,
            what=f"lag to cover the unconfirmed transaction ({events_wal} bytes of WAL)",
        )
        time.sleep(1.5)  # status updates go on while blocked: the lag must not shrink
        during = lag()
        assert during >= events_wal - 8192
        # the relay's WAL end is at most the server's, its confirmed flush at least what the
        # slot had before: the gauge can never exceed the server-side difference
        assert during <= env.current_lsn() - flushed_before
        assert env.slot_flush() < written_to, "slot advanced past unconfirmed events"
    finally:
        env.rabbit.unblock_publishers()
    got = env.consume(20, timeout=60)
    assert {d.message_id for d in got} == {r[0] for r in rows}
    after = _lag_once_confirmed(env, got, lag)
    print(f"lag while blocked {during:.0f} (events {events_wal}), after confirm {after:.0f}")
    assert relay.terminate() == 0


def test_propagation_alert_fires_once_per_episode(env: Env) -> None:
    env.init()
    relay = env.start_relay(alert_latency="1", status_interval="0.5")
    relay.wait_streaming()
    port = relay.http_port()
    env.rabbit.block_publishers()
    try:
        with env.sql() as conn, conn.transaction():
            insert_events(conn, [outbox_row("SLOW", 0)])
        env.wait_for(
            lambda: _metric(_get(port, "/metrics")[1], "cdc_relay_propagation_alert") == 1,
            timeout=20,
            what="the alert",
        )
        time.sleep(1.5)
    finally:
        env.rabbit.unblock_publishers()
    env.consume(1)
    time.sleep(1.5)
    # the late transaction is confirmed, but the episode lasts until one goes through in time
    assert _metric(_get(port, "/metrics")[1], "cdc_relay_propagation_alert") == 1
    with env.sql() as conn, conn.transaction():
        insert_events(conn, [outbox_row("FAST", 0)])
    env.consume(1)
    env.wait_for(
        lambda: _metric(_get(port, "/metrics")[1], "cdc_relay_propagation_alert") == 0,
        timeout=20,
        what="the alert to clear",
    )
    log = relay.log()
    assert log.count("propagation slower than threshold") == 1
    warning = next(json.loads(x) for x in log.splitlines() if "propagation slower" in x)
    assert warning["level"] == "warning"
    assert warning["threshold_s"] == 1.0
    assert "propagation back within threshold" in log
    assert relay.terminate() == 0
