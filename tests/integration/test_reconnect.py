"""The relay survives either connection being cut and resumes from the slot in-process."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.integration.harness import Env, assert_per_aggregate_order, insert_events, outbox_row

pytestmark = pytest.mark.integration


def _write(env: Env, prefix: str, batches: int, per: int, start: int = 0) -> list[str]:
    ids: list[str] = []
    with env.sql() as conn:
        for b in range(batches):
            rows = [outbox_row(f"{prefix}{i % 4}", start + b * per + i) for i in range(per)]
            with conn.transaction():
                insert_events(conn, rows)
            ids.extend(r[0] for r in rows)
    return ids


def test_walsender_terminated_then_resumed(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    ids = _write(env, "P", 10, 50)
    with env.sql() as conn:
        env.wait_for(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'cdc-relay'"
                ).fetchone()
                == (1,)
            ),
            what="walsender",
        )
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (env.name,),
        )
    ids += _write(env, "P", 10, 50, start=500)
    got = env.consume(len(ids), timeout=60, settle=1.0)
    assert {d.message_id for d in got} == set(ids)
    assert_per_aggregate_order(got)
    assert "retrying after failure" in relay.log()
    assert relay.proc.poll() is None
    assert relay.terminate() == 0


def test_broker_connection_closed_then_resumed(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    ids = _write(env, "Q", 5, 50)
    env.consume(len(ids))
    listing = env.rabbit.ctl("list_connections", "pid", "client_properties", "--no-table-headers")
    pids = [line.split()[0] for line in listing.splitlines() if "cdc-relay" in line]
    assert pids, listing
    for pid in pids:
        env.rabbit.ctl("close_connection", pid, "test cuts the relay's connection")
    more = _write(env, "Q", 5, 50, start=250)
    got = env.consume(len(more), timeout=60, settle=1.0)
    assert set(more) <= {d.message_id for d in got}
    assert_per_aggregate_order(got)
    deadline = time.monotonic() + 10
    while "retrying after failure" not in relay.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "CONNECTION_FORCED" in relay.log()
    assert relay.log().count('"msg": "streaming"') >= 2
    assert relay.terminate() == 0


def _walsender_pid(env: Env) -> int:
    with env.sql() as conn:
        row = conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (env.name,)
        ).fetchone()
    assert row is not None and row[0] is not None, "no walsender holds the slot"
    return int(row[0])


def test_half_open_replication_connection_is_detected_by_reply_requests(env: Env) -> None:
    """A walsender that stops answering (SIGSTOP: the socket stays open, nothing comes back) is
    a half-open connection; the relay's reply requests expose it within replication_timeout."""
    env.init()
    relay = env.start_relay(replication_timeout="3", status_interval="10")
    relay.wait_streaming()
    ids = _write(env, "H", 2, 20)
    env.consume(len(ids))
    stopped = _walsender_pid(env)
    os.kill(stopped, signal.SIGSTOP)
    try:
        env.wait_for(
            lambda: "presumed lost" in relay.log(), timeout=20, what="the silence to be noticed"
        )
    finally:
        os.kill(stopped, signal.SIGCONT)
    more = _write(env, "H", 2, 20, start=40)
    got = env.consume(len(more), timeout=60, settle=1.0)
    assert set(more) <= {d.message_id for d in got}
    assert relay.proc.poll() is None
    assert relay.terminate() == 0


def test_walsender_terminated_at_start_replication_is_retried(env: Env) -> None:
    """A server that goes away while START_REPLICATION is answered (restart, failover,
    pg_terminate_backend) is a lost connection, not a setup error that exits."""
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    for _ in range(3):  # terminate whatever walsender holds (or is about to hold) the slot
        with env.sql() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE backend_type = 'walsender' AND datname = %s",
                (env.dbname,),
            )
        time.sleep(0.3)
    ids = _write(env, "T", 2, 10)
    got = env.consume(len(ids), timeout=60, settle=1.0)
    assert set(ids) <= {d.message_id for d in got}
    assert relay.proc.poll() is None, relay.log()
    assert relay.terminate() == 0
