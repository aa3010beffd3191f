"""Hostile rows against the message builder: anything is either a message the broker accepts
exactly as built, or ``InvalidEvent`` before any delivery tag exists. Never another exception.

Properties are decoded with a small reference decoder written from the AMQP 0-9-1 spec (and
RabbitMQ's field types), independent of ``cdc_relay.amqp``: pika's own decoder turns a double
('d') into an int, so it can only confirm tables without floats (which it does, too).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import event as label
from hypothesis import strategies as st
from pika.spec import BasicProperties

from cdc_relay.amqp import CONTENT_HEADER_OVERHEAD, INT64_MAX, INT64_MIN
from cdc_relay.errors import InvalidEvent
from cdc_relay.lsn import Lsn
from cdc_relay.messages import (
    INVALID_EVENT_TYPE,
    InvalidEventV1,
    MessageBuilder,
    OutgoingMessage,
    TransactionInfo,
)
from cdc_relay.outbox import OutboxEvent

# --- a reference decoder for what the relay sends ------------------------------------------------

# (flag bit, property, kind), AMQP 0-9-1 basic class, in wire order
_PROPERTIES = (
    (15, "content_type", "shortstr"),
    (14, "content_encoding", "shortstr"),
    (13, "headers", "table"),
    (12, "delivery_mode", "octet"),
    (11, "priority", "octet"),
    (10, "correlation_id", "shortstr"),
    (9, "reply_to", "shortstr"),
    (8, "expiration", "shortstr"),
    (7, "message_id", "shortstr"),
    (6, "timestamp", "u64"),
    (5, "type", "shortstr"),
    (4, "user_id", "shortstr"),
    (3, "app_id", "shortstr"),
    (2, "cluster_id", "shortstr"),
)


def decode_properties(raw: bytes) -> dict[str, Any]:
    """Every property present in an encoded basic-properties list; the whole input is used."""
    (flags,) = struct.unpack_from(">H", raw, 0)
    assert not flags & 1, "no continuation flags expected"
    pos = 2
    out: dict[str, Any] = {}
    for bit, name, kind in _PROPERTIES:
        if flags & (1 << bit):
            out[name], pos = _read(kind, raw, pos)
    assert pos == len(raw), "trailing bytes after the properties"
    return out


def _read(kind: str, raw: bytes, pos: int) -> tuple[Any, int]:
    if kind == "shortstr":
        n = raw[pos]
        return raw[pos + 1 : pos + 1 + n].decode(), pos + 1 + n
    if kind == "octet":
        return raw[pos], pos + 1
    if kind == "u64":
        return struct.unpack_from(">Q", raw, pos)[0], pos + 8
    return _table(raw, pos)


def _table(raw: bytes, pos: int) -> tuple[dict[str, Any], int]:
    (size,) = struct.unpack_from(">I", raw, pos)
    pos += 4
    end = pos + size
    table: dict[str, Any] = {}
    while pos < end:
        n = raw[pos]
        key = raw[pos + 1 : pos + 1 + n].decode()
        table[key], pos = _field(raw, pos + 1 + n)
    assert pos == end, "table size does not match its entries"
    return table, pos


def _field(raw: bytes, pos: int) -> tuple[Any, int]:
    kind = raw[pos : pos + 1]
    pos += 1
    if kind == b"S":
        (n,) = struct.unpack_from(">I", raw, pos)
        return raw[pos + 4 : pos + 4 + n].decode(), pos + 4 + n
    if kind == b"t":
        assert raw[pos] in (0, 1)
        return raw[pos] == 1, pos + 1
    if kind == b"l":
        return struct.unpack_from(">q", raw, pos)[0], pos + 8
    if kind == b"d":
        value = struct.unpack_from(">d", raw, pos)[0]
        assert math.isfinite(value), "RabbitMQ (Erlang) cannot parse NaN or infinity"
        return value, pos + 8
    if kind == b"V":
        return None, pos
    if kind == b"F":
        return _table(raw, pos)
    if kind == b"A":
        (size,) = struct.unpack_from(">I", raw, pos)
        pos += 4
        end = pos + size
        items = []
        while pos < end:
            item, pos = _field(raw, pos)
            items.append(item)
        assert pos == end, "array size does not match its items"
        return items, pos
    raise AssertionError(f"field type {kind!r} is not one the relay writes")


def has_float(value: object) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(has_float(v) for v in value)
    return False


def assert_decodes_to(msg: OutgoingMessage, frame_max: int) -> dict[str, Any]:
    """The message's properties decode to its fields; its content header fits a frame."""
    assert CONTENT_HEADER_OVERHEAD + len(msg.properties) <= frame_max
    props = decode_properties(msg.properties)
    assert props["message_id"] == msg.message_id
    assert props["type"] == msg.type
    assert props["timestamp"] == msg.timestamp
    assert props["content_type"] == "application/json"
    assert props["delivery_mode"] == 2
    assert props["app_id"] == "cdc-relay"
    assert props["headers"] == wire(msg.headers)
    if not has_float(props["headers"]):  # pika truncates doubles to ints
        pika_props = BasicProperties()
        pika_props.decode(msg.properties)
        assert pika_props.headers == props["headers"]
        assert pika_props.message_id == msg.message_id
    return props


# --- JSON the way a jsonb column can hold it -----------------------------------------------------


class RawNumber:
    """A JSON number written as it is: jsonb accepts numbers no Python float holds."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"RawNumber({self.text[:30]!r})"


def to_json(value: object) -> str:
    if isinstance(value, RawNumber):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value)


def wire(value: object) -> object:
    """What an AMQP consumer decodes for a JSON value (the documented mapping)."""
    if isinstance(value, RawNumber):
        text = value.text
        if not any(c in text for c in ".eE"):
            return wire(int(text)) if len(text) <= 20 else text
        number = float(text)
        underflow = number == 0.0 and text.lower().partition("e")[0].strip("+-0.") != ""
        return text if math.isinf(number) or underflow else number
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return value if INT64_MIN <= value <= INT64_MAX else str(value)
    if isinstance(value, dict):
        return {k: wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [wire(v) for v in value]
    raise AssertionError(f"unexpected {type(value)}")


RESERVED = ["CC", "cc", "BCC", "Bcc", "x-death", "X-Delay", "x-cdc-relay-reason"]
RESERVED += ["x-original-exchange", "aggregate_type", "aggregate_id", "source_lsn"]
RESERVED += ["traceparent", "Tracestate"]

raw_numbers = st.sampled_from(
    [
        "1e400",
        "-1e400",
        "1E400",
        "1e-400",
        "-0.0",
        "0e10",
        "1.0",
        "1e308",
        "0.1",
        "5e-324",
        "123456789012345678901234567890",
        "-9223372036854775808",
        "9223372036854775807",
        "9223372036854775808",
        "5000 digits",
    ]
).map(lambda t: RawNumber("1" + "0" * 5000 if t == "5000 digits" else t))
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | raw_numbers
)
normal_keys = st.text(max_size=20)
odd_keys = st.text(min_size=60, max_size=300) | st.sampled_from(RESERVED)
keys = st.integers(0, 19).flatmap(lambda n: odd_keys if n == 0 else normal_keys)
json_values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=25,
)
# mostly objects; sometimes no headers column value, sometimes JSON that is not an object
row_headers = st.integers(0, 9).flatmap(
    lambda n: (
        st.none()
        if n == 0
        else json_values
        if n == 1
        else st.dictionaries(keys, json_values, max_size=6)
    )
)
# text of any length: now and then long, in multi-byte characters (over AMQP's 255 bytes)
short_text = st.text(max_size=80)
long_text = st.text(alphabet="é東🚀a", min_size=60, max_size=300)
any_text = st.integers(0, 9).flatmap(lambda n: long_text if n == 0 else short_text)


def long_key(tree: object) -> bool:
    if isinstance(tree, dict):
        return any(len(k.encode()) > 255 or long_key(v) for k, v in tree.items())
    if isinstance(tree, list):
        return any(long_key(v) for v in tree)
    return False


def expected_problem(event: OutboxEvent, tree: object) -> str | None:
    """Why the builder must refuse this event, apart from frame size (None: it must not)."""
    if len(event.id.encode()) > 255:
        return "id"
    if len(event.type.encode()) > 255:
        return "type"
    if len(f"{event.aggregate_type}.{event.type}".encode()) > 255:
        return "routing key"
    if event.headers is None:
        return None
    if not isinstance(tree, dict):
        return "not an object"
    if any(k.lower() in {r.lower() for r in RESERVED} or k.lower().startswith("x-") for k in tree):
        return "reserved"
    if long_key(tree):
        return "key"
    return None


TX = TransactionInfo(xid=7781, commit_lsn=Lsn.parse("16/B374D900"), commit_time=849_000_000_000_000)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def event_of(**fields: Any) -> OutboxEvent:
    base: dict[str, Any] = {
        "id": "e-1",
        "aggregate_type": "order",
        "aggregate_id": "42",
        "type": "OrderPlaced",
        "payload": b"{}",
        "headers": None,
        "traceparent": None,
        "created_at": None,
        "lsn": Lsn(0x1000),
        "table": "public.outbox",
    }
    base.update(fields)
    return OutboxEvent(**base)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    tree=row_headers,
    event_id=any_text,
    type_=any_text,
    aggregate_type=any_text,
    aggregate_id=any_text | st.text(min_size=3000, max_size=5000),
    traceparent=st.none() | any_text,
    span=st.none() | st.just(TRACEPARENT),
    frame_max=st.sampled_from([4096, 8192, 131072]),
    table=st.sampled_from(["public.outbox", ""]),
)
@example(
    tree={"CC": "audit"}, event_id="e", type_="T", aggregate_type="o", aggregate_id="1",
    traceparent=None, span=None, frame_max=131072, table="public.outbox",
)  # fmt: skip
@example(
    tree={"score": 0.5, "big": 2**70, "huge": RawNumber("1e400")}, event_id="e", type_="T",
    aggregate_type="o", aggregate_id="1", traceparent=None, span=None, frame_max=131072,
    table="public.outbox",
)  # fmt: skip
def test_build_returns_a_faithful_message_or_raises_invalid_event(
    tree: object,
    event_id: str,
    type_: str,
    aggregate_type: str,
    aggregate_id: str,
    traceparent: str | None,
    span: str | None,
    frame_max: int,
    table: str,
) -> None:
    headers = None if tree is None else to_json(tree).encode()
    event = event_of(
        id=event_id,
        type=type_,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        headers=headers,
        traceparent=traceparent,
        table=table,
    )
    builder = MessageBuilder("slot", "db", "{aggregatetype}.{type}", frame_max=frame_max)
    problem = expected_problem(event, tree)
    try:
        msg = builder.build(event, TX, span)
    except InvalidEvent as err:
        label(f"refused: {problem or 'frame'}")
        assert problem is not None or "frame_max" in err.problem, err
        assert err.event_id == event_id
        assert err.lsn == event.lsn
        assert err.row, "the raw row goes with the error"
        # and the dead letter for it is always a message the broker takes
        assert_decodes_to(builder.dead_letter(err, TX, "dlx"), frame_max)
        return
    assert problem is None, f"should have been refused: {problem}"
    label("built" if tree is None else "built with row headers")
    props = assert_decodes_to(msg, frame_max)
    expected: dict[str, object] = {} if tree is None else dict(wire(tree))  # type: ignore[call-overload]
    expected["aggregate_type"] = aggregate_type
    expected["aggregate_id"] = aggregate_id
    expected["source_lsn"] = str(event.lsn)
    chosen = span if span is not None else traceparent
    if chosen:
        expected["traceparent"] = chosen
    assert props["headers"] == expected
    assert props["message_id"] == event_id
    assert msgspec.json.decode(msg.body)["id"] == event_id


# surrogates included: Python-made text (never WAL-decoded text) may hold them
wild_text = st.text(
    alphabet=st.characters(exclude_categories=()) | st.characters(categories=["Cs"]), max_size=60
) | st.text(min_size=200, max_size=2000)
raw_values = st.none() | st.binary(max_size=300) | st.text(max_size=300).map(str.encode)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    problem=wild_text,
    column=st.none() | wild_text,
    event_id=st.none() | wild_text,
    relation=st.none() | wild_text,
    lsn=st.none() | st.integers(min_value=0, max_value=2**64 - 1).map(Lsn),
    row=st.none() | st.dictionaries(st.text(max_size=40), raw_values, max_size=8),
    template=st.sampled_from(["{aggregatetype}.{type}", "{aggregateid}", "fixed"]),
    commit_time=st.integers(min_value=-(2**55), max_value=2**57),
)
def test_dead_letter_is_always_a_message_the_broker_takes(
    problem: str,
    column: str | None,
    event_id: str | None,
    relation: str | None,
    lsn: Lsn | None,
    row: dict[str, bytes | None] | None,
    template: str,
    commit_time: int,
) -> None:
    err = InvalidEvent(
        problem, column=column, event_id=event_id, lsn=lsn, relation=relation, row=row
    )
    tx = TransactionInfo(xid=1, commit_lsn=Lsn(5), commit_time=commit_time)
    builder = MessageBuilder("slot", "db", template, frame_max=4096)
    msg = builder.dead_letter(err, tx, "dlx")
    props = assert_decodes_to(msg, 4096)
    assert props["type"] == INVALID_EVENT_TYPE
    assert set(props["headers"]) <= {
        "x-cdc-relay-reason",
        "x-source-lsn",
        "x-commit-lsn",
        "x-original-relation",
    }
    assert len(msg.routing_key.encode()) <= 255
    body = msgspec.json.decode(msg.body, type=InvalidEventV1)
    assert body.kind == "invalid_event"
    for name, raw in (row or {}).items():
        if raw is None:
            assert body.row[name] is None
        elif name in body.row:
            assert body.row[name] == raw.decode()
        else:
            assert base64.b64decode(body.row_base64[name]) == raw


# --- explicit cases ------------------------------------------------------------------------------


def build(*, frame_max: int = 131072, **fields: Any) -> OutgoingMessage:
    return MessageBuilder("slot", "db", "{aggregatetype}.{type}", frame_max=frame_max).build(
        event_of(**fields), TX
    )


def refused(*, frame_max: int = 131072, **fields: Any) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        build(frame_max=frame_max, **fields)
    return info.value


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (b'{"score": 0.5}', {"score": 0.5}),
        (b'{"version": 1.0}', {"version": 1.0}),
        (b'{"n": 1e3}', {"n": 1000.0}),
        (b'{"big": 1180591620717411303424}', {"big": "1180591620717411303424"}),
        (b'{"max": 9223372036854775807, "min": -9223372036854775808}', None),
        (b'{"over": 9223372036854775808}', {"over": "9223372036854775808"}),
        (b'{"huge": 1e400, "neg": -1E400}', {"huge": "1e400", "neg": "-1E400"}),
        (b'{"tiny": 1e-400, "zero": 0e-400}', {"tiny": "1e-400", "zero": 0.0}),
        (b'{"t": true, "f": false, "n": null}', None),
        (b'{"nested": {"a": [1, 2.5, "x", null, {"deep": [true]}]}}', None),
        (b'{"empty": {}, "none": []}', None),
        (b'{"": "empty key is allowed"}', None),
    ],
)
def test_every_json_type_has_an_amqp_form(
    headers: bytes, expected: dict[str, object] | None
) -> None:
    msg = build(headers=headers)
    props = assert_decodes_to(msg, 131072)
    want = json.loads(headers) if expected is None else expected
    assert {k: v for k, v in props["headers"].items() if k in want} == want


def test_integer_literals_msgspec_will_not_read_go_as_text() -> None:
    digits = "1" + "0" * 5000
    msg = build(headers=b'{"n": ' + digits.encode() + b', "m": 7, "f": 2.5, "x": 1e400}')
    headers = assert_decodes_to(msg, 131072)["headers"]
    assert headers["n"] == digits
    assert (headers["m"], headers["f"], headers["x"]) == (7, 2.5, "1e400")


@pytest.mark.parametrize("key", [*RESERVED, "X-", "x-anything", "bCc"])
def test_reserved_header_keys_are_refused(key: str) -> None:
    err = refused(headers=json.dumps({key: "forged-value-123"}).encode())
    assert err.column == "headers"
    assert "reserved" in err.problem
    assert "forged-value-123" not in str(err)


def test_cc_with_an_array_is_refused_too() -> None:
    # RabbitMQ would silently route a copy to payments.RefundIssued
    err = refused(headers=b'{"BCC": ["payments.RefundIssued"]}')
    assert "reserved" in err.problem


@pytest.mark.parametrize(
    "headers",
    [b"[1, 2]", b'"text"', b"42", b"null", b"{not json", b"", b'{"a": 1', b"{" * 5000],
)
def test_headers_that_are_not_a_json_object_are_invalid_events(headers: bytes) -> None:
    err = refused(headers=headers)
    assert err.column == "headers"


def test_deeply_nested_headers_are_refused_not_a_crash() -> None:
    deep = b'{"a":' + b"[" * 150 + b"]" * 150 + b"}"
    err = refused(headers=deep)
    assert "nested" in err.problem


def test_header_key_over_255_bytes_is_refused_with_a_short_prefix() -> None:
    key = "k" * 100 + "é" * 100  # 300 bytes
    err = refused(headers=json.dumps({"ok": 1, "nested": {key: 1}}).encode())
    assert err.column == "headers"
    assert "255" in err.problem
    assert key[:40] in err.problem and key[:41] not in err.problem


@pytest.mark.parametrize(("field", "column"), [("id", "id"), ("type", "type")])
def test_id_and_type_over_255_bytes_are_invalid_events(field: str, column: str) -> None:
    value = "x" * 300
    fields: dict[str, Any] = {field: value, "aggregate_type": "o"}
    err = refused(**fields)
    assert err.column == column
    assert "255" in err.problem
    assert value not in err.problem
    if field == "id":
        assert err.row is not None and err.row["id"] == value.encode()


def test_id_of_255_bytes_is_fine() -> None:
    assert build(id="é" * 127 + "x").message_id.endswith("x")


def test_200_kb_headers_do_not_fit_a_frame() -> None:
    err = refused(headers=json.dumps({"blob": "x" * 200_000}).encode())
    assert err.column == "headers"
    assert "frame_max 131072" in err.problem


def test_200_kb_aggregate_id_does_not_fit_a_frame() -> None:
    err = refused(aggregate_id="A" * 200_000)
    assert err.column == "aggregateid"
    assert "frame_max" in err.problem
    assert "AAAAAAAAAA" not in str(err)


def test_huge_traceparent_column_does_not_fit_a_frame() -> None:
    err = refused(traceparent="0" * 200_000)
    assert err.column == "traceparent"


def test_the_frame_limit_is_exact() -> None:
    base = build(aggregate_id="")
    room = 131072 - (CONTENT_HEADER_OVERHEAD + len(base.properties))
    fits = build(aggregate_id="a" * room)
    assert CONTENT_HEADER_OVERHEAD + len(fits.properties) == 131072
    refused(aggregate_id="a" * (room + 1))
    # the negotiated frame_max is what counts
    refused(frame_max=4096, aggregate_id="a" * 4096)


def test_a_body_larger_than_a_frame_is_fine() -> None:
    msg = build(payload=b'"' + b"x" * 500_000 + b'"')
    assert len(msg.body) > 500_000
    assert_decodes_to(msg, 131072)


def test_lone_surrogate_text_made_in_python_is_an_invalid_event() -> None:
    err = refused(aggregate_id="a\ud800")
    assert err.column == "aggregateid"
    err = refused(id="\udfff")
    assert err.column == "id"
