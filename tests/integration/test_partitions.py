"""Relays side by side over one outbox partitioned by hash of the aggregate id: each relay has its
own slot, publication and partitions, writers insert into the root, and an independent consumer
checks that every aggregate went through one relay, in order, with nothing lost when one relay
is killed; plus every relay-side command on a member's partitions and the refusals that keep a
split from dropping or doubling events."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from tests.faults.checks import verify
from tests.integration.harness import (
    REPO,
    Delivery,
    Env,
    Flood,
    inbox_database,
    insert_events,
    outbox_row,
)

pytestmark = pytest.mark.integration

COUNT = 4
_RECORD = ("--handler", "tests.integration.handlers:record")
MEMBERS = (("outbox_p0", "outbox_p2"), ("outbox_p1", "outbox_p3"))


def _member(env: Env, i: int, **more: str) -> dict[str, str]:
    """Settings of relay ``i`` of the split: its own slot, publication and partitions."""
    return {
        "slot": f"{env.name}_r{i}",
        "publication": f"{env.name}_r{i}",
        "outbox_table": ",".join(f"public.{p}" for p in MEMBERS[i]),
        "logical_messages": "false",
        **more,
    }


def _ok(env: Env, *args: str, **settings: str) -> str:
    out = env.cli(*args, env=env.relay_env(**settings))
    assert out.returncode == 0, (out.stdout, out.stderr)
    return out.stdout


def _refused(env: Env, *args: str, **settings: str) -> str:
    out = env.cli(*args, env=env.relay_env(**settings))
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("cdc-relay: "), out.stderr
    return lines[-1]


def _records(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def _partition_of(env: Env) -> dict[str, str]:
    """aggregate id → the partition PostgreSQL put its rows in."""
    with env.sql() as conn:
        rows = conn.execute("SELECT DISTINCT aggregateid, tableoid::regclass::text FROM outbox")
        return {str(a): str(p) for a, p in rows}


def _slot_active(env: Env, slot: str) -> bool:
    with env.sql() as conn:
        row = conn.execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    return bool(row and row[0])


def _collect(
    env: Env,
    got: list[Delivery],
    done: Callable[[list[Delivery]], bool],
    timeout: float = 90,
    settle: float = 0.0,
) -> None:
    """Append deliveries from the test's queue to ``got`` until ``done(got)``, then ``settle``
    seconds more (to see what should not come)."""
    deadline = time.monotonic() + timeout
    settle_until: float | None = None
    with env.channel() as ch:
        ch.basic_qos(prefetch_count=1000)
        for method, props, body in ch.consume(env.queue, inactivity_timeout=0.2):
            if method is not None:
                got.append(Delivery.from_pika(method, props, body))
                ch.basic_ack(method.delivery_tag)
            now = time.monotonic()
            if settle_until is None and done(got):
                settle_until = now + settle
            if settle_until is not None and now >= settle_until:
                break
            assert now < deadline, f"timed out with {len(got)} deliveries"
        ch.cancel()


@contextmanager
def _inbox_consumer(env: Env, queue: str) -> Iterator[str]:
    """``cdc-relay consume`` of ``queue`` into an inbox database of its own; yields its DSN."""
    with inbox_database(env.pg, env.dbname) as dsn:
        yield from _consuming(env, queue, dsn)


def _consuming(env: Env, queue: str, dsn: str) -> Iterator[str]:
    proc_env = env.relay_env(inbox_dsn=dsn, http_address="")
    del proc_env["CDC_RELAY_PG_DSN"]
    with (env.tmp / "consumer.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cdc_relay.cli", "consume", "--queue", queue, *_RECORD],
            env=proc_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            yield dsn
        finally:
            proc.terminate()
            proc.wait(30)


def _setup_split(env: Env) -> None:
    """The table once (outbox_table = the root), then each member's publication and slot."""
    out = _ok(env, "init", "--create-outbox", "--partitions", str(COUNT))
    assert "created table public.outbox partitioned by hash of aggregateid into 4" in out
    assert 'relay 0: outbox_table = "public.outbox_p0,public.outbox_p2"' in out
    assert 'relay 1: outbox_table = "public.outbox_p1,public.outbox_p3"' in out
    assert "no publication or slot created" in out
    with env.sql() as conn:
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
    first = _ok(env, "init", **_member(env, 0))
    assert f"created publication {env.name}_r0" in first
    # the other member has not run init yet: its partitions are named as waiting
    assert "no relay streams them: public.outbox_p1, public.outbox_p3" in first
    second = _ok(env, "init", **_member(env, 1))
    assert "no relay streams them" not in second
    env.bind_queue()


def test_two_relays_split_the_partitions_and_a_killed_one_holds_only_its_own(env: Env) -> None:
    _setup_split(env)
    everything = f"{env.queue}.all"  # an inbox consumer taking every event, for the audit
    with env.channel() as ch:
        ch.queue_declare(everything, durable=True)
        ch.queue_bind(everything, env.exchange, "#")
    with _inbox_consumer(env, everything) as inbox:
        _split_flood_and_kill(env)
        # the audit reads the whole outbox (outbox_table = the root) against that consumer
        audit = ("audit", "--since", "1h", "--settle", "0s")
        env.wait_for(lambda: _inbox_count(inbox) >= _outbox_count(env), what="the inbox")
        whole = env.cli(*audit, env=env.relay_env(inbox_dsn=inbox))
        assert whole.returncode == 0 and ": agree" in whole.stdout, whole.stdout + whole.stderr
        # a member's config holds part of the events: the rest is reported as unexpected
        part = env.cli(*audit, env=env.relay_env(inbox_dsn=inbox, **_member(env, 0)))
        assert part.returncode == 1, part.stdout + part.stderr


def _outbox_count(env: Env) -> int:
    with env.sql() as conn:
        row = conn.execute("SELECT count(*) FROM outbox").fetchone()
    return int(row[0]) if row else 0


def _inbox_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM cdc_relay_inbox").fetchone()
    return int(row[0]) if row else 0


def _split_flood_and_kill(env: Env) -> None:
    relays = [env.start_relay(**_member(env, i)) for i in range(2)]
    for relay in relays:
        relay.wait_streaming()

    # 1. a flood into the root: every event once, each aggregate through one relay, in order
    flood = Flood(env, aggregates=40, batch=20, limit=4_000, pause=0.002).start()
    flood.wait_for(flood.limit)
    first = flood.stop()
    got: list[Delivery] = []
    _collect(env, got, lambda g: len(g) >= len(first), settle=1.0)
    verdict = verify(first, got, forbidden_ids=flood.rolled_back)
    assert verdict.duplicates == 0, f"no relay stopped, so nothing comes twice: {verdict}"
    partition = _partition_of(env)
    slot_of: dict[str, set[str]] = {}
    for d in got:
        slot_of.setdefault(d.body["aggregate_id"], set()).add(d.body["source"]["slot"])
    owner = {p: f"{env.name}_r{i}" for i, ps in enumerate(MEMBERS) for p in ps}
    for aggregate, slots in slot_of.items():
        assert slots == {owner[partition[aggregate]]}, (aggregate, partition[aggregate], slots)
    per_relay = {s: sum(1 for d in got if d.body["source"]["slot"] == s) for s in owner.values()}
    assert all(n > 0 for n in per_relay.values()), per_relay
    print(f"flood 1: {len(first)} events, {per_relay}")

    # 2. relay 0 killed mid-flood: its partitions wait, relay 1's keep flowing
    flood2 = Flood(env, aggregates=40, batch=20, limit=6_000, pause=0.002).start()
    flood2.wait_for(2_000)
    relays[0].kill()
    killed_at = len(flood2.committed) + flood2.batch  # a commit racing the kill is neither side
    flood2.wait_for(flood2.limit)
    second = flood2.stop()
    after_kill = second[killed_at:]
    partition = _partition_of(env)
    by_id = {}
    with env.sql() as conn:
        for event_id, aggregate in conn.execute("SELECT id::text, aggregateid FROM outbox"):
            by_id[str(event_id)] = owner[partition[str(aggregate)]]
    waiting = {i for i in after_kill if by_id[i] == f"{env.name}_r0"}
    flowing = {i for i in second if by_id[i] == f"{env.name}_r1"}
    assert waiting and len(flowing) > 1_000
    _collect(env, got, lambda g: flowing <= {d.message_id for d in g}, settle=1.5)
    arrived = {d.message_id for d in got}
    assert not (waiting & arrived), "relay 0 is down: its partitions' events must wait"
    assert not _slot_active(env, f"{env.name}_r0")
    status = json.loads(_ok(env, "status", "--json", **_member(env, 0)))
    assert status["active"] is False and status["lag_bytes"] > 0, status
    assert status["publication_tables"] == ["public.outbox_p0", "public.outbox_p2"]

    # 3. relay 0 again: the rest arrives, nothing lost, order of first deliveries kept
    restarted = env.start_relay(**_member(env, 0))
    restarted.wait_streaming()
    expected = first + second
    _collect(env, got, lambda g: set(expected) <= {d.message_id for d in g}, settle=1.0)
    verdict = verify(expected, got, forbidden_ids=flood.rolled_back | flood2.rolled_back)
    relay1_ids = [d.message_id for d in got if d.body["source"]["slot"] == f"{env.name}_r1"]
    assert len(relay1_ids) == len(set(relay1_ids)), "relay 1 never stopped: no duplicates"
    print(f"flood 2: {len(second)} events, {len(waiting)} waited for relay 0; {verdict}")
    assert restarted.terminate() == 0
    assert relays[1].terminate() == 0


def test_member_commands_read_only_their_partitions(env: Env) -> None:
    """backfill, replay, prune, recover and status on a member's config touch its partitions."""
    _ok(env, "init", "--create-outbox", "--partitions", str(COUNT))
    assert "nothing to create" in _ok(env, "init", "--create-outbox", "--partitions", "4")
    rows = [outbox_row(f"B-{i % 12}", i) for i in range(60)]
    with env.sql() as conn:
        insert_events(conn, rows)
    partition = _partition_of(env)
    mine = {
        r[0] for r in rows if partition[r[2]].removeprefix("public.") in MEMBERS[0]
    }  # relay 0's rows
    assert 0 < len(mine) < len(rows)
    env.bind_queue()

    # rows written before the member's slot: init --backfill of relay 0 sends exactly its own
    out = _ok(env, "init", "--backfill", **_member(env, 0))
    assert "no relay streams them: public.outbox_p1, public.outbox_p3" in out
    got = env.consume(len(mine), settle=1.0)
    assert sorted(d.message_id for d in got) == sorted(mine)
    assert all(d.body["source"]["snapshot"] for d in got)

    replayed = _ok(env, "replay", "--all", "--dry-run", **_member(env, 0))
    assert f"would replay {len(mine)} rows" in replayed

    # a member's slot dropped (as a failover would lose it): recover re-sends its rows only
    with env.sql() as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (f"{env.name}_r0",))
    _ok(env, "recover", "--since", "1h", **_member(env, 0))
    again = env.consume(len(mine), settle=1.0)
    assert sorted(d.message_id for d in again) == sorted(mine)

    pruned = _ok(env, "prune", "--older-than", "0s", **_member(env, 0))
    assert "public.outbox_p0: deleted" in pruned and "public.outbox_p2: deleted" in pruned
    with env.sql() as conn:
        left = {str(r[0]) for r in conn.execute("SELECT id::text FROM outbox")}
    assert left == {r[0] for r in rows} - mine, "prune of relay 0 keeps relay 1's rows"


def test_refusals_that_keep_a_split_from_dropping_or_doubling_events(env: Env) -> None:
    with env.sql() as conn:
        conn.execute("CREATE TABLE plain (id uuid PRIMARY KEY, aggregateid text)")
        conn.execute(
            "CREATE TABLE by_id (id uuid, aggregateid text, PRIMARY KEY (id)) "
            "PARTITION BY HASH (id)"
        )
    # the shape of an existing table is never adjusted
    text = _refused(env, "init", "--partitions", "4", outbox_table="public.plain")
    assert "outbox table public.plain exists and is not partitioned" in text
    text = _refused(env, "init", "--partitions", "4", outbox_table="public.by_id")
    assert "is partitioned by HASH (id), not HASH (aggregateid)" in text
    _ok(env, "init", "--create-outbox", "--partitions", str(COUNT))
    text = _refused(env, "init", "--partitions", "8")
    assert "has partition public.outbox_p0 (FOR VALUES WITH (modulus 4, remainder 0))" in text
    # a partition that does not exist is not created as a table no row would reach
    text = _refused(env, "init", "--create-outbox", outbox_table="public.outbox_p7")
    assert "public.outbox is partitioned: writers insert into public.outbox" in text
    # a root together with its own partition
    text = _refused(env, "init", outbox_table="public.outbox,public.outbox_p0")
    assert "lists public.outbox and its partition public.outbox_p0" in text

    _ok(env, "init", **_member(env, 0))
    # a second relay whose list overlaps the first one's
    text = _refused(
        env, "init", **_member(env, 1, outbox_table="public.outbox_p1,public.outbox_p2")
    )
    assert f"publication {env.name}_r0 covers public.outbox_p2" in text
    # a second relay that kept the first one's slot (a copied config) would skip its events
    text = _refused(env, "init", **_member(env, 1, slot=f"{env.name}_r0"))
    assert f"slot {env.name}_r0 belongs to publication {env.name}_r0 (its comment" in text
    # a relay over the root beside a member
    text = _refused(env, "init", slot="whole", publication="whole")
    assert f"publication {env.name}_r0 covers public.outbox_p0 (and this relay's" in text
    # a sibling partition in a member's publication: its rows would be read and dropped
    with env.sql() as conn:
        conn.execute(f'ALTER PUBLICATION "{env.name}_r0" ADD TABLE outbox_p1')
    relay = env.start_relay(**_member(env, 0))
    assert relay.proc.wait(30) == 1, relay.log()
    (error,) = [r["msg"] for r in _records(relay.log()) if r["level"] == "error"]
    assert "covers public.outbox_p1, a partition of public.outbox that outbox_table" in error
    fix = f'ALTER PUBLICATION "{env.name}_r0" SET TABLE "public"."outbox_p0", "public"."outbox_p2"'
    assert fix in error
    with env.sql() as conn:
        conn.execute(fix)
    relay = env.start_relay(**_member(env, 0))
    relay.wait_streaming()
    assert any(
        r["msg"].startswith("partitions of the outbox that no publication covers")
        and r["partitions"] == "public.outbox_p1, public.outbox_p3"
        for r in _records(relay.log())
    ), relay.log()
    assert relay.terminate() == 0
