"""A consumer group that keeps per-aggregate order when one queue is not enough: RabbitMQ's
consistent-hash exchange, bound to the relay's exchange, hashes the ``aggregate_id`` header the
relay sets on every message onto several queues, each with a single active consumer. The
topology is the operator's, declared here as the README shows it; the relay is unchanged."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pika
import pytest

from tests.integration.harness import Env, insert_events, outbox_row

pytestmark = pytest.mark.integration

QUEUES = 3


@dataclass
class Member:
    """One consumer of the group on its own connection: what it received, in order."""

    queue: str
    name: str
    conn: Any
    got: list[tuple[str, str, int]] = field(default_factory=list)  # (id, aggregate, seq)
    tag: str = ""

    def start(self) -> None:
        ch = self.conn.channel()
        ch.basic_qos(prefetch_count=50)

        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            event = json.loads(body)
            self.got.append((props.message_id, event["aggregate_id"], event["payload"]["seq"]))
            ch.basic_ack(method.delivery_tag)

        self.tag = ch.basic_consume(self.queue, on_message)


@contextmanager
def _group(env: Env, per_queue: int) -> Iterator[list[Member]]:
    members = [
        Member(
            f"{env.queue}.g{q}",
            f"g{q}-{c}",
            pika.BlockingConnection(pika.URLParameters(env.rabbit.amqp_url)),
        )
        for q in range(QUEUES)
        for c in range(per_queue)
    ]
    try:
        for m in members:
            m.start()
        yield members
    finally:
        for m in members:
            if m.conn.is_open:
                m.conn.close()


def _pump(members: list[Member], until: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the group did not receive everything in time"
        for m in members:
            if m.conn.is_open:
                m.conn.process_data_events(time_limit=0.02)


def _declare(env: Env) -> str:
    """The relay's exchange, a consistent-hash exchange bound to it, and the group's queues."""
    by_aggregate = f"{env.exchange}.by-aggregate"
    with env.channel() as ch:
        ch.exchange_declare(  # as the relay declares it, so its own declare agrees
            env.exchange,
            "topic",
            durable=True,
            arguments={"alternate-exchange": f"{env.exchange}.unroutable"},
        )
        ch.exchange_declare(
            by_aggregate,
            "x-consistent-hash",
            durable=True,
            arguments={"hash-header": "aggregate_id"},
        )
        ch.exchange_bind(destination=by_aggregate, source=env.exchange, routing_key="#")
        for q in range(QUEUES):
            queue = f"{env.queue}.g{q}"
            ch.queue_declare(queue, durable=True, arguments={"x-single-active-consumer": True})
            ch.queue_bind(queue, by_aggregate, routing_key="1")  # the binding key is a weight
    return by_aggregate


def _write(env: Env, aggregates: int, per_aggregate: int, first_seq: int = 0) -> list[str]:
    """Transactions that mix aggregates, each aggregate's seq rising in commit order."""
    ids: list[str] = []
    with env.sql() as conn:
        for seq in range(first_seq, first_seq + per_aggregate):
            rows = [outbox_row(f"SKU-{a}", seq) for a in range(aggregates)]
            with conn.transaction():
                insert_events(conn, rows)
            ids += [r[0] for r in rows]
    return ids


def test_consistent_hash_group_keeps_each_aggregate_on_one_queue_in_order(env: Env) -> None:
    out = env.cli("init", "--create-outbox")
    assert out.returncode == 0, out.stderr
    _declare(env)
    relay = env.start_relay()
    relay.wait_streaming()
    ids = _write(env, aggregates=30, per_aggregate=20)
    with _group(env, per_queue=2) as members:
        _pump(members, lambda: sum(len(m.got) for m in members) >= len(ids))
        time.sleep(0.5)  # anything extra (a duplicate) would show now
        for m in members:
            m.conn.process_data_events(time_limit=0.1)
        received = [e for m in members for e in m.got]
        assert sorted(e[0] for e in received) == sorted(ids), "every event once"
        queue_of: dict[str, set[str]] = {}
        for m in members:
            for _, aggregate, _ in m.got:
                queue_of.setdefault(aggregate, set()).add(m.queue)
        assert all(len(q) == 1 for q in queue_of.values()), queue_of
        assert len({q for qs in queue_of.values() for q in qs}) == QUEUES, "all queues used"
        for m in members:
            last: dict[str, int] = {}
            for _, aggregate, seq in m.got:
                assert seq > last.get(aggregate, -1), f"{m.name}: {aggregate} out of order"
                last[aggregate] = seq
        # single active consumer: of the two consumers on each queue, one received everything
        for q in range(QUEUES):
            pair = [m for m in members if m.queue == f"{env.queue}.g{q}"]
            assert sorted(bool(m.got) for m in pair) == [False, True], [m.name for m in pair]

        # the active consumer of queue g0 goes away: its partner takes over, in order
        active = next(m for m in members if m.queue == f"{env.queue}.g0" and m.got)
        standby = next(m for m in members if m.queue == active.queue and m is not active)
        active.conn.close()
        g0_aggregates = {a for _, a, _ in active.got}
        more = _write(env, aggregates=30, per_aggregate=5, first_seq=20)
        _pump(members, lambda: sum(len(m.got) for m in members) >= len(ids) + len(more))
        taken: dict[str, list[int]] = {}
        for _, aggregate, seq in standby.got:
            taken.setdefault(aggregate, []).append(seq)
        assert taken == {a: list(range(20, 25)) for a in g0_aggregates}, taken
    print(
        f"{len(ids) + len(more)} events over {QUEUES} queues: "
        + ", ".join(f"{m.name} {len(m.got)}" for m in members)
    )
    assert relay.terminate() == 0
