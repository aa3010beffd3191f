"""`cdc-relay prune`: old outbox rows go in short batches; no event is ever lost to a prune."""

from __future__ import annotations

import datetime as dt

import pytest

from cdc_relay import config, retention
from tests.faults.checks import verify
from tests.integration.harness import Env, Flood, insert_events, outbox_row

pytestmark = pytest.mark.integration


def _rows(env: Env) -> int:
    with env.sql() as conn:
        row = conn.execute("SELECT count(*) FROM outbox").fetchone()
    assert row is not None
    return int(row[0])


def test_pruning_aggressively_during_a_flood_loses_no_event(env: Env) -> None:
    """Every committed row is deleted moments after its commit, again and again, while the
    relay streams: the relay reads the WAL, so every event still arrives, exactly once."""
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    cfg = config.load(env=env.relay_env())
    flood = Flood(env, aggregates=10, batch=50, limit=6_000, pause=0.01).start()
    prunes = deleted = 0
    try:
        while len(flood.committed) < flood.limit and prunes < 2_000:
            (done,) = retention.prune(cfg, dt.timedelta(0), batch=40)
            deleted += done.rows
            prunes += 1
    finally:
        expected = flood.stop()
    assert prunes >= 20 and deleted > len(expected) // 2, (prunes, deleted)
    got = env.consume(len(expected), timeout=120, settle=1.0)
    verdict = verify(expected, got, forbidden_ids=flood.rolled_back)
    assert verdict.duplicates == 0, verdict
    assert relay.terminate() == 0
    print(f"{prunes} prunes deleted {deleted} rows; {verdict}")


def test_prune_deletes_only_rows_older_than_the_cutoff_in_batches(env: Env) -> None:
    env.init()
    with env.sql() as conn, conn.transaction():
        insert_events(conn, [outbox_row("OLD", i) for i in range(25)])
        conn.execute("UPDATE outbox SET created_at = now() - interval '8 days'")
        insert_events(conn, [outbox_row("NEW", i) for i in range(5)])
        conn.execute(
            "UPDATE outbox SET created_at = now() - interval '6 days' WHERE aggregateid = 'NEW'"
        )
    dry = env.cli("prune", "--older-than", "7d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "public.outbox: would delete 25 rows with created_at before" in dry.stdout
    assert _rows(env) == 30, "a dry run deletes nothing"
    out = env.cli("prune", "--older-than", "1w", "--batch", "10")
    assert out.returncode == 0, out.stderr
    assert "public.outbox: deleted 25 rows with created_at before" in out.stdout
    assert "(3 batches)" in out.stdout
    with env.sql() as conn:
        left = {r[0] for r in conn.execute("SELECT DISTINCT aggregateid FROM outbox")}
    assert left == {"NEW"} and _rows(env) == 5


def test_prune_says_what_is_wrong_in_one_line(env: Env) -> None:
    env.init()
    bad = env.cli("prune", "--older-than", "a week")
    assert bad.returncode == 2
    assert "older_than: not a duration (expected e.g. 7d, 12h, 90m, 30s or 1d12h)" in bad.stderr
    with env.sql() as conn:
        conn.execute("ALTER TABLE outbox RENAME COLUMN created_at TO made")
    out = env.cli("prune", "--older-than", "7d")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "has no created_at column: prune needs the row's creation time" in out.stderr
    renamed = env.cli("prune", "--older-than", "7d", env=env.relay_env(column_created_at="made"))
    assert renamed.returncode == 0, renamed.stderr
    assert "public.outbox: deleted 0 rows with made before" in renamed.stdout


def test_retained_rows_come_back_through_recover_after_the_slot_vanished(env: Env) -> None:
    """The runbook's promoted-replica case: the slot is gone, `run` refuses and suggests a
    time, `recover` re-sends the retained rows through a new slot with their ids, in the order
    they were written."""
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    rows = [outbox_row(f"R-{i % 2}", i // 2) for i in range(6)]
    with env.sql() as conn, conn.transaction():
        insert_events(conn, rows)
    first = [d.message_id for d in env.consume(6, settle=0.5)]
    assert relay.terminate() == 0
    with env.sql() as conn:  # the slot is lost, as on a promoted replica before PostgreSQL 17
        conn.execute("SELECT pg_drop_replication_slot(%s)", (env.name,))
    refused = env.start_relay()
    assert refused.proc.wait(60) == 1
    assert "existed and is gone" in refused.log()
    assert "Suggested: --since " in refused.log()
    out = env.cli("recover", "--since", "1h")
    assert out.returncode == 0, out.stderr
    assert "backfilled 6 rows" in out.stdout
    relay = env.start_relay()
    relay.wait_streaming()
    again = [d.message_id for d in env.consume(6, settle=1.0)]
    # the same events and ids, in the order they were inserted (created_at ticks per row)
    assert again == first
    assert relay.terminate() == 0
