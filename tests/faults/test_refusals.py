"""The broker says no: full queues, unroutable events, messages too large to ever accept."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pika
import pytest

from cdc_relay.lsn import Lsn
from tests.faults.checks import verify
from tests.integration.harness import Delivery, Env, insert_events, outbox_row

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


class SlowConsumer:
    """Consumes ``env.queue`` from a thread *while* the relay publishes: a small prefetch and a
    short pause before each ack keep the consumer a little slower than the relay, so the queue
    stays at its limit and frees one place at a time. The broker then refuses some publishes
    (nack) and accepts later ones a moment after, the interleaving of review 1.3. (Measured on
    the relay without a per-aggregate limit: 26-126 first deliveries out of order per run.)"""

    def __init__(self, env: Env, prefetch: int = 5, ack_delay: float = 0.0005) -> None:
        self.env = env
        self.prefetch = prefetch
        self.ack_delay = ack_delay
        self.got: list[Delivery] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SlowConsumer:
        self._thread.start()
        assert self._ready.wait(30), "consumer did not start"
        return self

    def distinct(self) -> int:
        return len({d.message_id for d in list(self.got)})

    def stop(self) -> list[Delivery]:
        self._stop.set()
        self._thread.join(30)
        if self.error is not None:
            raise AssertionError(f"consumer failed: {self.error!r}")
        return self.got

    def _run(self) -> None:
        try:
            conn = pika.BlockingConnection(pika.URLParameters(self.env.rabbit.amqp_url))
            ch = conn.channel()
            ch.basic_qos(prefetch_count=self.prefetch)
            self._ready.set()
            for method, props, body in ch.consume(self.env.queue, inactivity_timeout=0.1):
                if self._stop.is_set():
                    break
                if method is None:
                    continue
                self.got.append(Delivery.from_pika(method, props, body))
                time.sleep(self.ack_delay)
                ch.basic_ack(method.delivery_tag)
            ch.cancel()
            conn.close()
        except BaseException as exc:  # reported by stop()
            self.error = exc
            self._ready.set()


def _reject_publish_run(env: Env, **relay_settings: str) -> tuple[list[str], list[Delivery], str]:
    """A bounded reject-publish queue consumed slowly and concurrently while the relay writes
    1200 events of 6 aggregates in 20 transactions. Returns (expected ids in commit order, every
    delivery in arrival order, the relay's log)."""
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
    relay = env.start_relay(max_in_flight="200", **relay_settings)
    relay.wait_streaming()
    consumer = SlowConsumer(env).start()
    try:
        expected: list[str] = []
        seq: dict[str, int] = {}
        for _ in range(20):
            rows = []
            for i in range(60):
                agg = f"R{i % 6}"
                seq[agg] = seq.get(agg, -1) + 1
                rows.append(outbox_row(agg, seq[agg]))
            expected += _write(env, rows)
        end = env.current_lsn()
        env.wait_for(lambda: "broker nacked" in relay.log(), timeout=60, what="a nack")
        # the broker refused while the consumer was part-way through: refusals and
        # acceptances interleave, which is what can reorder a pipelined aggregate
        consumed_at_first_nack = consumer.distinct()
        assert consumed_at_first_nack < len(expected)
        env.wait_for(
            lambda: consumer.distinct() >= len(expected),
            timeout=180,
            what=f"all {len(expected)} events consumed",
        )
        time.sleep(2.0)  # catch late duplicates
    finally:
        got = consumer.stop()
    assert consumer.distinct() > 0
    assert relay.proc.poll() is None, relay.log()
    env.wait_for(lambda: env.slot_flush() >= end, timeout=30, what="slot past every event")
    log = relay.log()
    assert relay.terminate() == 0
    print(f"first nack after {consumed_at_first_nack} consumed; {len(got)} deliveries")
    return expected, got, log


def test_full_queue_with_reject_publish_keeps_aggregate_order_with_strict_window(env: Env) -> None:
    """``max_in_flight_per_aggregate = 1``: an aggregate's next event waits for the confirm of
    its previous one, so a nack of event k can never be overtaken by k+1 of the same aggregate,
    even while the queue frees space between the two (review 1.3). First deliveries of every
    aggregate follow commit order, and nothing is lost."""
    expected, got, log = _reject_publish_run(env, max_in_flight_per_aggregate="1")
    verdict = verify(expected, got)  # lost = 0, nothing unexpected, per-aggregate order
    print(f"reject-publish, strict per aggregate: {verdict}")
    assert "careful mode" in log or "retrying after failure" in log


def test_full_queue_with_reject_publish_and_free_pipelining_loses_nothing(env: Env) -> None:
    """The default (``max_in_flight_per_aggregate = 0``) pipelines freely: a nacked event can be
    overtaken by a later one of its aggregate (the documented limit), but every event still
    arrives."""
    expected, got, log = _reject_publish_run(env)
    ids = [d.message_id for d in got]
    lost = set(expected) - set(ids)
    assert not lost, f"{len(lost)} committed events lost, e.g. {sorted(lost)[:3]}"
    assert set(ids) <= set(expected), "events that were never committed arrived"
    position = {eid: i for i, eid in enumerate(expected)}
    seen: set[str] = set()
    last: dict[str, int] = {}
    reordered = 0
    for d in got:
        if d.message_id in seen:
            continue
        seen.add(d.message_id)
        agg, pos = d.body["aggregate_id"], position[d.message_id]
        reordered += pos < last.get(agg, -1)
        last[agg] = max(pos, last.get(agg, -1))
    print(
        f"reject-publish, free pipelining: {len(got) - len(set(ids))} duplicates, "
        f"{reordered} first deliveries behind a later event of their aggregate"
    )
    assert "careful mode" in log or "retrying after failure" in log


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
        relay = env.start_relay()  # believes the broker takes more than 1 MiB
        relay.wait_streaming()
        first = _write(env, [outbox_row("Z", 0)])
        (z0,) = env.consume(1)
        assert z0.message_id == first[0]
        z0_commit = int(Lsn.parse(z0.body["source"]["commit_lsn"]))
        env.wait_for(lambda: env.slot_flush() > z0_commit, timeout=15, what="slot past Z0")
        flush_before = env.slot_flush()
        big_id = _write(env, [outbox_row("Z", 1, payload={"seq": 1, "blob": "z" * 1_200_000})])[0]
        end = env.current_lsn()
        assert relay.proc.wait(60) == 1
    log = relay.log()
    assert "broker refused a message as too large" in log
    assert "max_message_size" in log
    assert "Traceback" not in log
    # the halt kept the slot before the refused event, and past the one that arrived
    assert z0_commit < flush_before <= env.slot_flush() < end
    assert env.consume(1, timeout=2, settle=0.5) == []
    # proof that it was not skipped: once the broker takes it, a restart delivers exactly it
    relay2 = env.start_relay()
    got = env.consume(1, timeout=60, settle=1.0)
    assert [d.message_id for d in got] == [big_id]
    assert relay2.terminate() == 0
