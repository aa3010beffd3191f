"""The broker says no: full queues, unroutable events, messages too large to ever accept."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.faults.checks import verify
from tests.integration.harness import Env, insert_events, outbox_row

pytestmark = pytest.mark.integration


def _write(env: Env, rows: list[tuple[str, str, str, str, str | None]]) -> list[str]:
    with env.sql() as conn, conn.transaction():
        insert_events(conn, rows)
    return [r[0] for r in rows]


@contextmanager
def broker_max_message_size(env: Env, size: int) -> Iterator[None]:
    """Lower the node's max_message_size (new channels read it); always restored."""
    env.rabbit.ctl("eval", f"application:set_env(rabbit, max_message_size, {size}).")
    try:
        yield
    finally:
        env.rabbit.ctl("eval", "application:set_env(rabbit, max_message_size, 134217728).")


def test_unroutable_events_are_kept_in_the_alternate_exchange(env: Env) -> None:
    assert env.cli("init", "--create-outbox").returncode == 0
    relay = env.start_relay()  # the relay declares the exchange and its alternate exchange
    relay.wait_streaming()
    with env.channel() as ch:
        ch.queue_declare(env.queue, durable=True)
        ch.queue_bind(env.queue, env.exchange, "order.*")  # invoices match no binding
    orphan = outbox_row("INV-1", 0, type_="InvoiceIssued")
    orphan = (orphan[0], "invoice", *orphan[2:])
    ids = _write(env, [outbox_row("O-1", 0), orphan, outbox_row("O-1", 1)])
    got = env.consume(2, settle=1.0)
    assert [d.message_id for d in got] == [ids[0], ids[2]]
    unroutable = f"{env.exchange}.unroutable"
    with env.channel() as ch:
        method, props, _body = ch.basic_get(unroutable, auto_ack=True)
    assert method is not None, "the unroutable event must be kept"
    assert props.message_id == ids[1]
    env.wait_for(lambda: "unroutable events kept" in relay.log(), timeout=15, what="count log")
    # the stream was never blocked: the slot moved past all three
    end = env.current_lsn()
    env.wait_for(lambda: env.slot_flush() >= end, timeout=15, what="slot to advance")
    assert relay.terminate() == 0


def test_without_alternate_exchange_unroutable_is_retried_not_skipped(env: Env) -> None:
    assert env.cli("init", "--create-outbox").returncode == 0
    with env.channel() as ch:  # pre-declared by someone else, without an alternate exchange
        ch.exchange_declare(env.exchange, "topic", durable=True)
        ch.queue_declare(env.queue, durable=True)
        ch.queue_bind(env.queue, env.exchange, "order.*")
    relay = env.start_relay()
    relay.wait_streaming()
    assert "without an alternate exchange" in relay.log()
    lost_row = outbox_row("INV-2", 0)
    lost_row = (lost_row[0], "invoice", *lost_row[2:])
    ids = _write(env, [lost_row])
    end = env.current_lsn()
    env.wait_for(lambda: "unroutable" in relay.log(), timeout=15, what="the return")
    time.sleep(2)
    assert env.slot_flush() < end, "the slot passed an event the broker returned"
    assert relay.proc.poll() is None, "unroutable must be retried, not fatal"
    log = relay.log()
    assert "retrying after failure" in log
    assert "no queue is bound for routing key 'invoice.OrderPlaced'" in log
    with env.channel() as ch:  # the operator adds the missing binding
        ch.queue_bind(env.queue, env.exchange, "invoice.*")
    got = env.consume(1, timeout=30, settle=1.0)
    assert {d.message_id for d in got} == set(ids)
    assert relay.terminate() == 0


def test_full_queue_with_reject_publish_delivers_everything_in_order(env: Env) -> None:
    assert env.cli("init", "--create-outbox").returncode == 0
    with env.channel() as ch:
        ch.exchange_declare(
            env.exchange,
            "topic",
            durable=True,
            arguments={"alternate-exchange": f"{env.exchange}.unroutable"},
        )
        ch.queue_declare(
            env.queue,
            durable=True,
            arguments={"x-max-length": 100, "x-overflow": "reject-publish"},
        )
        ch.queue_bind(env.queue, env.exchange, "#")
    relay = env.start_relay(max_in_flight="200")
    relay.wait_streaming()
    expected: list[str] = []
    seq: dict[str, int] = {}
    for _ in range(10):
        rows = []
        for i in range(60):
            agg = f"R{i % 6}"
            seq[agg] = seq.get(agg, -1) + 1
            rows.append(outbox_row(agg, seq[agg]))
        expected += _write(env, rows)
    end = env.current_lsn()
    env.wait_for(lambda: "broker nacked" in relay.log(), timeout=30, what="a nack")
    time.sleep(1.5)
    assert env.slot_flush() < end, "the slot passed events the broker refused"
    assert relay.proc.poll() is None
    # the consumer comes back: space frees, the relay's retries get through
    got = env.consume(len(expected), timeout=120, settle=2.0)
    verdict = verify(expected, got)
    print(f"reject-publish: {verdict}")
    assert "careful mode" in relay.log() or "retrying after failure" in relay.log()
    assert relay.terminate() == 0


def test_oversize_event_goes_to_the_dead_letter_exchange(env: Env) -> None:
    env.init()
    dlx, dlq = f"{env.exchange}.dead", f"{env.queue}.dead"
    with env.channel() as ch:
        ch.exchange_declare(dlx, "topic", durable=True)
        ch.queue_declare(dlq, durable=True)
        ch.queue_bind(dlq, dlx, "#")
    with broker_max_message_size(env, 1_048_576):
        relay = env.start_relay(max_message_size="1048576", dead_letter_exchange=dlx)
        relay.wait_streaming()
        big = outbox_row("BIG", 1, payload={"seq": 1, "blob": "x" * 1_200_000})
        ids = _write(env, [outbox_row("BIG", 0), big, outbox_row("BIG", 2)])
        got = env.consume(2, settle=1.0)
        assert [d.message_id for d in got] == [ids[0], ids[2]]
        with env.channel() as ch:
            method, props, body = ch.basic_get(dlq, auto_ack=True)
        assert method is not None
        assert props.message_id == ids[1]
        headers = props.headers
        assert "exceeds max_message_size 1048576" in headers["x-cdc-relay-reason"]
        assert headers["x-original-routing-key"] == "order.OrderPlaced"
        assert headers["x-original-exchange"] == env.exchange
        assert headers["x-source-lsn"]
        assert b'"payload":null' in body
        assert "event dead-lettered" in relay.log()
        assert relay.terminate() == 0


def test_oversize_event_without_dead_letter_halts_before_it(env: Env) -> None:
    env.init()
    relay = env.start_relay(max_message_size="1048576")
    relay.wait_streaming()
    first = _write(env, [outbox_row("H", 0)])
    assert [d.message_id for d in env.consume(1)] == first
    flush_before = env.slot_flush()
    big_id = _write(env, [outbox_row("H", 1, payload={"seq": 1, "blob": "y" * 1_200_000})])[0]
    assert relay.proc.wait(60) == 1
    log = relay.log()
    assert "exceeds max_message_size" in log
    assert "dead_letter_exchange" in log
    assert big_id in log
    assert "Traceback" not in log
    assert env.slot_flush() < env.current_lsn()
    assert env.slot_flush() >= flush_before
    assert env.consume(1, timeout=2, settle=0.5) == []


def test_broker_limit_below_the_setting_is_a_clear_halt(env: Env) -> None:
    env.init()
    with broker_max_message_size(env, 1_048_576):
        relay = env.start_relay()  # believes the broker takes 128 MiB
        relay.wait_streaming()
        _write(env, [outbox_row("Z", 0, payload={"seq": 0, "blob": "z" * 1_200_000})])
        assert relay.proc.wait(60) == 1
    log = relay.log()
    assert "broker refused a message as too large" in log
    assert "max_message_size" in log
    assert "Traceback" not in log
