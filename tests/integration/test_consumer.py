"""The inbox consumer (`cdc-relay consume`) against the real servers: exactly once under kill -9
of consumer and relay, the ordering guard, poison messages and bodies that are not envelopes.
The consumer's database is a second database on the suite's server; what the handler applied is
checked there, in its own table."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import psycopg
import pytest

from tests.integration.harness import REPO, Env, Flood, inbox_database, insert_events, outbox_row

pytestmark = pytest.mark.integration


@pytest.fixture
def inbox_dsn(env: Env) -> Iterator[str]:
    with inbox_database(env.pg, env.dbname) as dsn:
        yield dsn


class ConsumerProc:
    def __init__(
        self,
        env: Env,
        dsn: str,
        handler: str,
        extra_env: dict[str, str] | None = None,
        **settings: str,
    ) -> None:
        proc_env = env.relay_env(inbox_dsn=dsn, **settings)
        del proc_env["CDC_RELAY_PG_DSN"]  # `consume` needs no source database (unless it audits)
        proc_env.update(extra_env or {})
        self.log_path = env.tmp / f"consumer-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cdc_relay.cli",
                "consume",
                "--queue",
                env.queue,
                "--handler",
                f"tests.integration.handlers:{handler}",
            ],
            env=proc_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_consuming(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while '"msg": "consuming"' not in self.log():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def terminate(self) -> int:
        self.proc.terminate()
        code = self.proc.wait(30)
        self._log.close()
        return code


def _applied(dsn: str) -> list[tuple[str, str, int | None]]:
    with psycopg.connect(dsn) as conn:
        return [
            (str(r[0]), str(r[1]), r[2])
            for r in conn.execute(
                "SELECT event_id, aggregate_id, seq FROM applied_events ORDER BY n"
            )
        ]


def _outcomes(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        return {
            str(r[0]): str(r[1]) for r in conn.execute("SELECT id, outcome FROM cdc_relay_inbox")
        }


def test_kill_9_of_consumer_and_relay_during_a_flood_applies_each_event_once(
    env: Env, inbox_dsn: str
) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    rng = random.Random(7)
    flood = Flood(env, aggregates=20, batch=50, limit=50_000, pause=0.03).start()
    # the first consumer dies between a commit and its ack (the worst moment): at its 40th
    # commit, a batch of up to consumer_batch events
    consumer = ConsumerProc(env, inbox_dsn, "record", failpoints="consumer.after_commit=40")
    consumer.wait_consuming()
    kills = relay_kills = 0
    while len(flood.committed) < flood.limit and (kills < 5 or relay_kills < 3):
        time.sleep(rng.uniform(0.5, 1.5))
        if kills < 5:
            consumer.kill()
            kills += 1
            consumer = ConsumerProc(env, inbox_dsn, "record")
            consumer.wait_consuming()
        if relay_kills < 3 and kills % 2 == 1:
            relay.kill()
            relay_kills += 1
            relay = env.start_relay()
            relay.wait_streaming()
    during = len(flood.committed)
    flood.wait_for(flood.limit, timeout=180)  # every kill came before the flood's end
    expected = flood.stop()
    assert kills == 5 and relay_kills == 3 and during < flood.limit, (kills, relay_kills, during)
    assert len(expected) == flood.limit

    def drained() -> bool:
        return len({e for e, _, _ in _applied(inbox_dsn)}) >= len(expected)

    env.wait_for(drained, timeout=240, what="every committed event applied")
    env.wait_for(lambda: env.queue_depth() == 0, timeout=60, what="the queue to drain")
    assert consumer.terminate() == 0
    assert relay.terminate() == 0
    applied = _applied(inbox_dsn)
    ids = [e for e, _, _ in applied]
    assert len(ids) == len(set(ids)), "an event was applied twice"
    assert set(ids) == set(expected) - flood.rolled_back
    last: dict[str, int] = {}
    for _event, aggregate, seq in applied:
        assert seq is not None and seq > last.get(aggregate, -1), (aggregate, seq)
        last[aggregate] = seq
    outcomes = _outcomes(inbox_dsn)
    assert set(outcomes.values()) == {"applied"}
    print(
        f"{len(expected)} events, consumer killed 5 times and relay 3 times in the first "
        f"{during}: each applied once"
    )


def _envelope(aggregate: str, commit_lsn: str, lsn: str, seq: int, **source: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "id": str(uuid.uuid4()),
        "aggregate_type": "order",
        "aggregate_id": aggregate,
        "type": "OrderPlaced",
        "payload": {"seq": seq},
        "occurred_at": None,
        "committed_at": "2026-11-29T06:00:00Z",
        "source": {
            "lsn": lsn,
            "commit_lsn": commit_lsn,
            "txid": 1,
            "slot": "s",
            "database": "d",
            **source,
        },
    }


def _publish(env: Env, bodies: list[bytes]) -> None:
    with env.channel() as ch:
        for body in bodies:
            ch.basic_publish(
                "", env.queue, body, pika.BasicProperties(delivery_mode=2, message_id="m")
            )


@pytest.mark.parametrize("policy", ["skip", "park", "apply"])
def test_an_older_event_after_a_newer_one_follows_the_ordering_policy(
    env: Env, inbox_dsn: str, policy: str
) -> None:
    env.bind_queue()
    newer = _envelope("A", "0/2000", "0/1F00", 2)
    older = _envelope("A", "0/1000", "0/0F00", 1)  # a redelivery that overtook, say
    backfilled = [
        _envelope("B", "0/3000", "0/3000", i, snapshot=True) for i in range(3)
    ]  # one snapshot: equal positions, all applied
    replayed = _envelope("C", "0/0", "0/0", 0, snapshot=True)  # C has nothing: fills the gap
    _publish(env, [json.dumps(e).encode() for e in (newer, older, *backfilled, replayed)])
    consumer = ConsumerProc(env, inbox_dsn, "record", ordering_policy=policy)
    consumer.wait_consuming()
    env.wait_for(lambda: len(_outcomes(inbox_dsn)) == 6, timeout=30, what="six events taken")
    env.wait_for(lambda: env.queue_depth() == 0, timeout=30, what="all acked")
    assert consumer.terminate() == 0
    applied = [e for e, _, _ in _applied(inbox_dsn)]
    outcomes = _outcomes(inbox_dsn)
    assert [e["id"] for e in backfilled] == [
        i for i in applied if i in {b["id"] for b in backfilled}
    ]
    assert replayed["id"] in applied and newer["id"] in applied
    expected = {"skip": "skipped", "park": "parked", "apply": "applied"}[policy]
    assert outcomes[older["id"]] == expected
    assert (older["id"] in applied) is (policy == "apply")
    with psycopg.connect(inbox_dsn) as conn:
        parked = [r[0] for r in conn.execute("SELECT id FROM cdc_relay_inbox_parked")]
    assert parked == ([older["id"]] if policy == "park" else [])


def test_poison_messages_go_to_the_dead_letter_exchange_and_the_rest_is_applied(
    env: Env, inbox_dsn: str
) -> None:
    env.bind_queue()
    dlx, dlq = f"{env.exchange}.dlx", f"{env.queue}.dlq"
    with env.channel() as ch:
        ch.exchange_declare(dlx, "fanout", durable=True)
        ch.queue_declare(dlq, durable=True)
        ch.queue_bind(dlq, dlx)
    good = [_envelope("OK", f"0/{1000 + i:X}", f"0/{1000 + i:X}", i) for i in range(5)]
    poison = _envelope("POISON", "0/9000", "0/9000", 0)
    bodies = [json.dumps(e).encode() for e in good[:2]]
    bodies += [json.dumps(poison).encode(), b"{not json", b'{"v": 2, "id": "x"}']
    bodies += [json.dumps(e).encode() for e in good[2:]]
    _publish(env, bodies)
    consumer = ConsumerProc(env, inbox_dsn, "poison", dead_letter_exchange=dlx, handler_retries="2")
    consumer.wait_consuming()
    env.wait_for(lambda: len(_applied(inbox_dsn)) == 5, timeout=60, what="the good events")
    env.wait_for(lambda: env.queue_depth() == 0, timeout=30, what="nothing left in the queue")
    assert consumer.proc.poll() is None, "a poison message must not stop the consumer"
    assert consumer.terminate() == 0
    assert [e for e, _, _ in _applied(inbox_dsn)] == [e["id"] for e in good]
    dead: list[tuple[bytes, dict[str, Any]]] = []
    with env.channel() as ch:
        while True:
            method, props, body = ch.basic_get(dlq, auto_ack=True)
            if method is None:
                break
            dead.append((body, dict(props.headers or {})))
    assert len(dead) == 3
    reasons = {body: headers["x-cdc-relay-error"] for body, headers in dead}
    assert "cannot apply this one" in str(reasons[json.dumps(poison).encode()])
    assert "not a v1 envelope" in str(reasons[b"{not json"])
    assert "not a v1 envelope" in str(reasons[b'{"v": 2, "id": "x"}'])
    log = consumer.log()
    assert log.count("handler failed; message dead-lettered") == 1
    assert poison["id"] not in _outcomes(inbox_dsn), "a rolled-back attempt leaves no inbox row"


def _port(log: str) -> int:
    for line in log.splitlines():
        if '"msg": "http endpoints listening"' in line:
            return int(json.loads(line)["port"])
    raise AssertionError(f"no http port in:\n{log}")


def test_a_stalled_consumer_warns_once_and_exports_the_age(env: Env, inbox_dsn: str) -> None:
    """Events wait while the consumer is stopped; applied later than alert_latency (1 s here)
    after their commit, they raise one warning and the age histogram and gauge show it."""
    import urllib.request

    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    with env.sql() as conn:
        insert_events(conn, [outbox_row("LATE", i) for i in range(5)])
    env.wait_for(lambda: env.queue_depth() == 5, timeout=30, what="five events queued")
    time.sleep(2.5)  # the consumer is "stalled": not running
    import socket

    with socket.socket() as s:  # amqp_url's first node answers nothing: the second is used
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    consumer = ConsumerProc(
        env,
        inbox_dsn,
        "record",
        alert_latency="1",
        amqp_url=f"amqp://guest:guest@127.0.0.1:{dead}/%2F,{env.rabbit.amqp_url}",
    )
    consumer.wait_consuming()
    consuming = next(
        json.loads(line) for line in consumer.log().splitlines() if '"msg": "consuming"' in line
    )
    assert consuming["broker"] == f"amqp://127.0.0.1:{env.rabbit.port}//"
    env.wait_for(lambda: len(_applied(inbox_dsn)) == 5, timeout=30, what="the late events")
    port = _port(consumer.log())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert resp.status == 200
    assert consumer.terminate() == 0
    assert relay.terminate() == 0
    log = consumer.log()
    assert log.count("consumer behind: event applied later than threshold") == 1, log
    assert f'cdc_relay_consumer_age_seconds_count{{queue="{env.queue}"}} 5.0' in metrics
    assert f'cdc_relay_consumer_age_alert{{queue="{env.queue}"}} 1.0' in metrics
    assert (
        f'cdc_relay_consumer_events_total{{outcome="applied",queue="{env.queue}"}} 5.0' in metrics
    )


def test_audit_names_a_lost_message_and_repair_brings_it_back(env: Env, inbox_dsn: str) -> None:
    """A message removed from the queue: the audit names that id and its window (exit 1);
    with the default guard a replay of it is held (older than what its aggregate applied);
    with ordering_policy = apply, --repair heals the consumer and the audit agrees (exit 0)."""
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    with env.sql() as conn:
        insert_events(conn, [outbox_row(f"AUD-{i % 3}", i // 3) for i in range(30)])
    env.wait_for(lambda: env.queue_depth() == 30, timeout=30, what="30 events queued")
    with env.channel() as ch:  # lost: taken off the queue before any consumer saw it
        method, props, _body = ch.basic_get(env.queue, auto_ack=True)
    assert method is not None
    lost = str(props.message_id)
    consumer = ConsumerProc(env, inbox_dsn, "record")
    consumer.wait_consuming()
    env.wait_for(lambda: len(_applied(inbox_dsn)) == 29, timeout=30, what="29 applied")
    audit_env = env.relay_env(inbox_dsn=inbox_dsn)
    args = ("audit", "--since", "1h", "--settle", "0s")
    found = env.cli(*args, env=audit_env)
    assert found.returncode == 1, found.stdout + found.stderr
    assert "1 windows differ" in found.stdout and f"missing {lost}" in found.stdout
    as_json = env.cli(*args, "--json", env=audit_env)
    assert as_json.returncode == 1
    (window,) = json.loads(as_json.stdout)["drift"]
    assert window["missing"] == [lost] and window["unexpected"] == []
    assert window["source"] == 30 and window["inbox"] == 29

    # the default guard holds the replay: its aggregate already has newer events applied
    held = env.cli(*args, "--repair", env=audit_env)
    assert held.returncode == 1, held.stdout + held.stderr
    assert "repair: replayed 1 of 1 missing events" in held.stdout
    assert f"skipped or parked by the ordering guard: {lost}" in held.stdout
    assert consumer.terminate() == 0
    with psycopg.connect(inbox_dsn, autocommit=True) as conn:  # let the operator's choice apply it
        conn.execute("DELETE FROM cdc_relay_inbox WHERE id = %s", (lost,))
    consumer = ConsumerProc(env, inbox_dsn, "record", ordering_policy="apply")
    consumer.wait_consuming()
    healed = env.cli(*args, "--repair", env=audit_env, timeout=180)
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert "agree" in healed.stdout
    assert lost in {e for e, _, _ in _applied(inbox_dsn)}
    assert consumer.terminate() == 0
    assert relay.terminate() == 0


def test_writer_relay_and_consumer_show_as_one_trace(env: Env, inbox_dsn: str) -> None:
    from tests.integration.harness import OtlpReceiver

    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    otlp = OtlpReceiver()
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    try:
        env.init()
        relay = env.start_relay_with_env(otel)
        relay.wait_streaming()
        with psycopg.connect(env.dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, traceparent) "
                "VALUES (gen_random_uuid(), 'order', 'T', 'OrderPlaced', '{\"seq\": 0}', %s)",
                (f"00-{trace_id}-{parent}-01",),
            )
        traced = ConsumerProc(
            env, inbox_dsn, "record", extra_env={**otel, "OTEL_SERVICE_NAME": "warehouse"}
        )
        env.wait_for(lambda: len(_applied(inbox_dsn)) == 1, timeout=30, what="the event applied")
        assert traced.terminate() == 0
        assert relay.terminate() == 0

        def spans() -> dict[str, Any]:
            return {s.name: s for s in otlp.spans if s.trace_id.hex() == trace_id}

        env.wait_for(lambda: len(spans()) >= 2, timeout=20, what="both spans exported")
        found = spans()
        publish = found[f"publish {env.exchange}"]
        process = found[f"process {env.queue}"]
        assert publish.parent_span_id.hex() == parent
        assert process.parent_span_id == publish.span_id
        assert process.kind == 5  # SPAN_KIND_CONSUMER
    finally:
        otlp.close()


def _deleting_writes(env: Env, transactions: int, size: int, tag: str) -> list[str]:
    """Transactions that insert their events and delete them at once, as an application that
    keeps no outbox rows does: only the WAL (and so the ledger) knows they existed."""
    ids = []
    with env.sql() as conn:
        for t in range(transactions):
            rows = [outbox_row(f"{tag}-{t}", i) for i in range(size)]
            with conn.transaction():
                insert_events(conn, rows)
                conn.execute(
                    "DELETE FROM outbox WHERE id = ANY(%s::uuid[])", ([r[0] for r in rows],)
                )
            ids += [r[0] for r in rows]
    return ids


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def _metrics(log: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{_port(log)}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def test_the_ledger_counts_each_confirmed_transaction_once_and_audits_deleted_rows(
    env: Env, inbox_dsn: str
) -> None:
    """ledger = true: one ledger row per transaction, also when the relay streams them all a
    second time (killed before it told the slot); an audit against the ledger agrees with the
    consumer although the application deleted its rows, names the transaction a lost message
    belonged to (exit 1), and the consumer's periodic audit exports and warns about it once."""
    env.init()
    ledger_env = {"CDC_RELAY_LEDGER": "true"}
    # the slot is kept where it is: a restart streams every confirmed transaction again
    relay = env.start_relay_with_env({**ledger_env, "CDC_RELAY_FAILPOINTS": "status.no_flush"})
    relay.wait_streaming()
    with env.sql() as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        before = str(row[0])
        for t in range(20):
            insert_events(conn, [outbox_row(f"KEEP-{t}", i) for i in range(5)])
    deleted = _deleting_writes(env, transactions=10, size=5, tag="GONE")
    assert len(deleted) == 50
    consumer = ConsumerProc(env, inbox_dsn, "record")
    consumer.wait_consuming()
    env.wait_for(lambda: len(_applied(inbox_dsn)) == 150, timeout=60, what="150 applied")

    def ledger_totals() -> tuple[int, int]:
        with env.sql() as conn:
            row = conn.execute(
                "SELECT count(*), coalesce(sum(events), 0) FROM cdc_relay_ledger WHERE slot = %s",
                (env.name,),
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    env.wait_for(lambda: ledger_totals() == (30, 150), timeout=30, what="the ledger written")
    with env.sql() as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn <= %s::pg_lsn FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (before, env.name),
        ).fetchone()
    assert row is not None and row[0] is True, "the slot moved: nothing would be streamed again"
    relay.kill()
    relay = env.start_relay_with_env(ledger_env)
    relay.wait_streaming()
    env.wait_for(
        lambda: (
            _metric(_metrics(consumer.log()), 'cdc_relay_consumer_events_total{outcome="duplicate"')
            >= 150
        ),
        timeout=60,
        what="every event delivered a second time",
    )
    env.wait_for(
        lambda: _metric(_metrics(relay.log()), "cdc_relay_ledger_rows_total") >= 30,
        timeout=30,
        what="the second relay's ledger writes",
    )
    assert ledger_totals() == (30, 150)  # streamed twice, recorded once
    with psycopg.connect(inbox_dsn) as conn:
        hashes = conn.execute(
            "SELECT commit_lsn::text, count(*), bit_xor(('x' || substr(md5(id), 1, 16))::bit(64)"
            "::bigint) FROM cdc_relay_inbox GROUP BY 1"
        ).fetchall()
    with env.sql() as conn:
        recorded = conn.execute(
            "SELECT commit_lsn::text, events, ids_hash FROM cdc_relay_ledger WHERE slot = %s",
            (env.name,),
        ).fetchall()
    assert sorted(hashes) == sorted(recorded)  # the relay's hash is the audit's SQL hash

    audit_env = env.relay_env(inbox_dsn=inbox_dsn, ledger="true")
    args = ("audit", "--since", "1h", "--settle", "0s")
    agreed = env.cli(*args, env=audit_env)
    assert agreed.returncode == 0, agreed.stdout + agreed.stderr
    assert "150 source events (ledger)" in agreed.stdout and "agree" in agreed.stdout
    outbox_side = env.cli(*args, "--source", "outbox", env=audit_env)
    assert outbox_side.returncode == 1  # the deleted rows are only in the ledger

    # a lost message of a transaction whose rows are gone
    assert consumer.terminate() == 0
    _deleting_writes(env, transactions=1, size=3, tag="LOST")
    env.wait_for(lambda: env.queue_depth() == 3, timeout=30, what="three events queued")
    with env.channel() as ch:
        method, _props, body = ch.basic_get(env.queue, auto_ack=True)
    assert method is not None
    commit_lsn = json.loads(body)["source"]["commit_lsn"]
    watching = ConsumerProc(
        env,
        inbox_dsn,
        "record",
        extra_env={"CDC_RELAY_PG_DSN": env.dsn},
        ledger="true",
        audit_interval="1",
        audit_settle="0",
    )
    watching.wait_consuming()
    env.wait_for(lambda: len(_applied(inbox_dsn)) == 152, timeout=30, what="two more applied")
    env.wait_for(lambda: ledger_totals() == (31, 153), timeout=30, what="its ledger row")
    found = env.cli(*args, env=audit_env)
    assert found.returncode == 1, found.stdout + found.stderr
    assert f"transaction {commit_lsn}: source 3 events, inbox 2 applied" in found.stdout
    as_json = json.loads(env.cli(*args, "--json", env=audit_env).stdout)
    assert as_json["source"] == "ledger"
    (window,) = as_json["drift"]
    assert window["transactions"] == [{"commit_lsn": commit_lsn, "source": 3, "inbox": 2}]
    repair = env.cli(*args, "--repair", env=audit_env)
    assert repair.returncode == 1 and "the ledger keeps no ids" in repair.stdout

    def warned() -> bool:
        return "audit: the inbox differs from the source" in watching.log()

    env.wait_for(warned, timeout=30, what="the periodic audit's warning")
    time.sleep(2.5)  # two more audits: still one warning for the episode
    metrics = _metrics(watching.log())
    assert watching.terminate() == 0
    assert relay.terminate() == 0
    assert watching.log().count("audit: the inbox differs from the source") == 1
    queue = env.queue
    assert f'cdc_relay_consumer_audit_drift_windows{{queue="{queue}"}} 1.0' in metrics
    assert f'cdc_relay_consumer_audit_missing_events{{queue="{queue}"}} 1.0' in metrics
    assert _metric(metrics, f'cdc_relay_consumer_audits_total{{queue="{queue}",result="drift"') >= 2
