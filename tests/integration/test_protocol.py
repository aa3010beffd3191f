"""Protocol edges end to end: schema changes while streaming, column types, transaction shapes
(savepoints, two-phase, COPY, one huge transaction), table-less events (logical decoding
messages) and TRUNCATE. Each test checks from an independent consumer what arrived, and where it
matters the relay's exit code, its log and the slot's confirmed position."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from tests.integration.harness import (
    REPO,
    Delivery,
    Env,
    Relay,
    assert_per_aggregate_order,
    insert_events,
    outbox_row,
)

pytestmark = pytest.mark.integration

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
Conn = psycopg.Connection[tuple[Any, ...]]


# -- small helpers ---------------------------------------------------------------------------------
def lsn_int(text: str) -> int:
    """``"16/B374D848"`` → integer position (as ``pg_lsn - '0/0'``)."""
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def wait_exit(relay: Relay, timeout: float = 30) -> int:
    try:
        return relay.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"relay still running after {timeout}s:\n{relay.log()}") from None


def log_records(relay: Relay) -> list[dict[str, Any]]:
    out = []
    for line in relay.log().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def final_error(relay: Relay) -> str:
    """The one error line the relay ends with (the halt reason)."""
    errors = [
        r["msg"] for r in log_records(relay) if r["level"] == "error" and "halting" not in r["msg"]
    ]
    assert errors, f"no error logged:\n{relay.log()}"
    return str(errors[-1])


def assert_slot_holds(env: Env, failing: int, needle: bytes) -> None:
    """The slot has not moved past the event the relay failed on: its confirmed position is at
    or before that change, and PostgreSQL still has the change pending for the next session
    (peeked, so nothing moves). ``needle`` identifies the change's data (an id, a prefix)."""
    flush = env.slot_flush()
    assert flush <= failing, f"slot at {flush:X}, past the failing change at {failing:X}"
    with env.sql() as c:
        rows = c.execute(
            "SELECT lsn - '0/0'::pg_lsn, data FROM pg_logical_slot_peek_binary_changes("
            "%s, NULL, NULL, 'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
            (env.name, env.name),
        ).fetchall()
    pending = [(int(lsn), bytes(data)) for lsn, data in rows if bytes(data)[:1] in (b"I", b"M")]
    assert pending, "the slot has nothing pending: the failing event was consumed"
    first_lsn, first_data = pending[0]
    assert first_lsn == failing, f"first pending change at {first_lsn:X}, not {failing:X}"
    assert needle in first_data


def error_lsn(message: str) -> int:
    m = re.search(r"\blsn=([0-9A-F]+/[0-9A-F]+)", message)
    assert m, f"error names no lsn: {message}"
    return lsn_int(m.group(1))


def insert_row(
    conn: Conn,
    row: tuple[str, str, str, str, str | None],
    *,
    type_column: str = "type",
    headers: str | None = None,
    payload_cast: str = "jsonb",
) -> None:
    conn.execute(
        f"INSERT INTO outbox (id, aggregatetype, aggregateid, {type_column}, payload, headers) "
        f"VALUES (%s, %s, %s, %s, %s::{payload_cast}, %s::jsonb)",
        (*row, headers),
    )


def ids_of(deliveries: list[Delivery]) -> list[str]:
    return [d.message_id for d in deliveries]


def check_once_in_order(got: list[Delivery], expected: list[str]) -> None:
    ids = ids_of(got)
    assert len(ids) == len(set(ids)), f"duplicates: {len(ids) - len(set(ids))}"
    assert ids == expected


# -- 1. schema changes while the relay runs --------------------------------------------------------
def test_schema_changes_while_streaming_lose_nothing(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    expected: list[tuple[str, Any, dict[str, Any]]] = []  # (id, payload, expected extra headers)

    def emit(
        conn: Conn, seq: int, *, headers: bool = True, cast: str = "jsonb", raw: str | None = None
    ) -> None:
        payload = {"seq": seq, "aggregate": "S"}
        row = outbox_row("S", seq, payload=payload)
        text = raw if raw is not None else json.dumps(payload)
        hdr = json.dumps({"tenant": f"t{seq}"}) if headers else None
        if headers:
            insert_row(conn, (*row[:4], text), headers=hdr, payload_cast=cast)
        else:
            conn.execute(
                "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
                f"VALUES (%s, %s, %s, %s, %s::{cast})",
                (*row[:4], text),
            )
        expected.append((row[0], json.loads(text), {"tenant": f"t{seq}"} if headers else {}))

    json_verbatim = '{"seq": 5,   "aggregate": "S", "kept": [1.50, 2]}'
    with env.sql() as conn:
        emit(conn, 0)
        # extra column (with a default: no rewrite), an event in the same transaction as the DDL
        with conn.transaction():
            conn.execute("ALTER TABLE outbox ADD COLUMN extra text DEFAULT 'x'")
            emit(conn, 1)
        emit(conn, 2)
        # drop the optional headers column
        conn.execute("ALTER TABLE outbox DROP COLUMN headers")
        emit(conn, 3, headers=False)
        # payload jsonb -> json (a table rewrite; the rewritten rows must not be re-published)
        conn.execute("ALTER TABLE outbox ALTER COLUMN payload TYPE json USING payload::json")
        emit(conn, 4, headers=False, cast="json")
        emit(conn, 5, headers=False, cast="json", raw=json_verbatim)
        # and back to jsonb
        conn.execute("ALTER TABLE outbox ALTER COLUMN payload TYPE jsonb USING payload::jsonb")
        emit(conn, 6, headers=False)
        # move `type` to the last position: columns are found by name, not position
        with conn.transaction():
            conn.execute("ALTER TABLE outbox ADD COLUMN type_new text")
            conn.execute("UPDATE outbox SET type_new = type")
            conn.execute("ALTER TABLE outbox DROP COLUMN type")
            conn.execute("ALTER TABLE outbox RENAME COLUMN type_new TO type")
            conn.execute("ALTER TABLE outbox ALTER COLUMN type SET NOT NULL")
        emit(conn, 7, headers=False)
        positions = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'outbox'::regclass "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        ).fetchall()
    assert [p[0] for p in positions][-1] == "type"

    got = env.consume(len(expected), settle=1.5)
    check_once_in_order(got, [e[0] for e in expected])
    for d, (_, payload, extra_headers) in zip(got, expected, strict=True):
        assert d.body["payload"] == payload
        assert d.body["type"] == "OrderPlaced"
        assert d.routing_key == "order.OrderPlaced"
        for k, v in extra_headers.items():
            assert d.headers.get(k) == v
        if not extra_headers:
            assert "tenant" not in d.headers
    # a json (not jsonb) payload is embedded byte for byte
    assert b'"payload":' + json_verbatim.encode() in got[5].raw
    assert relay.proc.poll() is None, relay.log()
    assert relay.terminate() == 0


# -- 2. a required column vanishes --------------------------------------------------------------
def test_renamed_required_column_halts_then_alias_setting_resumes(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    before = [outbox_row("R", i) for i in range(3)]
    with env.sql() as conn, conn.transaction():
        insert_events(conn, before)
    check_once_in_order(env.consume(3), [r[0] for r in before])

    after = [outbox_row("R", i) for i in range(3, 6)]
    with env.sql() as conn:
        conn.execute("ALTER TABLE outbox RENAME COLUMN type TO event_type")
        position_before_failing = env.current_lsn()
        for row in after:  # three transactions; the first one is where the relay must stop
            insert_row(conn, row, type_column="event_type")
    assert wait_exit(relay) == 1, relay.log()
    error = final_error(relay)
    assert "'type'" in error, error
    assert "relation=public.outbox" in error, error
    failing = error_lsn(error)
    assert failing >= position_before_failing, (failing, position_before_failing)
    assert env.queue_depth() == 0, "published something for an event it could not map"
    assert_slot_holds(env, failing, after[0][0].encode())

    # the operator's fix: accept both names
    relay2 = env.start_relay(column_type="type,event_type")
    relay2.wait_streaming()
    got = env.consume(3, settle=1.5)
    check_once_in_order(got, [r[0] for r in after])
    assert [d.body["payload"]["seq"] for d in got] == [3, 4, 5]
    assert all(d.body["type"] == "OrderPlaced" for d in got)
    # and new events keep flowing under the new name
    last = outbox_row("R", 6)
    with env.sql() as conn:
        insert_row(conn, last, type_column="event_type")
    check_once_in_order(env.consume(1, settle=1.0), [last[0]])
    assert relay2.terminate() == 0


def test_dropped_aggregateid_halts_without_moving_the_slot(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    first = outbox_row("D", 0)
    with env.sql() as conn, conn.transaction():
        insert_events(conn, [first])
    check_once_in_order(env.consume(1), [first[0]])
    failing_id = str(uuid.uuid4())
    with env.sql() as conn:
        conn.execute("ALTER TABLE outbox DROP COLUMN aggregateid")
        position_before_failing = env.current_lsn()
        conn.execute(
            "INSERT INTO outbox (id, aggregatetype, type, payload) VALUES (%s, 'order', "
            "'OrderPlaced', '{\"seq\": 1}')",
            (failing_id,),
        )
    assert wait_exit(relay) == 1, relay.log()
    error = final_error(relay)
    assert "'aggregateid'" in error, error
    assert "relation=public.outbox" in error, error
    failing = error_lsn(error)
    assert failing >= position_before_failing
    assert env.queue_depth() == 0
    time.sleep(1.5)  # nothing else may move the slot either
    assert_slot_holds(env, failing, failing_id.encode())
    # started again without a fix, the relay refuses up front (fails closed)
    again = env.start_relay()
    assert wait_exit(again) == 1, again.log()
    assert "aggregateid" in again.log()
    assert_slot_holds(env, failing, failing_id.encode())
    assert env.queue_depth() == 0


# -- 3. column types -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TypeCase:
    name: str
    id_type: str
    payload_type: str
    created_type: str
    id_value: str
    payload_sql: str  # SQL expression for the payload value
    created_value: str
    expected_payload: Any
    expected_occurred: dt.datetime
    raw_fragment: bytes | None = None  # must appear in the body byte for byte


TYPE_CASES = [
    TypeCase(
        name="bigint_id_json_payload_timestamptz",
        id_type="bigint",
        payload_type="json",
        created_type="timestamptz",
        id_value="9007199254740993",  # beyond 2**53: must stay exact text
        payload_sql='\'{"k":  [1, 2.50], "z": null}\'',
        created_value="2024-02-29 23:59:59.123456+05:30",
        expected_payload={"k": [1, 2.5], "z": None},
        expected_occurred=dt.datetime(2024, 2, 29, 18, 29, 59, 123456, tzinfo=dt.UTC),
        raw_fragment=b'"payload":{"k":  [1, 2.50], "z": null}',
    ),
    TypeCase(
        name="text_id_text_payload_naive_timestamp",
        id_type="text",
        payload_type="text",
        created_type="timestamp without time zone",
        id_value="evt-ÄÖ-0001",
        payload_sql='\'{"name": "Łódź", "n": 3}\'',
        created_value="2024-01-02 03:04:05.5",
        expected_payload={"name": "Łódź", "n": 3},
        expected_occurred=dt.datetime(2024, 1, 2, 3, 4, 5, 500000, tzinfo=dt.UTC),
    ),
    TypeCase(
        name="uuid_id_bytea_payload",
        id_type="uuid",
        payload_type="bytea",
        created_type="timestamptz",
        id_value=str(uuid.UUID(int=0x1234)),
        payload_sql='convert_to(\'{"sku": "é-1", "qty": [2]}\', \'UTF8\')',
        created_value="2023-06-30 22:00:00+00",
        expected_payload={"sku": "é-1", "qty": [2]},
        expected_occurred=dt.datetime(2023, 6, 30, 22, 0, tzinfo=dt.UTC),
    ),
]


def create_custom_outbox(env: Env, id_type: str, payload_type: str, created_type: str) -> None:
    """Create the outbox with the given types before `init` (which then keeps it as it is)."""
    with env.sql() as conn:
        conn.execute(
            f"CREATE TABLE outbox (id {id_type} PRIMARY KEY, aggregatetype text NOT NULL, "
            f"aggregateid text NOT NULL, type text NOT NULL, payload {payload_type}, "
            f"headers jsonb, traceparent text, created_at {created_type} NOT NULL DEFAULT now())"
        )
    out = env.cli("init")
    assert out.returncode == 0, out.stderr
    env.bind_queue()


@pytest.mark.parametrize("case", TYPE_CASES, ids=[c.name for c in TYPE_CASES])
def test_column_types(env: Env, case: TypeCase) -> None:
    create_custom_outbox(env, case.id_type, case.payload_type, case.created_type)
    relay = env.start_relay()
    relay.wait_streaming()
    null_id = {"bigint": "42", "text": "evt-null", "uuid": str(uuid.UUID(int=0x99))}[case.id_type]
    with env.sql() as conn, conn.transaction():
        conn.execute(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, created_at) "
            f"VALUES (%s, 'order', 'T-1', 'Typed', {case.payload_sql}, %s)",
            (case.id_value, case.created_value),
        )
        conn.execute(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
            "VALUES (%s, 'order', 'T-1', 'Typed', NULL)",
            (null_id,),
        )
    got = env.consume(2, settle=1.0)
    check_once_in_order(got, [case.id_value, null_id])
    d = got[0]
    assert d.body["id"] == case.id_value
    assert isinstance(d.body["id"], str)
    assert d.body["payload"] == case.expected_payload
    if case.raw_fragment is not None:
        assert case.raw_fragment in d.raw, d.raw[:300]
    occurred = d.body["occurred_at"]
    assert isinstance(occurred, str)
    assert occurred.endswith("Z"), occurred
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", occurred), occurred
    assert dt.datetime.fromisoformat(occurred.replace("Z", "+00:00")) == case.expected_occurred
    assert got[1].body["payload"] is None
    assert b'"payload":null' in got[1].raw
    assert got[1].body["occurred_at"].endswith("Z")
    assert relay.terminate() == 0


def test_text_payload_with_invalid_json_halts(env: Env) -> None:
    create_custom_outbox(env, "uuid", "text", "timestamptz")
    relay = env.start_relay()
    relay.wait_streaming()
    good = str(uuid.uuid4())
    bad = str(uuid.uuid4())
    with env.sql() as conn:
        conn.execute(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
            "VALUES (%s, 'order', 'J', 'Ok', '{\"ok\": true}')",
            (good,),
        )
        position_before_failing = env.current_lsn()
        conn.execute(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
            "VALUES (%s, 'order', 'J', 'Bad', '{not json')",
            (bad,),
        )
    assert wait_exit(relay) == 1, relay.log()
    error = final_error(relay)
    assert "column=payload" in error, error
    assert "JSON" in error, error
    assert bad in error, "the error should name the event id"
    failing = error_lsn(error)
    assert failing >= position_before_failing
    got = env.consume(1, settle=1.0)
    check_once_in_order(got, [good])
    assert got[0].body["payload"] == {"ok": True}
    assert_slot_holds(env, failing, bad.encode())


# -- 4. transaction shapes -------------------------------------------------------------------------
def test_rolled_back_savepoints_are_not_published(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    keep1, gone1, keep2, gone2, keep3 = (outbox_row("SP", i) for i in range(5))
    with env.sql() as conn:
        conn.execute("BEGIN")
        insert_events(conn, [keep1])
        conn.execute("SAVEPOINT a")
        insert_events(conn, [gone1])
        conn.execute("SAVEPOINT nested")
        insert_events(conn, [gone2])
        conn.execute("ROLLBACK TO SAVEPOINT a")
        insert_events(conn, [keep2])
        conn.execute("SAVEPOINT b")
        insert_events(conn, [keep3])
        conn.execute("RELEASE SAVEPOINT b")
        conn.execute("COMMIT")
    got = env.consume(3, settle=1.5)
    check_once_in_order(got, [keep1[0], keep2[0], keep3[0]])
    assert len({d.body["source"]["commit_lsn"] for d in got}) == 1
    assert relay.terminate() == 0


def test_two_phase_commit_publishes_only_at_commit_prepared(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    gid_commit = f"{env.name}_c"
    gid_abort = f"{env.name}_r"
    prepared = [outbox_row("2PC", 0), outbox_row("2PC", 1)]
    aborted = outbox_row("2PC-ABORT", 0)
    try:
        with env.sql() as conn:
            conn.execute("BEGIN")
            insert_events(conn, prepared)
            conn.execute(f"PREPARE TRANSACTION '{gid_commit}'")
            conn.execute("BEGIN")
            insert_events(conn, [aborted])
            conn.execute(f"PREPARE TRANSACTION '{gid_abort}'")
            marker = outbox_row("MARK", 0)
            insert_events(conn, [marker])
        # the relay read past both PREPAREs (the marker committed later arrived) and published
        # nothing of them
        got = env.consume(1, settle=2.0)
        check_once_in_order(got, [marker[0]])
        with env.sql() as conn:
            conn.execute(f"ROLLBACK PREPARED '{gid_abort}'")
            time.sleep(1.0)
            conn.execute(f"COMMIT PREPARED '{gid_commit}'")
        got = env.consume(2, settle=2.0)
        check_once_in_order(got, [r[0] for r in prepared])
        assert got[0].body["source"]["commit_lsn"] == got[1].body["source"]["commit_lsn"]
        commit_lsn = lsn_int(got[0].body["source"]["commit_lsn"])
        env.wait_for(lambda: env.slot_flush() > commit_lsn, what="slot past COMMIT PREPARED")
        # the rolled-back prepared transaction never shows up, even after a restart
        assert relay.terminate() == 0
        relay2 = env.start_relay()
        relay2.wait_streaming()
        tail = outbox_row("MARK", 1)
        with env.sql() as conn:
            insert_events(conn, [tail])
        check_once_in_order(env.consume(1, settle=1.5), [tail[0]])
        assert relay2.terminate() == 0
    finally:
        with env.sql() as conn:
            for gid in (gid_commit, gid_abort):
                row = conn.execute(
                    "SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (gid,)
                ).fetchone()
                if row:
                    conn.execute(f"ROLLBACK PREPARED '{gid}'")


def test_multi_row_insert_and_copy_in_one_transaction(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    multi = [outbox_row(f"M{i % 7}", i) for i in range(1000)]
    copied = [outbox_row(f"C{i % 7}", i) for i in range(1000)]
    with env.sql() as conn:
        with conn.transaction():
            values = ", ".join(["(%s, %s, %s, %s, %s::jsonb)"] * len(multi))
            conn.execute(
                "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
                f"VALUES {values}",
                [v for row in multi for v in row],
            )
        with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy(
                "COPY outbox (id, aggregatetype, aggregateid, type, payload) FROM STDIN"
            ) as copy,
        ):
            for row in copied:
                copy.write_row(row)
    got = env.consume(2000, timeout=90, settle=1.5)
    check_once_in_order(got, [r[0] for r in multi] + [r[0] for r in copied])
    assert_per_aggregate_order(got[:1000])
    assert_per_aggregate_order(got[1000:])
    for part, rows in ((got[:1000], multi), (got[1000:], copied)):
        assert len({d.body["source"]["commit_lsn"] for d in part}) == 1
        assert len({d.body["source"]["txid"] for d in part}) == 1
        lsns = [lsn_int(d.body["source"]["lsn"]) for d in part]
        assert lsns == sorted(lsns)
        assert lsns[-1] < lsn_int(part[0].body["source"]["commit_lsn"])
        assert [d.body["payload"] for d in part] == [json.loads(str(r[4])) for r in rows]
    # a multi-row INSERT logs one record per row; COPY logs multi-insert records, whose rows
    # share the record's position
    assert len({d.body["source"]["lsn"] for d in got[:1000]}) == 1000
    assert got[0].body["source"]["commit_lsn"] != got[1000].body["source"]["commit_lsn"]
    last_commit = lsn_int(got[-1].body["source"]["commit_lsn"])
    env.wait_for(lambda: env.slot_flush() > last_commit, what="slot past the COPY's commit")
    assert relay.terminate() == 0


# -- 5. one very large transaction -----------------------------------------------------------------
def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def test_200k_rows_in_one_transaction_bounded_memory(env: Env) -> None:
    total = 200_000
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    try:
        start = time.monotonic()
        with env.sql() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
                "SELECT gen_random_uuid(), 'order', 'BIG-' || (g %% 100), 'OrderPlaced', "
                "jsonb_build_object('seq', g, 'note', repeat('x', 60)) "
                "FROM generate_series(1, %s) g",
                (total,),
            )
        committed = time.monotonic()
        end_of_tx = env.current_lsn()
        env.wait_for(lambda: env.queue_depth() >= total, timeout=85, what=f"{total} messages")
        delivered = time.monotonic()
        time.sleep(2.0)
        assert env.queue_depth() == total, "more messages than rows: duplicates"
        hwm_kib = vm_hwm_kib(relay.proc.pid)
        assert relay.proc.poll() is None, relay.log()
        print(
            f"\n200k rows in one transaction: insert+commit {committed - start:.1f}s, "
            f"delivered {delivered - start:.1f}s after start "
            f"({total / (delivered - committed):.0f} msg/s after commit), "
            f"relay peak RSS (VmHWM) {hwm_kib / 1024:.1f} MB"
        )
        assert hwm_kib < 150 * 1024, f"relay peak RSS {hwm_kib / 1024:.1f} MB"
        # first message of the transaction is first in the queue
        with env.channel() as ch:
            method, _props, body = ch.basic_get(env.queue, auto_ack=False)
            assert method is not None
            first = json.loads(body)
            assert first["payload"]["seq"] == 1
            ch.basic_nack(method.delivery_tag, requeue=True)
        env.wait_for(lambda: env.slot_flush() >= end_of_tx, what="slot past the transaction")
        assert relay.terminate() == 0
    finally:
        with env.channel() as ch:
            ch.queue_delete(env.queue)


# -- 6. table-less events (logical decoding messages) ----------------------------------------------
def apply_outbox_emit(env: Env) -> None:
    with env.sql() as conn:
        conn.execute((REPO / "sql" / "outbox_emit.sql").read_text())


def test_outbox_emit_messages_interleave_with_table_rows(env: Env) -> None:
    env.init()
    apply_outbox_emit(env)
    relay = env.start_relay()
    relay.wait_streaming()
    row1 = outbox_row("MIX-1", 0)
    row3 = outbox_row("MIX-1", 2)
    with env.sql() as conn:
        with conn.transaction():
            insert_events(conn, [row1])
            res = conn.execute(
                "SELECT outbox_emit('order', 'MIX-1', 'OrderPaid', %s::jsonb, traceparent => %s)",
                (json.dumps({"seq": 1, "amount": 9.5}), TRACEPARENT),
            ).fetchone()
            insert_events(conn, [row3])
            txid_row = conn.execute("SELECT txid_current()").fetchone()
        assert res is not None and txid_row is not None
        emitted_id = str(res[0])
        # none of these is an event: a non-transactional 'outbox' message (outside and inside a
        # transaction), a transactional message of another prefix, a rolled-back outbox_emit
        ghost = json.dumps(
            {"id": str(uuid.uuid4()), "aggregatetype": "order", "aggregateid": "G", "type": "X"}
        )
        conn.execute("SELECT pg_logical_emit_message(false, 'outbox', %s)", (ghost,))
        with conn.transaction():
            conn.execute("SELECT pg_logical_emit_message(false, 'outbox', %s)", (ghost,))
        conn.execute("SELECT pg_logical_emit_message(true, 'other', %s)", (ghost,))
        conn.execute("BEGIN")
        conn.execute("SELECT outbox_emit('order', 'G', 'RolledBack', '{}')")
        conn.execute("ROLLBACK")
        # a plain outbox_emit in its own transaction: NULL payload, no traceparent
        plain = conn.execute(
            "SELECT outbox_emit('order', 'MIX-2', 'OrderShipped', NULL)"
        ).fetchone()
        assert plain is not None
        marker = outbox_row("MARK", 0)
        insert_events(conn, [marker])
    got = env.consume(5, timeout=20, settle=2.0)
    assert relay.proc.poll() is None, relay.log()
    check_once_in_order(got, [row1[0], emitted_id, row3[0], str(plain[0]), marker[0]])
    a, b, c = got[:3]
    assert b.body["v"] == 1
    assert b.body["id"] == emitted_id
    assert b.body["aggregate_type"] == "order"
    assert b.body["aggregate_id"] == "MIX-1"
    assert b.body["type"] == "OrderPaid"
    assert b.body["payload"] == {"seq": 1, "amount": 9.5}
    assert b.body["occurred_at"] is None
    assert b.body["committed_at"] == a.body["committed_at"]
    assert b.routing_key == "order.OrderPaid"
    assert b.properties.message_id == emitted_id
    assert b.properties.type == "OrderPaid"
    assert b.properties.delivery_mode == 2
    assert b.properties.app_id == "cdc-relay"
    assert b.headers["traceparent"] == TRACEPARENT
    assert b.headers["aggregate_type"] == "order"
    assert b.headers["aggregate_id"] == "MIX-1"
    assert b.headers["source_lsn"] == b.body["source"]["lsn"]
    src = [d.body["source"] for d in (a, b, c)]
    assert len({s["commit_lsn"] for s in src}) == 1
    assert {s["txid"] for s in src} == {int(txid_row[0]) % (1 << 32)}
    # PostgreSQL reports a logical message at its record's end, which is where the next
    # record (here the second row) starts: positions are non-decreasing, not distinct
    assert lsn_int(src[0]["lsn"]) < lsn_int(src[1]["lsn"]) <= lsn_int(src[2]["lsn"])
    assert src[1]["slot"] == env.name and src[1]["database"] == env.dbname
    d = got[3]
    assert d.body["type"] == "OrderShipped"
    assert d.body["payload"] is None
    assert "traceparent" not in d.headers
    assert relay.terminate() == 0


def test_outbox_emit_headers_argument_becomes_amqp_headers(env: Env) -> None:
    env.init()
    apply_outbox_emit(env)
    relay = env.start_relay()
    relay.wait_streaming()
    with env.sql() as conn:
        res = conn.execute(
            "SELECT outbox_emit('order', 'H-1', 'OrderPaid', '{\"seq\": 1}', %s::jsonb, %s)",
            (json.dumps({"tenant": "acme", "priority": 5}), TRACEPARENT),
        ).fetchone()
        assert res is not None
        marker = outbox_row("H-1", 2)
        insert_events(conn, [marker])
    env.wait_for(
        lambda: relay.proc.poll() is not None or env.queue_depth() >= 2,
        timeout=20,
        what="both events (or the relay's exit)",
    )
    assert relay.proc.poll() is None, f"relay exited {relay.proc.returncode}:\n{relay.log()}"
    got = env.consume(2, timeout=20, settle=1.0)
    check_once_in_order(got, [str(res[0]), marker[0]])
    h = got[0].headers
    assert h["tenant"] == "acme"
    assert h["priority"] == 5
    assert h["traceparent"] == TRACEPARENT
    assert h["aggregate_id"] == "H-1"
    assert got[0].body["payload"] == {"seq": 1}
    assert relay.terminate() == 0


def test_invalid_outbox_message_halts_naming_the_prefix(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    good = outbox_row("MSG", 0)
    with env.sql() as conn:
        insert_events(conn, [good])
        position_before_failing = env.current_lsn()
        with conn.transaction():
            # valid JSON, but not an event object (no aggregatetype/aggregateid/type)
            conn.execute(
                "SELECT pg_logical_emit_message(true, 'outbox', %s)",
                (json.dumps({"id": "x-1", "payload": {}}),),
            )
            insert_events(conn, [outbox_row("MSG", 1)])
    assert wait_exit(relay) == 1, relay.log()
    error = final_error(relay)
    assert "'outbox'" in error, error
    assert "prefix" in error, error
    failing = error_lsn(error)
    assert failing >= position_before_failing
    got = env.consume(1, settle=1.5)
    check_once_in_order(got, [good[0]])  # nothing of the failing transaction
    assert_slot_holds(env, failing, b"outbox\x00")


# -- 7. TRUNCATE -----------------------------------------------------------------------------------
def test_truncate_publishes_nothing_and_the_relay_keeps_going(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    before = [outbox_row("TR", i) for i in range(3)]
    after = [outbox_row("TR", i) for i in range(3, 5)]
    with env.sql() as conn:
        with conn.transaction():
            insert_events(conn, before)
        truncate_from = env.current_lsn()
        conn.execute("TRUNCATE outbox")
        with conn.transaction():  # a row inserted and truncated in one transaction is an event
            insert_events(conn, [after[0]])
            conn.execute("TRUNCATE outbox")
        with conn.transaction():
            insert_events(conn, [after[1]])
    got = env.consume(5, settle=1.5)
    check_once_in_order(got, [r[0] for r in before + after])
    assert relay.proc.poll() is None, relay.log()
    truncated = [r for r in log_records(relay) if "outbox truncated" in r["msg"]]
    assert len(truncated) == 2, relay.log()
    for r in truncated:
        assert "lsn" in r, r
        assert lsn_int(r["lsn"]) >= truncate_from
    assert relay.terminate() == 0


def test_several_outbox_tables_route_to_their_own_exchanges(env: Env) -> None:
    """One publication, two bounded contexts: each table's events go where its route says."""
    import json as _json
    import uuid as _uuid

    with env.sql() as conn:
        conn.execute("CREATE SCHEMA sales")
        conn.execute("CREATE SCHEMA billing")
    tables = "sales.outbox,billing.outbox"
    routes = _json.dumps(
        {"billing.outbox": {"exchange": f"{env.exchange}.billing", "routing_key": "bill.{type}"}}
    )
    out = env.cli("init", "--create-outbox", env=env.relay_env(outbox_table=tables, routes=routes))
    assert out.returncode == 0, out.stderr
    assert "created table sales.outbox" in out.stdout
    assert "created table billing.outbox" in out.stdout
    env.bind_queue()  # sales → the default exchange
    billing_queue = f"{env.queue}.billing"
    with env.channel() as ch:
        ch.exchange_declare(f"{env.exchange}.billing", "topic", durable=True)
        ch.queue_declare(billing_queue, durable=True)
        ch.queue_bind(billing_queue, f"{env.exchange}.billing", "#")
    relay = env.start_relay(outbox_table=tables, routes=routes)
    relay.wait_streaming()
    sale, bill = str(_uuid.uuid4()), str(_uuid.uuid4())
    with env.sql() as conn, conn.transaction():
        conn.execute(
            "INSERT INTO sales.outbox (id, aggregatetype, aggregateid, type, payload) "
            "VALUES (%s, 'order', 'O-1', 'OrderPlaced', '{\"seq\": 0}')",
            (sale,),
        )
        conn.execute(
            "INSERT INTO billing.outbox (id, aggregatetype, aggregateid, type, payload) "
            "VALUES (%s, 'invoice', 'I-1', 'InvoiceIssued', '{\"seq\": 0}')",
            (bill,),
        )
    (sales_msg,) = env.consume(1, settle=1.0)
    assert sales_msg.message_id == sale
    assert sales_msg.routing_key == "order.OrderPlaced"
    env.queue = billing_queue
    (billing_msg,) = env.consume(1, settle=1.0)
    assert billing_msg.message_id == bill
    assert billing_msg.routing_key == "bill.InvoiceIssued"
    assert billing_msg.body["aggregate_type"] == "invoice"
    assert relay.terminate() == 0
