"""Faults on a real three-node RabbitMQ cluster, each ending with the one delivery verdict.

One cluster (``tests/cluster.py``: three private nodes, ``pause_minority``) and the suite's
PostgreSQL serve the whole module; each test has its own database, slot, exchange and a quorum
queue bound to the exchange (members on all three nodes), and the relay's ``amqp_url`` lists
all three nodes. A test floods the outbox (``Flood``, bounded), inflicts one fault while events
are in flight, waits until the relay delivers again, brings the cluster back to health, drains
the quorum queue from an independent consumer and calls ``verify``: nothing committed lost,
nothing rolled back published, duplicates only with the same message id and only from
transactions at or after the slot position reported before the fault, first deliveries in
per-aggregate commit order. The inbox consumer's test checks "applied exactly once" in its
database instead. ``pytest -s`` prints each scenario's counts, where the relay went and how
long it took to stream again (measured, never asserted: budgets belong in benchmarks).

Whatever a test leaves broken (a node down, a partition) is repaired before the next one.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest

from tests.cluster import ClusterNode, RabbitCluster
from tests.faults.checks import Verdict, verify
from tests.integration.harness import (
    Env,
    Flood,
    Relay,
    assert_per_aggregate_order,
    count_records,
    drop_database,
    dsn_for,
    inbox_database,
    insert_events,
    log_records,
    outbox_row,
)
from tests.integration.test_consumer import ConsumerProc
from tests.sandbox import PostgresSandbox

pytestmark = pytest.mark.integration

STREAMING = "streaming"
CONNECTED = "connected to RabbitMQ"
RETRYING = "retrying after failure"
ROUTED = "order.#"  # what the quorum queue takes: every Flood event (aggregatetype "order")


# -- the environment ------------------------------------------------------------------------------
@dataclass
class ClusterEnv(Env):
    """``Env`` on the cluster: the relay gets every node in ``amqp_url``, the test's queue is a
    quorum queue, and the test's own connections go to the first node that answers."""

    cluster: RabbitCluster = field(kw_only=True)
    floods: list[Flood] = field(default_factory=list, kw_only=True)

    def relay_env(self, **overrides: str) -> dict[str, str]:
        return super().relay_env(**{"amqp_url": self.cluster.amqp_url, **overrides})

    @contextmanager
    def channel(self, via: ClusterNode | None = None) -> Iterator[Any]:
        nodes = self.cluster.nodes if via is None else [via]
        conn = pika.BlockingConnection([pika.URLParameters(n.amqp_url) for n in nodes])
        try:
            yield conn.channel()
        finally:
            if conn.is_open:
                conn.close()

    def bind_queue(self, via: ClusterNode | None = None) -> None:
        """The exchange as the relay declares it, and a quorum queue for ``order.*`` events
        (its leader on ``via``, the node it is declared through; members on all three)."""
        with self.channel(via) as ch:
            ch.exchange_declare(
                self.exchange,
                "topic",
                durable=True,
                arguments={"alternate-exchange": f"{self.exchange}.unroutable"},
            )
            ch.queue_declare(self.queue, durable=True, arguments={"x-queue-type": "quorum"})
            ch.queue_bind(self.queue, self.exchange, ROUTED)

    def flood(self, limit: int = 20_000) -> Flood:
        """A background writer, stopped at teardown whatever happens in the test."""
        flood = Flood(self, aggregates=16, batch=10, limit=limit, pause=0.02).start()
        self.floods.append(flood)
        return flood

    def take(self, queue: str, expected: int, timeout: float = 30) -> list[str]:
        """The message ids of ``expected`` messages taken from ``queue`` (acknowledged)."""
        ids: list[str] = []
        deadline = time.monotonic() + timeout
        with self.channel() as ch:
            while len(ids) < expected and time.monotonic() < deadline:
                method, props, _body = ch.basic_get(queue, auto_ack=True)
                if method is None:
                    time.sleep(0.2)
                    continue
                ids.append(str(props.message_id))
        return ids


@pytest.fixture(scope="module")
def cluster(servers_root: Path) -> Iterator[RabbitCluster]:
    started = time.monotonic()
    c = RabbitCluster(servers_root / "cluster").start()
    print(f"\n[cluster] three nodes up and joined in {time.monotonic() - started:.1f}s")
    try:
        yield c
    finally:
        c.destroy()  # asserts that no VM of the cluster is left running


@pytest.fixture
def cenv(
    pg: PostgresSandbox, cluster: RabbitCluster, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[ClusterEnv]:
    name = "c_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    e = ClusterEnv(
        pg=pg,
        rabbit=cluster.nodes[0],
        name=name,
        dbname=name,
        dsn=dsn_for(pg, name),
        exchange=f"ex.{name}",
        queue=f"q.{name}",
        tmp=tmp_path,
        cluster=cluster,
    )
    try:
        yield e
    finally:
        for flood in e.floods:
            flood.stop()
        for relay in e.relays:
            relay.close()
        drop_database(pg, name)
        cluster.repair()  # the next test starts on three healthy nodes


# -- reading the relay --------------------------------------------------------------------------
def records(log: str) -> list[dict[str, Any]]:
    return log_records(log)


def count(relay: Relay, msg: str, contains: str = "") -> int:
    return count_records(relay.log(), msg, contains)


def tail(log: str, lines: int = 30) -> str:
    return "\n".join(log.splitlines()[-lines:])


def node_of(cluster: RabbitCluster, log: str, msg: str = CONNECTED) -> ClusterNode:
    """The node the newest ``msg`` record names in its ``broker`` field."""
    brokers = [r["broker"] for r in records(log) if r.get("msg") == msg and r.get("broker")]
    assert brokers, f"no {msg!r} with a broker in:\n{tail(log)}"
    return cluster.node_at(str(brokers[-1]))


def streaming_again(
    relay: Relay, cluster: RabbitCluster, sessions: int, since: float, timeout: float = 60
) -> tuple[ClusterNode, float]:
    """Wait for the relay's next streaming session; the node it is on and the seconds from
    ``since`` (a wall-clock time) to the session's ``streaming`` record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        streams = [r for r in records(relay.log()) if r.get("msg") == STREAMING]
        if len(streams) > sessions:
            at = dt.datetime.fromisoformat(str(streams[sessions]["ts"])).timestamp()
            return node_of(cluster, relay.log()), at - since
        assert relay.proc.poll() is None, f"relay exited:\n{tail(relay.log())}"
        time.sleep(0.05)
    raise AssertionError(f"relay not streaming again after {timeout}s:\n{tail(relay.log())}")


def sessions(relay: Relay) -> int:
    return count(relay, STREAMING)


def retried_lost_node(relay: Relay, node: ClusterNode) -> int:
    """How often the relay tried ``node`` again after losing it: the rotation should start
    the next connection at the following node, so never while the others answer."""
    name = f"amqp://127.0.0.1:{node.port}//"
    return sum(
        1
        for r in records(relay.log())
        if r.get("msg") == "cannot connect to a RabbitMQ node; trying the next"
        and r.get("broker") == name
    )


def why(relay: Relay) -> str:
    """Why each session of the relay ended, in order (the start of each retry's error)."""
    errors = [
        str(r.get("error", ""))[:60] for r in records(relay.log()) if r.get("msg") == RETRYING
    ]
    return " | ".join(errors) or "-"


# -- the verdict ----------------------------------------------------------------------------------
def delivering(env: ClusterEnv, more: int = 300, timeout: float = 60) -> None:
    """Wait until ``more`` further events reached the quorum queue: the relay delivers now."""
    start = env.queue_depth()
    env.wait_for(
        lambda: env.queue_depth() >= start + more, timeout=timeout, what=f"{more} more events"
    )


def finish(
    name: str,
    env: ClusterEnv,
    flood: Flood,
    relay: Relay,
    started: float,
    flushed_before: int,
    **extra: object,
) -> Verdict:
    """Stop the flood, drain, and judge; the relay must still run and stop cleanly."""
    committed = list(flood.stop())
    got = env.consume_all(committed)
    verdict = verify(
        committed,
        got,
        flushed_before=flushed_before,
        forbidden_ids=flood.rolled_back,
        uncertain_ids=flood.uncertain,
    )
    assert_per_aggregate_order(got)
    fields = " ".join(f"{k}={v}" for k, v in extra.items())
    print(
        f"\n[{name}] {verdict} {fields} took={time.monotonic() - started:.1f}s\n"
        f"  sessions ended by: {why(relay)}"
    )
    assert relay.proc.poll() is None, f"relay exited:\n{tail(relay.log())}"
    assert relay.terminate() == 0, tail(relay.log())
    return verdict


def start_flooding(env: ClusterEnv, relay: Relay, before: int = 800) -> tuple[Flood, int]:
    """A flood with ``before`` events committed and the first ones delivered; the slot
    position the relay had reported at that point (the bound for duplicates)."""
    flood = env.flood()
    flood.wait_for(before)
    env.wait_for(lambda: env.queue_depth() > 0, what="first deliveries")
    assert relay.proc.poll() is None, tail(relay.log())
    return flood, env.slot_flush()


# -- scenarios ------------------------------------------------------------------------------------
def test_kill_9_of_the_relays_node(cenv: ClusterEnv) -> None:
    """The node the relay is connected to dies mid-flood (it also holds the leaders of both
    quorum queues: the test's queue and the relay's ``<exchange>.unroutable``, both declared
    through it). The relay streams again through the next node; the unroutable quorum queue
    keeps the event stored before the kill and takes one after it."""
    started = time.monotonic()
    env, cluster = cenv, cenv.cluster
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    node = node_of(cluster, relay.log())
    unroutable = f"{env.exchange}.unroutable"
    strays = [("00000000-0000-4000-8000-00000000aa01", "stray", "S", "Lost", '{"n": 1}')]
    with env.sql() as conn:
        insert_events(conn, strays)
    flood, flushed_before = start_flooding(env, relay)
    leaders = {q: cluster.leader(q).node for q in (env.queue, unroutable)}
    assert set(leaders.values()) == {node.node}, leaders
    before = sessions(relay)
    at = time.time()
    node.kill()
    moved_to, reconnect = streaming_again(relay, cluster, before, at)
    assert moved_to is not node
    delivering(env)
    strays.append(("00000000-0000-4000-8000-00000000aa02", "stray", "S", "Lost", '{"n": 2}'))
    with env.sql() as conn:
        insert_events(conn, strays[1:])
    restart = time.monotonic()
    node.start()
    cluster.wait_healthy()
    back = time.monotonic() - restart
    flood.wait_for(len(flood.committed) + 300)
    verdict = finish(
        "kill -9 relay's node",
        env,
        flood,
        relay,
        started,
        flushed_before,
        killed=node.node,
        moved_to=moved_to.node,
        streaming_again_after=f"{reconnect:.2f}s",
        node_back_after=f"{back:.1f}s",
    )
    assert verdict.lost == 0
    assert retried_lost_node(relay, node) == 0, tail(relay.log())
    assert sorted(env.take(unroutable, len(strays))) == sorted(s[0] for s in strays)


def test_kill_9_of_a_quorum_queue_leader_the_relay_is_not_connected_to(cenv: ClusterEnv) -> None:
    """The queue's leader is on node 2 (declared through it); the relay publishes through
    node 1. Killing node 2 makes the followers elect a new leader; the relay's connection
    itself is not touched."""
    started = time.monotonic()
    env, cluster = cenv, cenv.cluster
    env.bind_queue(via=cluster.nodes[1])
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    relay_node = node_of(cluster, relay.log())
    leader = cluster.leader(env.queue)
    assert leader is not relay_node, (leader.node, relay_node.node)
    flood, flushed_before = start_flooding(env, relay)
    before = sessions(relay)
    leader.kill()
    elected = time.monotonic()
    env.wait_for(
        lambda: cluster.queues()[env.queue]["leader"] not in ("", leader.node),
        timeout=60,
        what="a new leader",
    )
    new_leader = cluster.leader(env.queue)
    delivering(env)
    delivering_after = time.monotonic() - elected
    restart = time.monotonic()
    leader.start()
    cluster.wait_healthy()
    back = time.monotonic() - restart
    flood.wait_for(len(flood.committed) + 300)
    verdict = finish(
        "kill -9 quorum leader",
        env,
        flood,
        relay,
        started,
        flushed_before,
        killed=leader.node,
        new_leader=new_leader.node,
        relay_on=relay_node.node,
        relay_sessions_during=sessions(relay) - before,
        delivering_again_within=f"{delivering_after:.1f}s",
        node_back_after=f"{back:.1f}s",
    )
    assert verdict.lost == 0


def test_stop_app_of_a_follower_then_start_app(cenv: ClusterEnv) -> None:
    """A follower of the queue that the relay is not connected to stops its RabbitMQ
    application (the Erlang VM stays up, as in maintenance) and starts it again: the leader
    keeps a majority with the other member, and the follower catches up afterwards."""
    started = time.monotonic()
    env, cluster = cenv, cenv.cluster
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    relay_node = node_of(cluster, relay.log())
    leader = cluster.leader(env.queue)
    follower = next(n for n in reversed(cluster.nodes) if n not in (leader, relay_node))
    flood, flushed_before = start_flooding(env, relay)
    before = sessions(relay)
    follower.stop_app()
    delivering(env)
    follower.start_app()
    cluster.wait_healthy()
    members = cluster.queues()[env.queue]["members"]
    flood.wait_for(len(flood.committed) + 300)
    verdict = finish(
        "stop_app follower",
        env,
        flood,
        relay,
        started,
        flushed_before,
        follower=follower.node,
        leader=leader.node,
        relay_on=relay_node.node,
        relay_sessions_during=sessions(relay) - before,
    )
    assert verdict.lost == 0
    assert follower.node in members


def test_restart_of_the_relays_node(cenv: ClusterEnv) -> None:
    """A graceful restart (``rabbitmqctl stop``, then start) of the node the relay is on: the
    broker closes the relay's connection (CONNECTION_FORCED, or a reset when the node is gone
    before the relay read the close) and the relay moves on to the next node."""
    started = time.monotonic()
    env, cluster = cenv, cenv.cluster
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    node = node_of(cluster, relay.log())
    flood, flushed_before = start_flooding(env, relay)
    before = sessions(relay)
    at = time.time()
    node.stop()
    moved_to, reconnect = streaming_again(relay, cluster, before, at)
    delivering(env)
    restart = time.monotonic()
    node.start()
    cluster.wait_healthy()
    back = time.monotonic() - restart
    flood.wait_for(len(flood.committed) + 300)
    verdict = finish(
        "restart relay's node",
        env,
        flood,
        relay,
        started,
        flushed_before,
        restarted=node.node,
        moved_to=moved_to.node,
        streaming_again_after=f"{reconnect:.2f}s",
        node_back_after=f"{back:.1f}s",
    )
    assert verdict.lost == 0
    assert moved_to is not node
    assert retried_lost_node(relay, node) == 0, tail(relay.log())
    assert count(relay, RETRYING, "RabbitMQ connection lost") >= 1


def test_partition_of_the_relays_node_pauses_it(cenv: ClusterEnv) -> None:
    """The node the relay is on (and the queue's leader) is cut off from the other two. With
    ``pause_minority`` it finds itself in the minority and stops its RabbitMQ application:
    it closes the relay's connection, and the majority elects a new leader and takes the
    relay's publishes. Healed, the node resumes by itself and rejoins."""
    started = time.monotonic()
    env, cluster = cenv, cenv.cluster
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    node = node_of(cluster, relay.log())
    flood, flushed_before = start_flooding(env, relay)
    before = sessions(relay)
    at = time.time()
    cluster.partition(node)
    moved_to, reconnect = streaming_again(relay, cluster, before, at)
    env.wait_for(
        lambda: node.eval("rabbit:is_running().") == "false",
        timeout=30,
        what="the minority node to pause",
    )
    majority = cluster.status(moved_to)["running_nodes"]
    delivering(env)
    healed = time.monotonic()
    cluster.heal(node)
    cluster.wait_healthy()
    back = time.monotonic() - healed
    flood.wait_for(len(flood.committed) + 300)
    verdict = finish(
        "partition relay's node",
        env,
        flood,
        relay,
        started,
        flushed_before,
        partitioned=node.node,
        moved_to=moved_to.node,
        streaming_again_after=f"{reconnect:.2f}s",
        rejoined_after_heal=f"{back:.1f}s",
    )
    assert verdict.lost == 0
    assert moved_to is not node
    assert retried_lost_node(relay, node) == 0, tail(relay.log())
    assert node.node not in majority and len(majority) == 2, majority


def test_classic_unroutable_queue_whose_node_dies(cenv: ClusterEnv) -> None:
    """``unroutable_queue_type = classic``: the relay declares ``<exchange>.unroutable`` on
    the node it first reached, and classic queues are not replicated. That node dies:

    * reconnected elsewhere, the relay's declaration gets ``404 NOT_FOUND - home node ... is
      down or inaccessible``, which it tolerates, and routable events keep flowing;
    * an event no binding matches then has nowhere to go: the broker returns it
      (``312 NO_ROUTE``), and the relay holds the slot there and retries (reconnecting) until
      the node is back; then the event is kept in the queue. Events after it in the WAL may
      be published in each attempt (and then arrive more than once), but the slot stays
      before the returned event until the queue takes it.
    """
    started = time.monotonic()
    env, cluster = cenv, cenv.cluster
    env.init()
    relay = env.start_relay(unroutable_queue_type="classic")
    relay.wait_streaming()
    unroutable = f"{env.exchange}.unroutable"
    node = node_of(cluster, relay.log())
    assert cluster.home(unroutable) is node
    flood, flushed_before = start_flooding(env, relay)
    before = sessions(relay)
    at = time.time()
    node.kill()
    moved_to, reconnect = streaming_again(relay, cluster, before, at)
    env.wait_for(
        lambda: "the unroutable queue is unavailable" in relay.log(),
        what="the 404 on the unroutable queue to be tolerated",
    )
    delivering(env)
    flood.wait_for(len(flood.committed) + 300)
    committed = list(flood.stop())
    got = env.consume_all(committed)  # while the queue's node is still down
    verdict = verify(
        committed,
        got,
        flushed_before=flushed_before,
        forbidden_ids=flood.rolled_back,
        uncertain_ids=flood.uncertain,
    )
    assert_per_aggregate_order(got)
    stray = ("00000000-0000-4000-8000-00000000bb01", "stray", "S", "Lost", '{"n": 1}')
    behind = outbox_row("AFTER", 0)
    returned = count(relay, RETRYING, "NO_ROUTE")
    with env.sql() as conn:
        insert_events(conn, [stray])
        insert_events(conn, [behind])
    env.wait_for(
        lambda: count(relay, RETRYING, "NO_ROUTE") >= returned + 2,
        what="the stray event to be returned and retried",
    )
    held = count(relay, RETRYING, "NO_ROUTE") - returned
    restart = time.monotonic()
    node.start()
    cluster.wait_healthy()
    back = time.monotonic() - restart
    after = env.consume(1, timeout=60, settle=1.0)
    assert {d.message_id for d in after} == {behind[0]}  # possibly several copies
    assert env.take(unroutable, 1) == [stray[0]]
    print(
        f"\n[classic unroutable, home node killed] {verdict} (drained while the node was down) "
        f"moved_to={moved_to.node} streaming_again_after={reconnect:.2f}s "
        f"stray_returned_and_retried={held}x copies_of_the_event_behind_it={len(after)} "
        f"node_back_after={back:.1f}s "
        f"took={time.monotonic() - started:.1f}s\n  sessions ended by: {why(relay)}"
    )
    assert verdict.lost == 0
    assert relay.terminate() == 0, tail(relay.log())


@pytest.fixture
def inbox_dsn(cenv: ClusterEnv) -> Iterator[str]:
    with inbox_database(cenv.pg, cenv.dbname) as dsn:
        yield dsn


def _applied(dsn: str) -> list[tuple[str, str, int | None]]:
    with psycopg.connect(dsn) as conn:
        return [
            (str(r[0]), str(r[1]), r[2])
            for r in conn.execute(
                "SELECT event_id, aggregate_id, seq FROM applied_events ORDER BY n"
            )
        ]


def test_inbox_consumer_survives_kill_9_of_its_node(cenv: ClusterEnv, inbox_dsn: str) -> None:
    """``cdc-relay consume`` with all three nodes in ``amqp_url`` (node 2 first) consumes the
    quorum queue while the relay publishes through node 1. Node 2 dies mid-flood: the
    consumer's unacknowledged deliveries go back to the queue, it reconnects to the next node
    and the inbox turns the redeliveries into duplicates, so each event is applied once."""
    started = time.monotonic()
    env, cluster = cenv, cenv.cluster
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    node = cluster.nodes[1]
    consumer = ConsumerProc(env, inbox_dsn, "record", amqp_url=cluster.url_from(node))
    try:
        consumer.wait_consuming()
        assert node_of(cluster, consumer.log(), "consuming") is node
        flood = env.flood(limit=4_000)
        flood.wait_for(1_000)
        env.wait_for(lambda: len(_applied(inbox_dsn)) > 0, what="first events applied")
        at = time.monotonic()
        node.kill()
        env.wait_for(
            lambda: consumer.log().count('"msg": "consuming"') >= 2,
            timeout=60,
            what="the consumer to consume again",
        )
        reconnect = time.monotonic() - at
        moved_to = node_of(cluster, consumer.log(), "consuming")
        restart = time.monotonic()
        node.start()
        cluster.wait_healthy()
        back = time.monotonic() - restart
        flood.wait_for(flood.limit, timeout=180)
        expected = set(flood.stop()) - flood.rolled_back
        env.wait_for(
            lambda: len({e for e, _, _ in _applied(inbox_dsn)}) >= len(expected),
            timeout=180,
            what="every committed event applied",
        )
        env.wait_for(lambda: env.queue_depth() == 0, timeout=60, what="the queue to drain")
    finally:
        code = consumer.terminate()
    assert code == 0, tail(consumer.log())
    assert relay.terminate() == 0, tail(relay.log())
    applied = _applied(inbox_dsn)
    ids = [e for e, _, _ in applied]
    assert len(ids) == len(set(ids)), "an event was applied twice"
    assert set(ids) == expected
    last: dict[str, int] = {}
    for _event, aggregate, seq in applied:
        assert seq is not None and seq > last.get(aggregate, -1), (aggregate, seq)
        last[aggregate] = seq
    print(
        f"\n[consumer's node killed] {len(expected)} events applied once each, "
        f"consumer moved_to={moved_to.node} consuming_again_after={reconnect:.1f}s "
        f"node_back_after={back:.1f}s took={time.monotonic() - started:.1f}s"
    )
