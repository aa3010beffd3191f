"""The relay survives either connection being cut and resumes from the slot in-process."""

from __future__ import annotations

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
