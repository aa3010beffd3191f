"""Capacity faults: a broker that stops reading, a missing exchange, two relays on one slot, a busy
database with an idle outbox, and a large backlog. Each scenario measures what it claims (RSS,
takeover time, retained WAL, drain rate), prints the figures, and checks delivery with ``verify``
or the queue depth from an independent connection.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import uuid4

import psycopg
import pytest

from cdc_relay.lsn import Lsn
from tests.faults.checks import verify
from tests.integration.harness import Delivery, Env, Flood, insert_events, outbox_row

pytestmark = pytest.mark.integration

RSS_LIMIT_MB = 150.0
WAL_SENDER_TIMEOUT = 10.0  # tests/sandbox.py PG_SETTINGS
MB = 1024 * 1024
STREAMING = '"msg": "streaming"'
COPY_OUTBOX = "COPY outbox (id, aggregatetype, aggregateid, type, payload) FROM STDIN"
BULK_INSERT = (
    "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
    "SELECT gen_random_uuid(), 'order', 'BULK-' || (g %% 100), 'OrderPlaced', "
    "jsonb_build_object('seq', g, 'aggregate', 'BULK-' || (g %% 100), 'note', repeat('x', 100)) "
    "FROM generate_series(%s::bigint, %s::bigint) AS g"
)


# -- measuring -------------------------------------------------------------------------------------
def rss_mb(pid: int) -> float | None:
    """VmRSS of a live process in MB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds on a background thread."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_mb(self.pid)
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.interval)

    @property
    def peak(self) -> float:
        assert self.samples, f"no RSS sample of pid {self.pid}"
        return max(self.samples)


def slot_holder(env: Env) -> tuple[int | None, float | None]:
    """(active_pid of the slot, seconds since its walsender last got a status update)."""
    with env.sql() as c:
        row = c.execute(
            "SELECT s.active_pid, extract(epoch FROM now() - r.reply_time)::float8 "
            "FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid "
            "WHERE s.slot_name = %s",
            (env.name,),
        ).fetchone()
    assert row is not None, f"slot {env.name} is gone"
    return row[0], row[1]


def walsenders(env: Env) -> int:
    """Walsender backends connected to this test's database (only relays connect that way)."""
    with env.sql() as c:
        row = c.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'walsender' AND datname = %s",
            (env.dbname,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def slot_lag(conn: psycopg.Connection[tuple[Any, ...]], slot: str) -> tuple[int, int]:
    """(bytes between the current WAL and the slot's confirmed flush, current WAL as int)."""
    row = conn.execute(
        "SELECT pg_current_wal_lsn() - confirmed_flush_lsn, pg_current_wal_lsn() - '0/0'::pg_lsn "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.1
) -> float:
    """Poll ``predicate`` every ``every`` seconds; return the seconds it took, fail after
    ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - start


# -- writing ---------------------------------------------------------------------------------------
def commit_backlog(
    env: Env, prefix: str, total: int, per_tx: int, aggregates: int = 20
) -> tuple[list[str], list[int]]:
    """Commit ``total`` outbox rows with COPY, ``per_tx`` per transaction; payload seq rises per
    aggregate. Returns the ids in commit order and the WAL position after each commit."""
    ids: list[str] = []
    ends: list[int] = []
    seq: dict[str, int] = {}
    with env.sql() as conn:
        for start in range(0, total, per_tx):
            rows = []
            for i in range(start, min(total, start + per_tx)):
                agg = f"{prefix}{i % aggregates}"
                seq[agg] = seq.get(agg, -1) + 1
                rows.append(outbox_row(agg, seq[agg]))
            with conn.transaction(), conn.cursor() as cur, cur.copy(COPY_OUTBOX) as copy:
                for row in rows:
                    copy.write_row(row)
            ids.extend(r[0] for r in rows)
            end = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
            assert end is not None
            ends.append(int(end[0]))
    return ids, ends


def commit_bulk(env: Env, first: int, total: int, per_tx: int = 50_000) -> None:
    """Commit ``total`` generated outbox rows, ``per_tx`` per INSERT ... SELECT transaction."""
    with env.sql() as conn:
        for start in range(first, first + total, per_tx):
            conn.execute(BULK_INSERT, (start, min(first + total, start + per_tx) - 1))


def first_queued(env: Env) -> dict[str, Any]:
    """The body of the message at the head of the queue, left in place (not acked)."""
    with env.channel() as ch:
        method, _props, body = ch.basic_get(env.queue, auto_ack=False)
        assert method is not None, "queue is empty"
        ch.basic_nack(method.delivery_tag, requeue=True)
    result: dict[str, Any] = json.loads(body)
    return result


def delete_queue(env: Env) -> None:
    with env.channel() as ch:
        ch.queue_delete(env.queue)


def commit_lsn_of(deliveries: list[Delivery], event_id: str) -> int:
    for d in deliveries:
        if d.message_id == event_id:
            return int(Lsn.parse(d.body["source"]["commit_lsn"]))
    raise AssertionError(f"event {event_id} was not delivered")


# -- 1. broker memory alarm longer than wal_sender_timeout -----------------------------------------
def test_memory_alarm_keeps_replication_alive_and_memory_bounded(env: Env) -> None:
    started = time.monotonic()
    env.init()
    # status updates every 4 s: they must keep flowing on their own while the WAL is not read
    relay = env.start_relay(status_interval="4")
    relay.wait_streaming()
    pre = outbox_row("PRE", 0)
    with env.sql() as conn, conn.transaction(), conn.cursor() as cur, cur.copy(COPY_OUTBOX) as cp:
        cp.write_row(pre)
    assert [d.message_id for d in env.consume(1)] == [pre[0]]
    env.wait_for(lambda: env.slot_flush() >= env.current_lsn() - 200_000, what="slot catch-up")
    walsender_pid, _ = slot_holder(env)
    assert walsender_pid is not None
    flushed_before = env.slot_flush()
    holders: set[int | None] = set()
    staleness: list[float] = []
    flush_while_blocked: list[int] = []
    with RssSampler(relay.proc.pid) as rss:
        env.rabbit.block_publishers()
        try:
            time.sleep(0.5)
            ids, ends = commit_backlog(env, "MEM", 20_000, 500)
            blocked_from = time.monotonic()
            # longer than wal_sender_timeout, with ~20k events waiting behind the window
            while time.monotonic() - blocked_from < WAL_SENDER_TIMEOUT + 4:
                pid, stale = slot_holder(env)
                holders.add(pid)
                if stale is not None:
                    staleness.append(stale)
                flush_while_blocked.append(env.slot_flush())
                assert relay.proc.poll() is None, relay.log()
                time.sleep(1)
            rss_blocked = rss.peak
        finally:
            env.rabbit.unblock_publishers()
        drain_started = time.monotonic()
        got = env.consume(len(ids), timeout=120, settle=1.0)
        drain = time.monotonic() - drain_started
    verdict = verify(ids, got, flushed_before=flushed_before)
    first_commit = commit_lsn_of(got, ids[0])
    env.wait_for(lambda: env.slot_flush() >= ends[-1], what="slot to pass the backlog")
    log = relay.log()
    print(
        f"\n[memory alarm] {verdict}; blocked {WAL_SENDER_TIMEOUT + 4:.0f}s with 20000 waiting; "
        f"RSS peak blocked={rss_blocked:.1f} MB overall={rss.peak:.1f} MB "
        f"({len(rss.samples)} samples); walsender pids={holders}; reply staleness max="
        f"{max(staleness):.1f}s over {len(staleness)} samples; slot while blocked "
        f"{Lsn(min(flush_while_blocked))}..{Lsn(max(flush_while_blocked))} "
        f"(first blocked commit {Lsn(first_commit)}); drained in {drain:.1f}s; "
        f"total {time.monotonic() - started:.1f}s"
    )
    assert holders == {walsender_pid}, f"walsender changed or vanished: {holders}\n{log}"
    assert len(staleness) >= WAL_SENDER_TIMEOUT, "walsender missing from pg_stat_replication"
    assert max(staleness) < WAL_SENDER_TIMEOUT - 2, "status updates stopped while blocked"
    assert "broker blocked publishing" in log, "the memory alarm never reached the relay"
    assert "retrying" not in log, log
    assert log.count(STREAMING) == 1, log
    assert max(flush_while_blocked) >= flushed_before
    assert max(flush_while_blocked) <= first_commit, "slot advanced past unconfirmed events"
    assert rss.peak < RSS_LIMIT_MB
    assert relay.terminate() == 0


# -- 2. exchange deleted (and binding lost) while running ------------------------------------------
def bind(env: Env, alternate: bool) -> None:
    """(Re)declare the exchange as the relay would, the test queue, and its catch-all binding."""
    if alternate:
        env.bind_queue()
        return
    with env.channel() as ch:
        ch.exchange_declare(env.exchange, "topic", durable=True)
        ch.queue_declare(env.queue, durable=True)
        ch.queue_bind(env.queue, env.exchange, "#")


def drain_ids(env: Env, queue: str) -> list[str]:
    """Every message id waiting in ``queue`` (acked: taken out). Declared passively: the relay
    made the unroutable queue, as a quorum queue, and a classic re-declaration is refused."""
    ids: list[str] = []
    with env.channel() as ch:
        ch.queue_declare(queue, passive=True)
        while True:
            method, props, _body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return ids
            ids.append(str(props.message_id))


def reset_broker(env: Env) -> None:
    """Remove this test's exchange, queue and unroutable pair: both parametrizations share one
    (truncated) name, and an exchange keeps its arguments for as long as it exists."""
    with env.channel() as ch:
        for queue in (env.queue, f"{env.exchange}.unroutable"):
            ch.queue_delete(queue)
        for exchange in (env.exchange, f"{env.exchange}.unroutable"):
            ch.exchange_delete(exchange)


@pytest.mark.parametrize("alternate", ["true", "false"])
def test_exchange_deleted_and_unbound_mid_flood_loses_nothing(env: Env, alternate: str) -> None:
    """With the alternate exchange (default) events no binding matches are kept in
    ``<exchange>.unroutable``; without it they come back (mandatory) and are retried. Either way
    every committed event reaches a queue: lost = 0 over the test queue plus the kept ones."""
    started = time.monotonic()
    keep = alternate == "true"
    reset_broker(env)
    assert env.cli("init", "--create-outbox").returncode == 0
    bind(env, keep)
    relay = env.start_relay(alternate_exchange=alternate)
    relay.wait_streaming()
    flood = Flood(env, aggregates=20, batch=50, limit=40_000, pause=0.01).start()
    try:
        flood.wait_for(2_000)
        env.wait_for(lambda: env.queue_depth() > 0, what="first deliveries")
        flushed_before = env.slot_flush()
        with env.channel() as ch:
            ch.exchange_delete(env.exchange)
        # publishes to the missing exchange close the relay's channel (404): the session ends,
        # the relay re-declares the exchange and resumes from the slot
        wait_until(lambda: "NOT_FOUND" in relay.log(), 15, "the relay to hit the missing exchange")
        bind(env, keep)  # the binding went with the exchange
        deleted_at = len(flood.committed)
        flood.wait_for(deleted_at + 2_000)
        # the exchange exists but nothing is bound for a moment: every event is unroutable
        with env.channel() as ch:
            ch.queue_unbind(env.queue, env.exchange, "#")
        unbound_at = len(flood.committed)
        flood.wait_for(unbound_at + 500)
        signal = "unroutable events kept" if keep else "broker returned an unroutable message"
        wait_until(lambda: signal in relay.log(), 15, signal)
        bind(env, keep)
        flood.wait_for(len(flood.committed) + 2_000)
    finally:
        committed = flood.stop()
    end = env.current_lsn()
    env.wait_for(lambda: env.slot_flush() >= end, timeout=60, what="every event confirmed")
    kept = drain_ids(env, f"{env.exchange}.unroutable") if keep else []
    got = env.consume(len(set(committed) - set(kept)), timeout=120, settle=1.5)
    # kept events are accounted for there; the test queue must hold every other one, in order
    delivered = {d.message_id for d in got}
    kept_only = set(kept) - delivered
    allowed = set(committed) | flood.uncertain
    assert set(kept) <= allowed, "the unroutable queue holds events that were never committed"
    assert not set(kept) & flood.rolled_back
    verdict = verify(
        [i for i in committed if i not in kept_only],
        got,
        flushed_before=flushed_before,
        forbidden_ids=flood.rolled_back,
        uncertain_ids=flood.uncertain,
    )
    log = relay.log()
    print(
        f"\n[exchange deleted, alternate_exchange={alternate}] {verdict}; committed "
        f"{len(committed)} = {len(committed) - len(kept_only)} in the test queue + "
        f"{len(kept_only)} kept in {env.exchange}.unroutable ({len(kept)} messages there); "
        f"sessions={log.count(STREAMING)} retries={log.count('retrying after failure')} "
        f"returns={log.count('broker returned an unroutable')} "
        f"not_found={log.count('NOT_FOUND')}; total {time.monotonic() - started:.1f}s"
    )
    assert relay.proc.poll() is None, log
    assert log.count(STREAMING) >= 2, "the relay never restarted its session"
    if not keep:
        assert not kept
    assert relay.terminate() == 0
    reset_broker(env)


# -- 3. a second relay on the same slot is a standby -----------------------------------------------
def test_second_instance_is_standby_and_takes_over_after_kill(env: Env) -> None:
    started = time.monotonic()
    env.init()
    a = env.start_relay()
    a.wait_streaming()
    pid_a, _ = slot_holder(env)
    assert pid_a is not None
    b = env.start_relay(reconnect_max="5")
    wait_until(lambda: "standby" in b.log(), 20, "relay B to report standby")
    flood = Flood(env, aggregates=20, batch=50, limit=40_000, pause=0.01).start()
    try:
        flood.wait_for(1_000)
        holders: set[int | None] = set()
        counts: set[int] = set()
        observe_until = time.monotonic() + 7  # B retries at least twice with reconnect_max=5
        while time.monotonic() < observe_until:
            holders.add(slot_holder(env)[0])
            counts.add(walsenders(env))
            assert b.proc.poll() is None, b.log()
            time.sleep(0.25)
        standby_tries = sum("standby" in line for line in b.log().splitlines())
        assert holders == {pid_a}, f"slot holders while A runs: {holders}"
        assert counts == {1}, f"walsenders for the database: {counts}"
        assert STREAMING in a.log()
        assert STREAMING not in b.log(), b.log()
        assert standby_tries >= 2, b.log()
        flushed_before = env.slot_flush()
        a.kill()
        killed = time.monotonic()
        during: set[int] = set()
        while STREAMING not in b.log():
            during.add(walsenders(env))
            assert time.monotonic() - killed < 20, f"B did not take over:\n{b.log()}"
            assert b.proc.poll() is None, b.log()
            time.sleep(0.1)
        takeover = time.monotonic() - killed
        flood.wait_for(len(flood.committed) + 2_000)
    finally:
        committed = flood.stop()
    pid_b, _ = slot_holder(env)
    after = walsenders(env)
    got = env.consume(len(committed), timeout=120, settle=1.5)
    verdict = verify(
        committed,
        got,
        flushed_before=flushed_before,
        forbidden_ids=flood.rolled_back,
        uncertain_ids=flood.uncertain,
    )
    print(
        f"\n[standby] {verdict}; B standby attempts before kill={standby_tries}; "
        f"takeover {takeover:.2f}s after kill -9 of A; walsenders during takeover={during} "
        f"after={after}; slot pid A={pid_a} B={pid_b}; total {time.monotonic() - started:.1f}s"
    )
    assert takeover < 15
    assert max(during, default=0) <= 1
    assert after == 1
    assert pid_b is not None and pid_b != pid_a
    assert b.terminate() == 0


# -- 4. idle outbox beside heavy writes in this and another database -------------------------------
def _pgbench_like(dsn: str, deadline: float, errors: list[BaseException]) -> None:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS bench_accounts (aid int PRIMARY KEY, balance int)"
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS bench_history "
                "(id bigserial PRIMARY KEY, aid int, delta int, filler text)"
            )
            conn.execute(
                "INSERT INTO bench_accounts SELECT g, 0 FROM generate_series(1, 10000) g "
                "ON CONFLICT DO NOTHING"
            )
            n = 0
            while time.monotonic() < deadline:
                n += 1
                with conn.transaction():
                    conn.execute(
                        "UPDATE bench_accounts SET balance = balance + 1 WHERE aid = %s",
                        (n * 7919 % 10000 + 1,),
                    )
                    conn.execute(
                        "INSERT INTO bench_history (aid, delta, filler) "
                        "SELECT g, 1, repeat('h', 200) FROM generate_series(1, 500) g"
                    )
                if n % 200 == 0:
                    conn.execute("TRUNCATE bench_history")
    except BaseException as exc:
        errors.append(exc)


def test_idle_outbox_beside_busy_databases_retains_little_wal(env: Env) -> None:
    """Idle WAL is confirmed only up to the last publication check (so a publication change
    can never let keepalives carry the slot past rows pgoutput stopped sending): what the slot
    retains is bounded by the WAL written in about one check interval."""
    started = time.monotonic()
    env.init()
    interval = 0.25
    relay = env.start_relay(publication_check_interval=str(interval))
    relay.wait_streaming()
    other = f"{env.name}_other"
    with psycopg.connect(env.pg.url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{other}"')
    try:
        lags: list[int] = []
        errors: list[BaseException] = []
        duration = 25.0
        with env.sql() as conn:
            first_lag, start_lsn = slot_lag(conn, env.name)
            deadline = time.monotonic() + duration
            writers = [
                threading.Thread(target=_pgbench_like, args=(dsn, deadline, errors), daemon=True)
                for dsn in (env.dsn, env.dsn.rsplit("/", 1)[0] + "/" + other)
            ]
            for w in writers:
                w.start()
            while time.monotonic() < deadline:
                lags.append(slot_lag(conn, env.name)[0])
                time.sleep(1)
            for w in writers:
                w.join(30)
            assert not errors, errors
            _, end_lsn = slot_lag(conn, env.name)
            settled = wait_until(
                lambda: slot_lag(conn, env.name)[0] < 4 * MB, 20, "the slot to catch up"
            )
            final_lag, _ = slot_lag(conn, env.name)
    finally:
        with psycopg.connect(env.pg.url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')
    total = end_lsn - start_lsn
    print(
        f"\n[idle outbox] WAL written {total / MB:.0f} MB in {duration:.0f}s "
        f"({total / MB / duration:.1f} MB/s); retained by the slot: start "
        f"{first_lag / MB:.2f} MB, max {max(lags) / MB:.2f} MB, mean "
        f"{sum(lags) / len(lags) / MB:.2f} MB over {len(lags)} samples; final "
        f"{final_lag / MB:.2f} MB ({settled:.1f}s after the writers stopped); "
        f"total {time.monotonic() - started:.1f}s"
    )
    assert total > 10 * 64 * MB, "the load did not write enough WAL to mean anything"
    # one check interval of WAL, plus the status round trip, plus the old 64 MB margin
    bound = 64 * MB + total / duration * (interval + 0.5)
    assert max(lags) < bound, f"retained {max(lags) / MB:.0f} MB > {bound / MB:.0f} MB"
    assert final_lag < 4 * MB
    assert env.queue_depth() == 0, "an idle outbox published something"
    log = relay.log()
    assert "retrying" not in log, log
    assert relay.terminate() == 0


# -- 5. bounded memory while draining a large backlog ----------------------------------------------
def test_large_backlog_drains_with_bounded_memory(env: Env) -> None:
    started = time.monotonic()
    env.init()
    try:
        t0 = time.monotonic()
        commit_bulk(env, 0, 300_000)
        written = time.monotonic() - t0
        relay = env.start_relay()
        t0 = time.monotonic()
        with RssSampler(relay.proc.pid) as rss:
            relay.wait_streaming()
            streaming_after = time.monotonic() - t0
            # one AMQP connection per poll: poll gently, the broker shares the two cores
            wait_until(lambda: env.queue_depth() >= 300_000, 180, "300000 events in the queue", 0.5)
            drain = time.monotonic() - t0
        time.sleep(1.0)
        depth = env.queue_depth()
        print(
            f"\n[backlog] 300000 events committed in {written:.1f}s; relay streaming after "
            f"{streaming_after:.1f}s, queue full after {drain:.1f}s = "
            f"{300_000 / drain:.0f} events/s; RSS peak {rss.peak:.1f} MB "
            f"({len(rss.samples)} samples); depth {depth}"
        )
        assert rss.peak < RSS_LIMIT_MB
        assert depth == 300_000, "a clean drain duplicated events"
        assert relay.terminate() == 0
        with env.channel() as ch:
            ch.queue_purge(env.queue)

        # blocked variant: the broker refuses to read while 100k events wait
        commit_bulk(env, 300_000, 100_000)
        behind = env.current_lsn()
        flushed_before = env.slot_flush()
        flushes: list[int] = []
        env.rabbit.block_publishers()
        try:
            blocked = env.start_relay()
            with RssSampler(blocked.proc.pid) as rss_blocked:
                blocked.wait_streaming()
                until = time.monotonic() + 15
                while time.monotonic() < until:
                    flushes.append(env.slot_flush())
                    assert blocked.proc.poll() is None, blocked.log()
                    time.sleep(0.5)
        finally:
            env.rabbit.unblock_publishers()
        t0 = time.monotonic()
        wait_until(lambda: env.queue_depth() >= 100_000, 120, "100000 events in the queue", 0.5)
        drain_blocked = time.monotonic() - t0
        time.sleep(1.0)
        depth = env.queue_depth()
        head = first_queued(env)
        first_commit = int(Lsn.parse(head["source"]["commit_lsn"]))
        env.wait_for(lambda: env.slot_flush() >= behind, what="slot to pass the 100k backlog")
        print(
            f"[backlog, blocked] RSS peak over 15s blocked {rss_blocked.peak:.1f} MB "
            f"({len(rss_blocked.samples)} samples); slot {Lsn(flushed_before)} -> "
            f"max {Lsn(max(flushes))} while blocked (first commit {Lsn(first_commit)}); "
            f"drained 100000 in {drain_blocked:.1f}s after unblock "
            f"({100_000 / drain_blocked:.0f} events/s); depth {depth}; "
            f"total {time.monotonic() - started:.1f}s"
        )
        assert rss_blocked.peak < RSS_LIMIT_MB
        assert head["payload"]["seq"] == 300_000, "the queue does not start at the backlog"
        assert max(flushes) <= first_commit, "slot advanced past unconfirmed events"
        assert depth == 100_000
        assert "broker blocked publishing" in blocked.log()
        assert "retrying" not in blocked.log(), blocked.log()
        assert blocked.terminate() == 0
    finally:
        delete_queue(env)


# -- 6. large events while the broker is blocked: memory bounded in bytes --------------------------
def test_large_events_while_blocked_stay_within_the_byte_window(env: Env) -> None:
    """40 events of 2 MB wait behind a memory alarm; the byte window, not the 2,000-message
    window, decides how many sit in the relay. Without it ~80 MB of bodies (several copies
    each) would be held."""
    env.init()
    window = 8 * MB
    relay = env.start_relay(max_in_flight_bytes=str(window), status_interval="4")
    relay.wait_streaming()
    blob = "x" * (2 * MB)
    rows = [
        (str(uuid4()), "order", "BIG", "OrderPlaced", json.dumps({"seq": i, "blob": blob}))
        for i in range(40)
    ]
    with RssSampler(relay.proc.pid, interval=0.25) as rss:
        baseline = rss_mb(relay.proc.pid) or 0.0
        env.rabbit.block_publishers()
        try:
            time.sleep(0.5)
            for row in rows:
                with env.sql() as conn, conn.transaction():
                    insert_events(conn, [row])
            time.sleep(6)
            assert relay.proc.poll() is None, relay.log()
            blocked_peak = rss.peak
        finally:
            env.rabbit.unblock_publishers()
        got = env.consume(len(rows), timeout=120, settle=1.0)
    verdict = verify([r[0] for r in rows], got)
    print(
        f"\n[byte window] 40 x 2 MB behind a memory alarm, max_in_flight_bytes 8 MiB: RSS "
        f"baseline {baseline:.1f} MB, peak while blocked {blocked_peak:.1f} MB, overall "
        f"{rss.peak:.1f} MB; {verdict}"
    )
    # the window holds at most 8 MiB of bodies plus one event; each lives in a few copies
    assert blocked_peak < baseline + 60, f"RSS grew by {blocked_peak - baseline:.1f} MB"
    assert relay.terminate() == 0
