"""End-to-end: committed outbox rows → pgoutput → cdc-relay → RabbitMQ, checked by a consumer."""

from __future__ import annotations

import json
import random
import signal
import time
import urllib.request
import uuid

import pytest

from cdc_relay.lsn import Lsn
from tests.faults.checks import verify
from tests.integration.harness import (
    Env,
    Flood,
    assert_per_aggregate_order,
    insert_events,
    outbox_row,
)

pytestmark = pytest.mark.integration


def test_mixed_transactions_arrive_once_in_per_aggregate_order(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    rng = random.Random(7)
    seq: dict[str, int] = {}
    expected: list[str] = []
    with env.sql() as conn:
        for _ in range(120):
            size = rng.choice([1, 1, 2, 5, 20, 100])
            rows = []
            for _ in range(size):
                agg = f"ORD-{rng.randrange(15)}"
                seq[agg] = seq.get(agg, -1) + 1
                rows.append(outbox_row(agg, seq[agg]))
            with conn.transaction():
                insert_events(conn, rows)
            expected.extend(r[0] for r in rows)
        after_last_commit = env.current_lsn()
    got = env.consume(len(expected))
    ids = [d.message_id for d in got]
    assert len(ids) == len(set(ids)), "a graceful run must not duplicate"
    assert set(ids) == set(expected)
    assert_per_aggregate_order(got)
    last_commit = max(int(Lsn.parse(d.body["source"]["commit_lsn"])) for d in got)
    assert last_commit < after_last_commit
    assert relay.terminate() == 0
    # after a graceful stop the slot sits at or past the last event's commit: a restart
    # starts after it and replays nothing
    flushed = env.slot_flush()
    assert flushed >= after_last_commit, (
        f"slot at {Lsn(flushed)}, last commit before {Lsn(after_last_commit)}"
    )


def test_envelope_matches_the_contract(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    event_id = str(uuid.uuid4())
    with env.sql() as conn, conn.transaction():
        conn.execute("CREATE TABLE IF NOT EXISTS inventory (sku text primary key, qty int)")
        conn.execute("INSERT INTO inventory VALUES ('SKU-1', 10)")
        conn.execute(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, traceparent) "
            "VALUES (%s, 'inventory', 'SKU-1', 'InventoryReserved', "
            '\'{"sku": "SKU-1", "qty": 2, "n": 1.50}\', '
            "'00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01')",
            (event_id,),
        )
        txid_row = conn.execute("SELECT txid_current()").fetchone()
    assert txid_row is not None
    (d,) = env.consume(1)
    body = d.body
    assert body["v"] == 1
    assert body["id"] == event_id
    assert body["aggregate_type"] == "inventory"
    assert body["aggregate_id"] == "SKU-1"
    assert body["type"] == "InventoryReserved"
    # payload embedded as JSON, exactly as jsonb printed it (1.50 stays 1.50)
    assert body["payload"] == {"sku": "SKU-1", "qty": 2, "n": 1.50}
    assert b'"n": 1.50' in d.raw
    assert body["occurred_at"].endswith("Z") or body["occurred_at"].endswith("+00:00")
    assert body["committed_at"]
    src = body["source"]
    assert src["slot"] == env.name
    assert src["database"] == env.dbname
    assert src["txid"] == int(txid_row[0]) % (1 << 32)
    assert "/" in src["lsn"] and "/" in src["commit_lsn"]
    p = d.properties
    assert p.message_id == event_id
    assert p.type == "InventoryReserved"
    assert p.content_type == "application/json"
    assert p.delivery_mode == 2
    assert p.app_id == "cdc-relay"
    assert abs(p.timestamp - time.time()) < 120
    assert d.routing_key == "inventory.InventoryReserved"
    assert d.headers["aggregate_type"] == "inventory"
    assert d.headers["aggregate_id"] == "SKU-1"
    assert d.headers["source_lsn"] == src["lsn"]
    assert d.headers["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert relay.terminate() == 0


def test_only_committed_inserts_into_the_outbox_publish(env: Env) -> None:
    env.init()
    with env.sql() as conn:
        conn.execute("CREATE TABLE shipments (id serial primary key, note text)")
        # put another table into the publication: the relay must ignore its rows itself
        conn.execute(f'ALTER PUBLICATION "{env.name}" ADD TABLE shipments')
    relay = env.start_relay()
    relay.wait_streaming()
    rolled_back = outbox_row("ORD-X", 0)
    deleted_same_tx = outbox_row("ORD-D", 0)
    updated = outbox_row("ORD-U", 0)
    with env.sql() as conn:
        # a rolled-back transaction is never published
        conn.execute("BEGIN")
        insert_events(conn, [rolled_back])
        conn.execute("ROLLBACK")
        # insert-then-delete in one transaction still publishes
        with conn.transaction():
            insert_events(conn, [deleted_same_tx])
            conn.execute("DELETE FROM outbox WHERE id = %s", (deleted_same_tx[0],))
        # an UPDATE of an outbox row publishes nothing (the INSERT did, once)
        with conn.transaction():
            insert_events(conn, [updated])
        conn.execute("UPDATE outbox SET type = 'Changed' WHERE id = %s", (updated[0],))
        conn.execute("DELETE FROM outbox WHERE id = %s", (updated[0],))
        # a non-outbox table publishes nothing
        conn.execute("INSERT INTO shipments (note) SELECT 'x' FROM generate_series(1, 50)")
        marker = outbox_row("ORD-END", 0)
        with conn.transaction():
            insert_events(conn, [marker])
    got = env.consume(3, settle=1.5)
    ids = [d.message_id for d in got]
    assert ids == [deleted_same_tx[0], updated[0], marker[0]]
    assert got[1].body["type"] == "OrderPlaced"
    assert relay.terminate() == 0


def test_null_large_and_non_ascii_payloads(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    big = {"blob": "x" * (2 * 1024 * 1024), "seq": 1}
    text = {"name": "Łódź → 東京 🚚", "note": 'ünïcödé "quoted" \\ back', "seq": 2}
    null_id = str(uuid.uuid4())
    big_row = outbox_row("ORD-BIG", 1, payload=big)
    text_row = outbox_row("ORD-TXT", 2, payload=text)
    with env.sql() as conn:
        with conn.transaction():
            conn.execute(
                "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
                "VALUES (%s, 'order', 'ORD-NULL', 'Empty', NULL)",
                (null_id,),
            )
        with conn.transaction():
            insert_events(conn, [big_row, text_row])
    got = {d.message_id: d for d in env.consume(3, timeout=90)}
    assert got[null_id].body["payload"] is None
    assert b'"payload":null' in got[null_id].raw
    assert got[big_row[0]].body["payload"] == big
    assert got[text_row[0]].body["payload"] == text
    assert relay.terminate() == 0


def _gauge(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exposed")


def test_graceful_restart_sends_nothing_twice(env: Env) -> None:
    """SIGTERM in the middle of a flood, with events published and not yet confirmed (the
    broker is blocked for a moment): the relay finishes the open transaction, waits for the
    confirms and reports exactly that position, so the next run starts right after the last
    event it sent. Nobody consumes until the end, so the queue holds both runs' messages in
    publish order and every duplicate or gap shows."""
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    port = relay.http_port()
    flood = Flood(env, aggregates=10, batch=50, limit=50_000, pause=0.005).start()
    try:
        env.wait_for(lambda: env.queue_depth() >= 500, timeout=60, what="the first run publishing")
        env.rabbit.block_publishers()
        try:
            env.wait_for(lambda: _gauge(port, "cdc_relay_in_flight") > 0, what="unconfirmed events")
            committed_at_stop = len(flood.committed)
            relay.proc.send_signal(signal.SIGTERM)
            time.sleep(1.5)
            assert relay.proc.poll() is None, "the relay must wait for the confirms it owes"
        finally:
            env.rabbit.unblock_publishers()
        assert relay.terminate() == 0
        log = relay.log()
        assert "stopped cleanly" in log, log
        assert "stop timeout" not in log
        first_run = env.queue_depth()
        flushed_at_stop = env.slot_flush()
        # mid-flow: the flood was still writing when the relay stopped, and goes on
        flood.wait_for(committed_at_stop + 500, timeout=60)
        assert len(flood.committed) < flood.limit, "the flood ended before the stop"
        assert 0 < first_run < len(flood.committed)
        assert flushed_at_stop < env.current_lsn()
    finally:
        expected = flood.stop()
    stopping = next(json.loads(x) for x in log.splitlines() if '"stopping: ' in x)
    assert stopping["in_flight"] > 0, stopping
    print(f"stopped with in_flight={stopping['in_flight']}, {first_run} published by run 1")
    relay2 = env.start_relay()
    relay2.wait_streaming()
    got = env.consume(len(expected), timeout=120, settle=1.5)
    verdict = verify(expected, got, forbidden_ids=flood.rolled_back)
    assert verdict.duplicates == 0, f"a graceful stop must not make a restart resend: {verdict}"
    assert len(got) == len(expected)
    # the reported position splits the two runs exactly: run 1 sent every transaction before it,
    # run 2 every transaction after it
    commits = [int(Lsn.parse(d.body["source"]["commit_lsn"])) for d in got]
    assert max(commits[:first_run]) < flushed_at_stop <= min(commits[first_run:])
    assert relay2.terminate() == 0


def test_blocked_broker_holds_the_slot_position(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    with env.sql() as conn, conn.transaction():
        insert_events(conn, [outbox_row("PRE", 0)])
    assert len(env.consume(1)) == 1
    env.wait_for(lambda: env.slot_flush() >= env.current_lsn() - 200_000, what="slot catch-up")
    before = env.slot_flush()
    env.rabbit.block_publishers()
    try:
        time.sleep(0.5)
        ids = []
        with env.sql() as conn:
            for i in range(20):
                row = outbox_row("BLOCKED", i)
                ids.append(row[0])
                with conn.transaction():
                    insert_events(conn, [row])
            end_of_events = env.current_lsn()
        # longer than wal_sender_timeout (10 s): status updates keep the connection alive
        time.sleep(12)
        assert env.slot_flush() < end_of_events, "slot advanced past unconfirmed events"
        assert env.slot_flush() >= before
        assert relay.proc.poll() is None, relay.log()
    finally:
        env.rabbit.unblock_publishers()
    got = env.consume(20, timeout=60)
    assert {d.message_id for d in got} == set(ids)
    env.wait_for(lambda: env.slot_flush() >= end_of_events, what="slot to pass the events")
    assert relay.terminate() == 0


def test_kill_9_mid_flood_loses_nothing(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    expected: list[str] = []
    with env.sql() as conn:
        for batch in range(40):
            rows = [outbox_row(f"K{i % 10}", batch * 100 + i) for i in range(100)]
            with conn.transaction():
                insert_events(conn, rows)
            expected.extend(r[0] for r in rows)
            if batch == 20:
                env.wait_for(lambda: env.queue_depth() > 0, what="first deliveries")
                relay.kill()
                assert relay.proc.returncode == -9
    relay2 = env.start_relay()
    relay2.wait_streaming()
    got = env.consume(len(expected), timeout=120, settle=1.0)
    ids = [d.message_id for d in got]
    assert set(ids) == set(expected), f"lost {len(set(expected) - set(ids))}"
    assert_per_aggregate_order(got)
    # every duplicate is a resend with the same id (at-least-once), never a new id
    assert set(ids) <= set(expected)
    assert relay2.terminate() == 0


def test_idle_outbox_does_not_retain_wal(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    with env.sql() as conn:
        conn.execute("CREATE TABLE busy (id bigserial primary key, data text)")
        env.wait_for(lambda: env.slot_flush() >= env.current_lsn() - 100_000, what="start")
        start_flush = env.slot_flush()
        for _ in range(20):
            conn.execute(
                "INSERT INTO busy (data) SELECT repeat('x', 200) FROM generate_series(1, 2000)"
            )
        written_to = env.current_lsn()
    # another table was written heavily (~10 MB of WAL); the idle relay must keep up via keepalives
    assert written_to - start_flush > 5_000_000
    env.wait_for(
        lambda: env.slot_flush() >= written_to, timeout=40, what="slot to follow an idle outbox"
    )
    assert relay.terminate() == 0


def test_events_written_while_relay_is_down_arrive_after_start(env: Env) -> None:
    env.init()
    rows = [outbox_row("EARLY", i) for i in range(50)]
    with env.sql() as conn, conn.transaction():
        insert_events(conn, rows)
    relay = env.start_relay()
    got = env.consume(50)
    assert [d.message_id for d in got] == [r[0] for r in rows]
    assert [d.body["payload"] for d in got] == [json.loads(r[4] or "null") for r in rows]
    assert [d.body["payload"]["seq"] for d in got] == list(range(50))
    assert relay.terminate() == 0


def test_full_window_keeps_the_walsender_alive_whatever_the_status_interval(env: Env) -> None:
    """Reading pauses when the window is full, so reply requests go unseen: the relay must
    still report often enough for wal_sender_timeout (10 s here), even with a 30 s interval."""
    env.init()
    relay = env.start_relay(max_in_flight="10", status_interval="30")
    relay.wait_streaming()
    env.rabbit.block_publishers()
    try:
        with env.sql() as conn, conn.transaction():
            insert_events(conn, [outbox_row(f"W{i % 3}", i) for i in range(200)])
        time.sleep(14)
        assert "retrying" not in relay.log(), relay.log()
        with env.sql() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'cdc-relay'"
            ).fetchone()
        assert row == (1,)
    finally:
        env.rabbit.unblock_publishers()
    got = env.consume(200, timeout=60)
    assert len({d.message_id for d in got}) == 200
    assert len(got) == 200, "no replay, so no duplicates"
    assert relay.terminate() == 0
