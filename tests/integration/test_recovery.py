"""Backfill, lost-slot recovery and replay against the real servers, judged by an independent
consumer: lost = 0, duplicates only with the same id (and none where no crash happened)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from cdc_relay import backfill, catalog
from cdc_relay.lsn import Lsn
from tests.faults.checks import verify
from tests.integration.harness import (
    Delivery,
    Env,
    Flood,
    assert_per_aggregate_order,
    insert_events,
    outbox_row,
)

pytestmark = pytest.mark.integration


def _create_outbox(env: Env) -> None:
    """The outbox without publication or slot, created_at ticking per row (so rows written in
    one transaction keep their order in a backfill, which orders by created_at, then id)."""
    with env.sql() as conn:
        conn.execute(catalog.outbox_ddl().encode())
        conn.execute("ALTER TABLE outbox ALTER created_at SET DEFAULT clock_timestamp()")
    env.bind_queue()


def _prefill(env: Env, rows: int, aggregates: int) -> list[str]:
    """``rows`` events over ``aggregates`` aggregates PRE-n, seq ascending per aggregate."""
    with env.sql() as conn:
        for start in range(0, rows, 10_000):
            conn.execute(
                "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
                "SELECT gen_random_uuid(), 'order', 'PRE-' || i %% a, 'OrderPlaced', "
                "jsonb_build_object('seq', i / a, 'aggregate', 'PRE-' || i %% a) "
                "FROM generate_series(%(lo)s::int, %(hi)s::int) AS i, CAST(%(a)s AS int) AS a",
                {"a": aggregates, "lo": start, "hi": min(rows, start + 10_000) - 1},
            )
        return [str(r[0]) for r in conn.execute("SELECT id FROM outbox ORDER BY created_at")]


def _pending(env: Env) -> backfill.Pending | None:
    with env.sql() as conn:
        comment = conn.execute(
            "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = %s",
            (env.name,),
        ).fetchone()
    return backfill.parse_pending(comment[0] if comment else None).get(env.name)


def _ok(env: Env, *args: str, **overrides: str) -> str:
    out = env.cli(*args, env=env.relay_env(**overrides), timeout=300)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    return out.stdout


def test_backfill_then_stream_sends_every_row_exactly_once(env: Env) -> None:
    """Rows before the slot come from its snapshot, rows after from the slot, while writers
    keep committing throughout: nothing lost, nothing twice (no crash happened)."""
    _create_outbox(env)
    before = _prefill(env, 5_000, 10)
    flood = Flood(env, aggregates=10, batch=20, limit=3_000, pause=0.005).start()
    flood.wait_for(200)
    out = _ok(env, "init", "--backfill")
    assert f"created publication {env.name}" in out
    assert f"created slot {env.name} at " in out and "with an exported snapshot" in out
    assert "backfilled " in out
    backfilled = int(out.split("backfilled ", 1)[1].split()[0])
    relay = env.start_relay()
    relay.wait_streaming()
    expected = before + flood.stop()
    got = env.consume(len(expected), timeout=120, settle=1.0)
    verdict = verify(expected, got, forbidden_ids=flood.rolled_back)
    assert verdict.duplicates == 0, verdict
    assert_per_aggregate_order(got)
    snapshot = [d for d in got if d.body["source"].get("snapshot")]
    streamed = [d for d in got if "snapshot" not in d.body["source"]]
    assert len(snapshot) == backfilled >= len(before)
    assert set(before) <= {d.message_id for d in snapshot}
    assert len(streamed) == len(expected) - backfilled > 0
    consistent = {d.body["source"]["commit_lsn"] for d in snapshot}
    assert len(consistent) == 1 and {d.body["source"]["lsn"] for d in snapshot} == consistent
    # every streamed event committed after the snapshot's position
    point = Lsn.parse(consistent.pop())
    assert all(Lsn.parse(d.body["source"]["commit_lsn"]) > point for d in streamed)
    assert _pending(env) is None
    again = _ok(env, "init", "--backfill")
    assert f"nothing to backfill: slot {env.name} exists" in again
    assert relay.terminate() == 0
    print(f"backfilled {backfilled}, streamed {len(streamed)}; {verdict}")


def test_kill_9_in_the_middle_of_a_100k_row_backfill_loses_nothing(env: Env) -> None:
    """`run` with create_slot and backfill, killed -9 mid-backfill while writers go on; the
    restarted relay continues after the last confirmed row and then streams."""
    _create_outbox(env)
    before = _prefill(env, 100_000, 50)
    relay = env.start_relay(create_slot="true", backfill="true", max_in_flight="1000")
    env.wait_for(
        lambda: (p := _pending(env)) is not None and p.rows >= 20_000,
        timeout=120,
        what="a backfill checkpoint past 20k rows",
    )
    relay.kill()
    killed_at = _pending(env)
    assert killed_at is not None and killed_at.at is not None and killed_at.after is not None
    assert 20_000 <= killed_at.rows < len(before), killed_at
    flood = Flood(env, aggregates=10, batch=20, limit=2_000, pause=0.005).start()
    flood.wait_for(300)
    again = env.start_relay(create_slot="true", backfill="true")
    again.wait_streaming(timeout=180)
    assert "continuing backfill" in again.log()
    expected = before + flood.stop()
    got = env.consume(len(expected), timeout=300, settle=2.0)
    verdict = verify(expected, got, forbidden_ids=flood.rolled_back)
    assert_per_aggregate_order(got)
    assert _pending(env) is None
    assert again.terminate() == 0
    print(f"killed at {killed_at.rows} confirmed rows; {verdict}")


def test_sigterm_during_a_backfill_stops_cleanly_and_init_continues(env: Env) -> None:
    _create_outbox(env)
    before = _prefill(env, 30_000, 10)
    relay = env.start_relay(create_slot="true", backfill="true", max_in_flight="200")
    env.wait_for(
        lambda: (p := _pending(env)) is not None and p.rows > 0,
        timeout=60,
        what="a backfill checkpoint",
    )
    assert relay.terminate() == 0, relay.log()
    stopped = _pending(env)
    assert stopped is not None and 0 < stopped.rows < len(before), stopped
    refused = env.cli("prune", "--older-than", "0s")
    assert refused.returncode == 1
    assert f"a backfill of slot {env.name} is pending" in refused.stderr
    out = _ok(env, "init", "--backfill")
    assert "backfilled " in out
    assert _pending(env) is None
    relay = env.start_relay()
    relay.wait_streaming()
    with env.sql() as conn:
        insert_events(conn, [outbox_row("AFTER", i) for i in range(10)])
        after = [
            str(r[0]) for r in conn.execute("SELECT id FROM outbox WHERE aggregateid = 'AFTER'")
        ]
    got = env.consume(len(before) + 10, timeout=120, settle=1.0)
    verdict = verify(before + after, got)
    assert_per_aggregate_order(got)
    assert relay.terminate() == 0
    print(f"stopped at {stopped.rows}; {verdict}")


def _rows_of(env: Env, aggregate: str) -> list[str]:
    with env.sql() as conn:
        return [
            str(r[0])
            for r in conn.execute(
                "SELECT id FROM outbox WHERE aggregateid = %s ORDER BY created_at", (aggregate,)
            )
        ]


def _comment(env: Env) -> str | None:
    with env.sql() as conn:
        row = conn.execute(
            "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = %s",
            (env.name,),
        ).fetchone()
    return None if row is None else row[0]


def test_recover_after_a_real_slot_invalidation_loses_nothing(env: Env) -> None:
    """The slot is invalidated for real while events wait in its WAL; `recover` at the time it
    suggests (from the confirmed commit the relay recorded) brings every one of them back."""
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    with env.sql() as conn:
        insert_events(conn, [outbox_row("EARLY", i) for i in range(50)])
    early = _rows_of(env, "EARLY")
    assert len(env.consume(50, timeout=60)) == 50
    env.wait_for(
        lambda: env.name in catalog.parse_confirmed(_comment(env)),
        what="the relay to record its confirmed commit",
    )
    assert relay.terminate() == 0
    with env.sql() as conn:
        for i in range(30):  # committed while the relay is down: only the slot has them
            insert_events(conn, [outbox_row(f"LOST-{i % 3}", i // 3)])
    lost_ids = [i for a in ("LOST-0", "LOST-1", "LOST-2") for i in _rows_of(env, a)]
    env.invalidate_slot()
    refused = env.start_relay()
    assert refused.proc.wait(30) == 1
    assert "is invalidated (wal_status = lost)" in refused.log()
    assert "cdc-relay recover --since TIMESTAMP" in refused.log()
    assert "Suggested: --since " in refused.log()
    ask = env.cli("recover")
    assert ask.returncode == 2, ask.stderr
    assert "before the last commit the relay recorded as confirmed" in ask.stderr
    since = ask.stderr.split("suggested: --since ", 1)[1].split()[0]
    out = _ok(env, "recover", "--since", since)
    assert f"dropped invalidated slot {env.name}" in out
    # the suggestion reaches back before the recorded commit: the EARLY rows come again too
    assert "backfilled 80 rows" in out, out
    relay = env.start_relay()
    relay.wait_streaming()
    with env.sql() as conn:
        insert_events(conn, [outbox_row("LATE", i) for i in range(20)])
    expected = early + lost_ids + _rows_of(env, "LATE")
    got = env.consume(len(expected), timeout=60, settle=1.0)
    verdict = verify(expected, got)
    assert verdict.duplicates == 0, verdict
    assert_per_aggregate_order(got)
    assert relay.terminate() == 0
    print(f"recovered {len(lost_ids)} events of an invalidated slot; {verdict}")


def _purge(env: Env) -> None:
    with env.channel() as ch:
        ch.queue_purge(env.queue)


def _same_event(replayed: Delivery, original: Delivery) -> None:
    assert replayed.message_id == original.message_id
    assert replayed.routing_key == original.routing_key
    assert replayed.properties.type == original.properties.type
    assert replayed.properties.timestamp is not None
    replay_id = replayed.headers.pop("x-cdc-relay-replay")
    assert isinstance(replay_id, str | bytes) and replay_id
    assert {k: v for k, v in replayed.headers.items() if k != "source_lsn"} == {
        k: v for k, v in original.headers.items() if k != "source_lsn"
    }
    a = {k: v for k, v in replayed.body.items() if k not in ("source", "committed_at")}
    b = {k: v for k, v in original.body.items() if k not in ("source", "committed_at")}
    assert a == b
    source = replayed.body["source"]
    assert source["snapshot"] is True and source["lsn"] == source["commit_lsn"] == "0/0"
    assert source["txid"] == original.body["source"]["txid"]


def test_replay_resends_selected_rows_as_the_same_events(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    with env.sql() as conn:
        for i in range(10):
            insert_events(conn, [outbox_row(f"R-{a}", i) for a in range(3)])
        conn.execute(
            "UPDATE outbox SET created_at = now() - interval '2 hours' WHERE aggregateid = 'R-2'"
        )
    originals = {d.message_id: d for d in env.consume(30, timeout=60)}
    assert len(originals) == 30
    _purge(env)

    dry = _ok(env, "replay", "--aggregate-id", "R-1", "--dry-run")
    assert "would replay 10 rows (aggregate id 'R-1')" in dry
    assert env.queue_depth() == 0
    out = _ok(env, "replay", "--aggregate-type", "order", "--aggregate-id", "R-1")
    assert "10 of 10 rows confirmed" in out
    got = env.consume(10, timeout=30)
    assert [d.body["payload"]["seq"] for d in got] == list(range(10))
    for d in got:
        _same_event(d, originals[d.message_id])

    ids = [d.message_id for d in got[:3]]
    listed = env.tmp / "ids.txt"
    listed.write_text("\n".join(ids) + "\n\n")
    out = _ok(env, "replay", "--ids", str(listed))
    assert "3 of 3 rows confirmed" in out
    assert [d.message_id for d in env.consume(3, timeout=30)] == ids

    hour_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    old = _ok(env, "replay", "--until", hour_ago)
    assert "10 of 10 rows confirmed" in old
    assert {d.body["aggregate_id"] for d in env.consume(10, timeout=30)} == {"R-2"}
    recent = _ok(env, "replay", "--since", "1h")
    assert "20 of 20 rows confirmed" in recent
    assert len(env.consume(20, timeout=30)) == 20

    none = env.cli("replay")
    assert none.returncode == 2 and "say which rows" in none.stderr
    # a broker that refuses: exit 1, with how many were confirmed
    refused = env.cli(
        "replay",
        "--all",
        env=env.relay_env(exchange="no-such-exchange", declare_exchange="false"),
    )
    assert refused.returncode == 1, refused.stdout
    assert "0 of 30 rows confirmed" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert relay.terminate() == 0


def test_a_backfill_needs_to_record_its_progress(env: Env) -> None:
    """A role that may not write the publication's comment cannot backfill: without the record
    a crash would let `run` stream past rows it had not sent. The refusal leaves no slot."""
    _create_outbox(env)
    with env.sql() as conn:
        conn.execute(f"CREATE PUBLICATION {env.name} FOR TABLE outbox".encode())
        role = f"r_{env.name[-20:]}"
        conn.execute(f"DROP ROLE IF EXISTS {role}".encode())
        conn.execute(f"CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'pw'".encode())
        conn.execute(f"GRANT SELECT ON outbox TO {role}".encode())
    try:
        dsn = env.dsn.replace("postgres:sandbox-pw@", f"{role}:pw@")
        out = env.cli("init", "--backfill", env=env.relay_env(pg_dsn=dsn))
        assert out.returncode == 1, out.stdout
        assert "cannot record the backfill's progress in the comment of publication" in out.stderr
        with env.sql() as conn:
            slots = conn.execute(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (env.name,)
            ).fetchone()
        assert slots == (0,)
    finally:
        with env.sql() as conn:
            conn.execute(f"DROP OWNED BY {role}".encode())
            conn.execute(f"DROP ROLE {role}".encode())


def test_a_hostile_row_in_a_backfill_follows_the_invalid_event_policy(env: Env) -> None:
    """The same refusals as the stream: halt names the row and keeps the record (nothing
    before it is sent again needlessly); dead_letter diverts it whole and the backfill ends."""
    _create_outbox(env)
    good = _prefill(env, 300, 3)
    with env.sql() as conn:
        conn.execute(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, headers) "
            "VALUES (gen_random_uuid(), 'order', 'BAD', 'OrderPlaced', '{}', '{\"CC\": \"x\"}')"
        )
        insert_events(conn, [outbox_row("LATER", i) for i in range(5)])
    later = _rows_of(env, "LATER")
    halted = env.cli("init", "--backfill")
    assert halted.returncode == 1, halted.stdout
    assert "header key 'CC' is reserved" in halted.stderr
    assert "fix or delete it in the outbox table and run again" in halted.stderr
    assert "Traceback" not in halted.stderr
    waiting = _pending(env)
    assert waiting is not None and waiting.at is not None
    dlx, dlq = f"{env.exchange}.dlx", f"{env.queue}.dlq"
    with env.channel() as ch:
        ch.exchange_declare(dlx, "fanout", durable=True)
        ch.queue_declare(dlq, durable=True)
        ch.queue_bind(dlq, dlx)
    out = _ok(
        env,
        "init",
        "--backfill",
        invalid_event_policy="dead_letter",
        dead_letter_exchange=dlx,
    )
    assert "backfilled " in out
    assert _pending(env) is None
    got = env.consume(len(good) + len(later), timeout=60, settle=1.0)
    verify(good + later, got)
    with env.channel() as ch:
        method, props, body = ch.basic_get(dlq, auto_ack=True)
    assert method is not None, "the invalid row was not dead-lettered"
    assert props.type == "cdc-relay.invalid_event"
    dead = json.loads(body)
    assert dead["row"]["aggregateid"] == "BAD" and "reserved" in dead["reason"]
