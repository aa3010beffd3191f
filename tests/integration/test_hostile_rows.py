"""Rows an application can write that the broker would refuse, through the real relay process.

The reproductions of the trust issue: a `CC` header (406 channel close, once an endless retry
loop), a float header (once an internal error after a 30 s phantom-tag wait), a bytea payload in a
database whose `bytea_output` is `escape` (once a halt). Each now publishes faithfully, halts once
with one line that names the row, or is dead-lettered whole — never a loop, a wedge or a skip.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from typing import Any

import pika.data
import pytest

from tests.integration.harness import Env, insert_events, outbox_row

pytestmark = pytest.mark.integration


def _write_with_headers(env: Env, rows: list[tuple[str, str, str, str, str, str | None]]) -> None:
    with env.sql() as conn, conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, headers) "
            "VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb)",
            rows,
        )


def _row(agg: str, seq: int, headers: Any = None) -> tuple[str, str, str, str, str, str | None]:
    return (
        str(uuid.uuid4()),
        "order",
        agg,
        "OrderPlaced",
        json.dumps({"seq": seq, "aggregate": agg}),
        None if headers is None else json.dumps(headers),
    )


def _dead_letter_queue(env: Env) -> tuple[str, str]:
    """A dead-letter exchange with a queue bound to it, as an operator would set it up."""
    dlx, dlq = f"{env.exchange}.dlx", f"{env.queue}.dlq"
    with env.channel() as ch:
        ch.exchange_declare(dlx, "fanout", durable=True)
        ch.queue_declare(dlq, durable=True)
        ch.queue_bind(dlq, dlx)
    return dlx, dlq


def _error_lines(log: str) -> list[dict[str, Any]]:
    out = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") == "error":
            out.append(record)
    return out


def test_cc_header_halts_once_naming_the_row_not_a_retry_loop(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    before = [_row("A", 0)]
    _write_with_headers(env, before)
    assert [d.message_id for d in env.consume(1)] == [before[0][0]]
    flushed = env.slot_flush()
    good, bad = _row("A", 1), _row("A", 2, {"CC": "audit"})
    _write_with_headers(env, [good, bad, _row("A", 3)])
    assert relay.proc.wait(60) == 1
    log = relay.log()
    assert "retrying" not in log, "a row the broker refuses must not loop"
    assert log.count('"msg": "streaming"') == 1
    final = _error_lines(log)[-1]["msg"]
    assert "CC" in final and "column=headers" in final
    assert f"event_id={bad[0]}" in final and "commit_lsn=" in final
    assert "invalid_event_policy" in final, "the way forward is named"
    assert "Traceback" not in log
    # the good event of the same transaction was published, but the slot stays before it
    got = env.consume(1, timeout=5)
    assert [d.message_id for d in got] == [good[0]]
    assert env.slot_flush() >= flushed
    end_before = env.slot_flush()
    relay2 = env.start_relay()
    assert relay2.proc.wait(60) == 1, "the same halt on restart: nothing skipped"
    assert env.slot_flush() == end_before


def test_invalid_rows_are_dead_lettered_whole_and_streaming_goes_on(env: Env) -> None:
    env.init()
    dlx, dlq = _dead_letter_queue(env)
    relay = env.start_relay(invalid_event_policy="dead_letter", dead_letter_exchange=dlx)
    relay.wait_streaming()
    rows = [
        _row("A", 0),
        _row("A", 1, {"CC": "audit"}),
        _row("A", 2, {"x-cdc-relay-reason": "forged"}),
        _row("A", 3),
    ]
    long_id = "x" * 300  # not a uuid: the dead-letter path must cope with any text
    with env.sql() as conn:
        conn.execute("ALTER TABLE outbox ALTER COLUMN id TYPE text")
    _write_with_headers(env, [*rows[:3], (long_id, *rows[3][1:4], rows[3][4], None), rows[3]])
    got = env.consume(2, settle=1.0)
    assert [d.message_id for d in got] == [rows[0][0], rows[3][0]]
    dead = []
    with env.channel() as ch:
        for _ in range(3):
            method, props, body = ch.basic_get(dlq, auto_ack=True)
            assert method is not None, "every invalid row is kept"
            dead.append((props, json.loads(body)))
    reasons = [body["reason"] for _props, body in dead]
    assert any("CC" in r for r in reasons) and any("x-" in r for r in reasons)
    assert any("255" in r for r in reasons), reasons
    assert json.loads(dead[0][1]["row"]["headers"]) == {"CC": "audit"}
    assert dead[2][1]["row"]["id"] == long_id, "the raw row survives whole"
    end = env.current_lsn()
    env.wait_for(lambda: env.slot_flush() >= end, timeout=20, what="slot past dead letters")
    port = relay.http_port()
    import urllib.request

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert 'cdc_relay_events_invalid_total{slot="' in metrics
    invalid = [ln for ln in metrics.splitlines() if ln.startswith("cdc_relay_events_invalid")]
    assert any(ln.endswith(" 3.0") for ln in invalid), invalid
    assert relay.terminate() == 0


@pytest.fixture
def exact_doubles(monkeypatch: pytest.MonkeyPatch) -> None:
    """pika's decoder truncates AMQP doubles ('d') to integers (pika 1.3, data.py); the relay
    sends real doubles, so this test's consumer decodes them the way RabbitMQ and other
    clients do. README: 'Headers' notes the pika limitation for consumers."""
    original = pika.data.decode_value

    def decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
        if encoded[offset : offset + 1] == b"d":
            return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
        return original(encoded, offset)  # type: ignore[no-any-return]

    monkeypatch.setattr(pika.data, "decode_value", decode_value)


@pytest.mark.usefixtures("exact_doubles")
def test_headers_of_every_json_type_are_published_faithfully(env: Env) -> None:
    env.init()
    relay = env.start_relay()
    relay.wait_streaming()
    headers = {
        "score": 0.5,
        "version": 1.0,
        "big": 2**70,
        "n": -7,
        "ok": True,
        "none": None,
        "nested": {"a": [1, "two", {"three": 3.5}]},
    }
    row = _row("A", 0, headers)
    _write_with_headers(env, [row])
    [delivery] = env.consume(1)
    got = delivery.headers
    assert got["score"] == 0.5 and got["version"] == 1.0 and got["n"] == -7
    assert got["ok"] is True and got["none"] is None
    assert str(got["big"]) == str(2**70), "integers beyond 64 bits travel as decimal text"
    nested = got["nested"]
    assert nested["a"][0] == 1 and nested["a"][2]["three"] == 3.5
    assert str(nested["a"][1]) in ("two", "b'two'")
    assert relay.terminate() == 0


def test_bytea_payload_in_a_database_with_escape_output(env: Env) -> None:
    with env.sql() as conn:
        conn.execute(f'ALTER DATABASE "{env.dbname}" SET bytea_output = escape')
    env.init()
    with env.sql() as conn:
        conn.execute(
            "ALTER TABLE outbox ALTER COLUMN payload TYPE bytea "
            "USING convert_to(payload::text, 'UTF8')"
        )
    relay = env.start_relay()
    relay.wait_streaming()
    event_id = str(uuid.uuid4())
    with env.sql() as conn:
        conn.execute(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
            "VALUES (%s, 'order', 'A', 'OrderPlaced', convert_to(%s, 'UTF8'))",
            (event_id, '{"seq": 1, "ü": "ß"}'),
        )
    [delivery] = env.consume(1)
    assert delivery.message_id == event_id
    assert delivery.body["payload"] == {"seq": 1, "ü": "ß"}
    assert relay.terminate() == 0


def test_retry_loop_without_progress_fails_healthz_and_is_counted(env: Env) -> None:
    env.init()
    # a broker that is not there: every session fails, none makes progress
    relay = env.start_relay(
        amqp_url="amqp://guest:guest@127.0.0.1:1/%2F", health_timeout="3", reconnect_max="1"
    )
    port = relay.http_port()
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 30
    code, body = 200, b""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as r:
                code, body = r.status, r.read()
        except urllib.error.HTTPError as err:
            code, body = err.code, err.read()
        if code == 503:
            break
        time.sleep(0.3)
    assert code == 503, "a retry loop that never moves the slot must fail /healthz"
    detail = json.loads(body)
    assert detail["consecutive_failures"] >= 2 and detail["loop_tick_age_s"] < 3
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    failed = [ln for ln in metrics.splitlines() if ln.startswith("cdc_relay_failed_sessions_total")]
    assert failed and float(failed[0].split()[-1]) >= 2
    assert relay.terminate() == 0


def test_events_written_before_a_poison_row_are_never_lost(env: Env) -> None:
    """After the halt the operator diverts the row; everything after it then arrives."""
    env.init()
    dlx, dlq = _dead_letter_queue(env)
    relay = env.start_relay()
    relay.wait_streaming()
    first = [outbox_row("B", i) for i in range(5)]
    with env.sql() as conn, conn.transaction():
        insert_events(conn, first)
    bad = _row("B", 5, {"BCC": ["payments.RefundIssued"]})
    _write_with_headers(env, [bad])
    after = [outbox_row("B", i) for i in range(6, 10)]
    with env.sql() as conn, conn.transaction():
        insert_events(conn, after)
    assert relay.proc.wait(60) == 1
    relay2 = env.start_relay(invalid_event_policy="dead_letter", dead_letter_exchange=dlx)
    relay2.wait_streaming()
    want = [r[0] for r in first] + [r[0] for r in after]
    got = env.consume(len(want), settle=1.0)
    first_seen: list[str] = []
    for d in got:
        if d.message_id not in first_seen:
            first_seen.append(d.message_id)
    assert first_seen == want
    with env.channel() as ch:
        method, props, _body = ch.basic_get(dlq, auto_ack=True)
    assert method is not None and props.message_id == bad[0]
    assert relay2.terminate() == 0
