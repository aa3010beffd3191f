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


def test_a_node_of_amqp_url_that_does_not_answer_is_skipped_and_named(env: Env) -> None:
    """amqp_url lists a node that refuses connections before the real one: the relay warns
    about that node (no password), streams through the next, and /readyz names the node in
    use."""
    import json
    import socket
    import urllib.request

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    real = env.rabbit.amqp_url
    env.init()
    relay = env.start_relay(amqp_url=f"amqp://guest:s3cret@127.0.0.1:{dead}/%2F, {real}")
    relay.wait_streaming()
    ids = _write(env, "N", 4, 25)
    got = env.consume(len(ids), timeout=60, settle=0.5)
    assert {d.message_id for d in got} == set(ids)
    log = relay.log()
    skipped = [
        json.loads(line)
        for line in log.splitlines()
        if '"cannot connect to a RabbitMQ node; trying the next"' in line
    ]
    assert skipped and skipped[0]["broker"] == f"amqp://127.0.0.1:{dead}//", log
    assert "s3cret" not in log
    port = next(
        json.loads(line)["port"] for line in log.splitlines() if "http endpoints listening" in line
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
        ready = json.loads(resp.read())
    assert ready["broker"] == f"amqp://127.0.0.1:{env.rabbit.port}//"
    assert relay.terminate() == 0


def test_the_unroutable_queue_is_quorum_and_an_existing_classic_one_is_used_as_it_is(
    env: Env,
) -> None:
    """A fresh `<exchange>.unroutable` is declared as a quorum queue (replicated on a cluster);
    one left classic by an earlier version is used as it is, with a warning, and still keeps
    the events no binding matches."""
    import json

    unroutable = f"{env.exchange}.unroutable"
    other = f"{env.exchange}x"
    with env.channel() as ch:
        ch.queue_declare(unroutable, durable=True)  # classic, as before quorum was the default
    env.init()
    with env.channel() as ch:  # only "order.*" is bound: a "stray" event matches nothing
        ch.queue_unbind(env.queue, env.exchange, "#")
        ch.queue_bind(env.queue, env.exchange, "order.#")
    relay = env.start_relay()
    relay.wait_streaming()
    assert "the unroutable queue exists with another queue type" in relay.log()
    routed = outbox_row("K", 0)
    stray = ("00000000-0000-4000-8000-0000000000aa", "stray", "S", "Lost", json.dumps({"n": 1}))
    with env.sql() as conn:
        insert_events(conn, [routed, stray])
    got = env.consume(1, timeout=30, settle=0.5)
    assert [d.message_id for d in got] == [routed[0]]
    env.wait_for(
        lambda: (
            int(
                env.rabbit.ctl("list_queues", "-q", "--no-table-headers", "name", "messages")
                .split(unroutable, 1)[1]
                .split()[0]
            )
            == 1
        ),
        timeout=30,
        what="the stray event kept in the classic unroutable queue",
    )
    assert relay.terminate() == 0
    fresh = env.start_relay(exchange=other)
    fresh.wait_streaming()
    assert fresh.terminate() == 0
    types = env.rabbit.ctl("list_queues", "-q", "--no-table-headers", "name", "type")
    kinds = dict(line.split() for line in types.splitlines() if line.strip())
    assert kinds[unroutable] == "classic" and kinds[f"{other}.unroutable"] == "quorum"
