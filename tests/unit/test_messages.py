"""The message contract: envelope v1 body, AMQP properties, routing key."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import msgspec
import pytest

from cdc_relay.errors import ConfigError, InvalidEvent, OutboxError
from cdc_relay.lsn import Lsn
from cdc_relay.messages import (
    APP_ID,
    CONTENT_TYPE,
    INVALID_EVENT_TYPE,
    INVALID_ROUTING_KEY,
    EnvelopeV1,
    InvalidEventV1,
    MessageBuilder,
    OutgoingMessage,
    Source,
    TransactionInfo,
)
from cdc_relay.outbox import OutboxColumns, OutboxEvent
from tests.unit.test_hostile_headers import assert_decodes_to, decode_properties

PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
COMMITTED = dt.datetime(2026, 11, 27, 10, 11, 13, 654321, tzinfo=dt.UTC)
COMMIT_US = (COMMITTED - PG_EPOCH) // dt.timedelta(microseconds=1)
TX = TransactionInfo(xid=7781, commit_lsn=Lsn.parse("16/B374D900"), commit_time=COMMIT_US)
EVENT_LSN = Lsn.parse("16/B374D848")
EVENT_ID = "0b6f7d4e-0c5a-4d8e-9b1e-6f0f3a1c2d3e"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def make_event(**changes: Any) -> OutboxEvent:
    fields: dict[str, Any] = {
        "id": EVENT_ID,
        "aggregate_type": "order",
        "aggregate_id": "42",
        "type": "OrderPlaced",
        "payload": b'{"n": 1.50, "b": [1,2]}',
        "headers": None,
        "traceparent": None,
        "created_at": "2026-11-27 10:11:12.123456+00",
        "lsn": EVENT_LSN,
    }
    fields.update(changes)
    return OutboxEvent(**fields)


def build(
    event: OutboxEvent | None = None,
    template: str = "{aggregatetype}.{type}",
    tx: TransactionInfo = TX,
) -> OutgoingMessage:
    return MessageBuilder("cdc_relay", "shop", template).build(event or make_event(), tx)


def body_of(msg: OutgoingMessage) -> dict[str, Any]:
    decoded = json.loads(msg.body)
    assert isinstance(decoded, dict)
    return decoded


# --- body ----------------------------------------------------------------------------------------


def test_body_is_envelope_v1_with_version_first() -> None:
    msg = build()
    assert msg.body.startswith(b'{"v":1,')
    body = body_of(msg)
    assert list(body) == [
        "v",
        "id",
        "aggregate_type",
        "aggregate_id",
        "type",
        "payload",
        "occurred_at",
        "committed_at",
        "source",
    ]
    assert body["v"] == 1
    assert body["id"] == EVENT_ID
    assert body["aggregate_type"] == "order"
    assert body["aggregate_id"] == "42"
    assert body["type"] == "OrderPlaced"


def test_payload_is_embedded_byte_for_byte() -> None:
    raw = b'{"n": 1.50, "b": [1,2]}'
    msg = build(make_event(payload=raw))
    assert b'"payload":' + raw + b"," in msg.body
    # a parse/re-serialise round trip would have produced 1.5 and [1, 2]
    assert b"1.50" in msg.body


@pytest.mark.parametrize(
    "raw",
    [
        b'{"z": 1, "a": 2}',  # key order kept
        b'{"big": 12345678901234567890123}',  # beyond 64 bits
        b'{"f": 1e400}',  # beyond double range
        b"[]",
        b'"text"',
        b'{"k": "\\u00e9 and \xc3\xa9"}',
    ],
)
def test_payload_variants_are_kept_verbatim(raw: bytes) -> None:
    msg = build(make_event(payload=raw))
    assert raw in msg.body
    decoded = msgspec.json.decode(msg.body, type=EnvelopeV1)
    assert bytes(decoded.payload) == raw


def test_null_payload_is_json_null() -> None:
    msg = build(make_event(payload=None))
    assert b'"payload":null' in msg.body
    assert body_of(msg)["payload"] is None


@pytest.mark.parametrize(
    ("created_at", "expected"),
    [
        ("2026-11-27 10:11:12.123456+00", "2026-11-27T10:11:12.123456Z"),
        ("2026-11-27 10:11:12+00", "2026-11-27T10:11:12Z"),
        ("2026-11-27 10:11:12.5+00", "2026-11-27T10:11:12.500000Z"),
        ("2026-11-27 10:11:12.12345+00", "2026-11-27T10:11:12.123450Z"),
        ("2026-11-27 10:11:12.123456", "2026-11-27T10:11:12.123456Z"),  # timestamp w/o tz: UTC
    ],
)
def test_occurred_at_is_rfc3339_utc(created_at: str, expected: str) -> None:
    occurred = body_of(build(make_event(created_at=created_at)))["occurred_at"]
    assert occurred == expected


def test_occurred_at_with_offset_keeps_the_instant() -> None:
    occurred = body_of(build(make_event(created_at="2026-11-27 12:11:12+02")))["occurred_at"]
    parsed = dt.datetime.fromisoformat(occurred)
    assert parsed == dt.datetime(2026, 11, 27, 10, 11, 12, tzinfo=dt.UTC)


@pytest.mark.parametrize("created_at", ["infinity", "-infinity", "2026-11-27 10:11:12+00 BC"])
def test_occurred_at_without_rfc3339_form_is_null(created_at: str) -> None:
    msg = build(make_event(created_at=created_at))
    assert b'"occurred_at":null' in msg.body
    assert body_of(msg)["occurred_at"] is None


def test_occurred_at_absent_is_null() -> None:
    assert body_of(build(make_event(created_at=None)))["occurred_at"] is None


def test_committed_at_from_commit_time() -> None:
    body = body_of(build())
    assert body["committed_at"] == "2026-11-27T10:11:13.654321Z"
    assert TX.committed_at == COMMITTED


def test_committed_at_at_the_postgres_epoch() -> None:
    tx = TransactionInfo(xid=1, commit_lsn=Lsn(1), commit_time=0)
    assert body_of(build(tx=tx))["committed_at"] == "2000-01-01T00:00:00Z"


def test_source_block() -> None:
    source = body_of(build())["source"]
    assert source == {
        "lsn": "16/B374D848",
        "commit_lsn": "16/B374D900",
        "txid": 7781,
        "slot": "cdc_relay",
        "database": "shop",
    }


def test_non_ascii_text_survives() -> None:
    event = make_event(
        aggregate_type="Bestellung",
        aggregate_id="Zoë/東京",
        type="Создан✓",
        payload='{"name": "Zoë 🚀"}'.encode(),
    )
    msg = build(event)
    body = body_of(msg)
    assert body["aggregate_id"] == "Zoë/東京"
    assert body["type"] == "Создан✓"
    assert body["payload"] == {"name": "Zoë 🚀"}
    assert "Zoë/東京".encode() in msg.body  # UTF-8, not \u escapes
    assert msg.headers["aggregate_id"] == "Zoë/東京"
    assert msg.routing_key == "Bestellung.Создан✓"


def test_text_needing_json_escapes_is_escaped() -> None:
    event = make_event(aggregate_id='a"b\\c\nd')
    body = body_of(build(event))
    assert body["aggregate_id"] == 'a"b\\c\nd'


# --- properties ----------------------------------------------------------------------------------


def test_properties() -> None:
    msg = build()
    assert msg.message_id == EVENT_ID
    assert msg.type == "OrderPlaced"
    assert msg.timestamp == int(COMMITTED.timestamp())
    assert msg.timestamp == 1_795_774_273
    assert APP_ID == "cdc-relay"
    assert CONTENT_TYPE == "application/json"


def test_timestamp_truncates_to_whole_seconds() -> None:
    tx = TransactionInfo(xid=1, commit_lsn=Lsn(1), commit_time=999_999)
    assert build(tx=tx).timestamp == int(PG_EPOCH.timestamp())


def test_headers_without_traceparent() -> None:
    msg = build()
    assert msg.headers == {
        "aggregate_type": "order",
        "aggregate_id": "42",
        "source_lsn": "16/B374D848",
    }


def test_headers_with_traceparent() -> None:
    msg = build(make_event(traceparent=TRACEPARENT))
    assert msg.headers["traceparent"] == TRACEPARENT


def test_empty_traceparent_is_not_a_header() -> None:
    assert "traceparent" not in build(make_event(traceparent="")).headers


def test_extra_headers_are_merged() -> None:
    extra = b'{"tenant": "acme", "priority": 5, "nested": {"a": [1, true, null]}}'
    msg = build(make_event(headers=extra, traceparent=TRACEPARENT))
    assert msg.headers == {
        "tenant": "acme",
        "priority": 5,
        "nested": {"a": [1, True, None]},
        "aggregate_type": "order",
        "aggregate_id": "42",
        "source_lsn": "16/B374D848",
        "traceparent": TRACEPARENT,
    }


def test_row_headers_cannot_set_the_relays_headers() -> None:
    # contract change: a row that tries is refused (InvalidEvent) instead of silently overridden
    for extra in (b'{"aggregate_id": "spoofed", "x": "y"}', b'{"source_lsn": "0/0", "x": "y"}'):
        with pytest.raises(InvalidEvent) as info:
            build(make_event(headers=extra))
        assert "reserved" in info.value.problem
        assert "spoofed" not in str(info.value)
    msg = build(make_event(headers=b'{"x": "y"}'))
    assert msg.headers["aggregate_id"] == "42"
    assert msg.headers["source_lsn"] == "16/B374D848"
    assert msg.headers["x"] == "y"


def test_empty_extra_headers_object() -> None:
    assert build(make_event(headers=b"{}")).headers == build().headers


@pytest.mark.parametrize(
    "headers", [b"[1, 2]", b'"text"', b"42", b"null", b"{not json", b"", b'{"a": 1']
)
def test_headers_that_are_not_a_json_object_are_outbox_error(headers: bytes) -> None:
    with pytest.raises(OutboxError) as info:
        build(make_event(headers=headers))
    assert "headers" in str(info.value)
    assert info.value.context["event_id"] == EVENT_ID
    assert info.value.context["lsn"] == EVENT_LSN


# --- routing key ---------------------------------------------------------------------------------


def test_default_routing_key() -> None:
    assert build().routing_key == "order.OrderPlaced"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{aggregatetype}", "order"),
        ("{aggregateid}", "42"),
        ("events.{aggregatetype}.{aggregateid}.{type}", "events.order.42.OrderPlaced"),
        ("fixed.key", "fixed.key"),
        ("{{literal}}.{type}", "{literal}.OrderPlaced"),
        ("", ""),
    ],
)
def test_custom_routing_key_templates(template: str, expected: str) -> None:
    assert build(template=template).routing_key == expected


def test_routing_key_of_255_bytes_is_fine() -> None:
    assert len(build(make_event(type="t" * 249)).routing_key) == 255  # "order." + 249


def test_routing_key_over_255_bytes_is_outbox_error() -> None:
    with pytest.raises(OutboxError) as info:
        build(make_event(type="t" * 250))
    assert "255" in str(info.value)
    assert info.value.context["event_id"] == EVENT_ID
    # an InvalidEvent (the row, not the table, is the problem) naming the longest column used
    assert isinstance(info.value, InvalidEvent)
    assert info.value.column == "type"
    assert "t" * 41 not in str(info.value)


def test_routing_key_limit_counts_utf8_bytes_not_characters() -> None:
    # 100 characters, 200 bytes, plus "order." → 206 bytes: fine
    assert build(make_event(type="é" * 100)).routing_key.endswith("é")
    # 125 characters but 250 bytes, plus "order." → 256 bytes: too long
    with pytest.raises(OutboxError):
        build(make_event(type="é" * 125))


def test_routing_key_method_matches_build() -> None:
    builder = MessageBuilder("s", "d", "{aggregateid}.{type}")
    assert builder.routing_key(make_event()) == "42.OrderPlaced"


# --- consumer contract ---------------------------------------------------------------------------


def test_v1_round_trip() -> None:
    msg = build(make_event(traceparent=TRACEPARENT))
    env = msgspec.json.decode(msg.body, type=EnvelopeV1)
    assert env == EnvelopeV1(
        id=EVENT_ID,
        aggregate_type="order",
        aggregate_id="42",
        type="OrderPlaced",
        payload=msgspec.Raw(b'{"n": 1.50, "b": [1,2]}'),
        occurred_at=dt.datetime(2026, 11, 27, 10, 11, 12, 123456, tzinfo=dt.UTC),
        committed_at=COMMITTED,
        source=Source(
            lsn="16/B374D848",
            commit_lsn="16/B374D900",
            txid=7781,
            slot="cdc_relay",
            database="shop",
        ),
    )
    assert msgspec.json.encode(env) == msg.body


def test_v1_round_trip_with_nulls() -> None:
    msg = build(make_event(payload=None, created_at=None))
    env = msgspec.json.decode(msg.body, type=EnvelopeV1)
    assert bytes(env.payload) == b"null"
    assert env.occurred_at is None


class MinimalConsumerV1(msgspec.Struct, tag_field="v", tag=1):
    """What a consumer that only cares about a few fields might declare."""

    id: str
    type: str
    payload: msgspec.Raw


class SourceView(msgspec.Struct):
    lsn: str


class ConsumerWithOptionalFutureField(msgspec.Struct, tag_field="v", tag=1):
    id: str
    source: SourceView
    not_sent_yet: str = "default"


class ConsumerV2(msgspec.Struct, tag_field="v", tag=2):
    id: str
    something_new: int


def test_consumer_declaring_a_subset_still_decodes() -> None:
    env = msgspec.json.decode(build().body, type=MinimalConsumerV1)
    assert env.id == EVENT_ID
    assert env.type == "OrderPlaced"
    assert msgspec.json.decode(env.payload) == {"n": 1.5, "b": [1, 2]}


def test_consumer_with_defaults_for_unknown_fields_decodes() -> None:
    env = msgspec.json.decode(build().body, type=ConsumerWithOptionalFutureField)
    assert env.source.lsn == "16/B374D848"
    assert env.not_sent_yet == "default"


def test_consumer_union_of_versions_picks_v1() -> None:
    env = msgspec.json.decode(build().body, type=EnvelopeV1 | ConsumerV2)
    assert isinstance(env, EnvelopeV1)
    assert env.id == EVENT_ID


def test_v1_consumer_rejects_other_versions() -> None:
    body = build().body.replace(b'{"v":1,', b'{"v":2,', 1)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(body, type=EnvelopeV1)


def test_cached_routing_keys_stay_correct_per_type_and_template() -> None:
    b = MessageBuilder("s", "d", "{aggregatetype}.{type}")
    keys = [
        b.routing_key(make_event(aggregate_type=a, type=t))
        for a, t in [("order", "Placed"), ("order", "Paid"), ("order", "Placed"), ("inv", "Paid")]
    ]
    assert keys == ["order.Placed", "order.Paid", "order.Placed", "inv.Paid"]
    per_agg = MessageBuilder("s", "d", "{aggregatetype}.{aggregateid}")
    assert per_agg.routing_key(make_event(aggregate_id="A")).endswith(".A")
    assert per_agg.routing_key(make_event(aggregate_id="B")).endswith(".B")
    other = b.routing_key(make_event(aggregate_type="order", type="Placed"), "x.{type}")
    assert other == "x.Placed"


# --- wire properties -----------------------------------------------------------------------------


def test_properties_are_encoded_for_the_wire() -> None:
    extra = b'{"tenant": "acme", "priority": 5, "score": 0.5}'
    msg = build(make_event(headers=extra, traceparent=TRACEPARENT))
    props = assert_decodes_to(msg, 131072)
    assert props == {
        "content_type": CONTENT_TYPE,
        "headers": {
            "tenant": "acme",
            "priority": 5,
            "score": 0.5,
            "aggregate_type": "order",
            "aggregate_id": "42",
            "source_lsn": "16/B374D848",
            "traceparent": TRACEPARENT,
        },
        "delivery_mode": 2,
        "message_id": EVENT_ID,
        "timestamp": 1_795_774_273,
        "type": "OrderPlaced",
        "app_id": APP_ID,
    }


def test_headers_are_for_tracing_only_the_properties_go_out() -> None:
    msg = build()
    msg.headers["traceparent"] = "changed after build"
    assert "traceparent" not in decode_properties(msg.properties)["headers"]


def test_traceparent_argument_replaces_the_rows() -> None:
    builder = MessageBuilder("cdc_relay", "shop", "{aggregatetype}.{type}")
    ours = "00-11111111111111111111111111111111-2222222222222222-01"
    msg = builder.build(make_event(traceparent=TRACEPARENT), TX, ours)
    assert msg.headers["traceparent"] == ours
    assert decode_properties(msg.properties)["headers"]["traceparent"] == ours
    # no span: the row's traceparent travels as it is
    assert builder.build(make_event(traceparent=TRACEPARENT), TX).headers["traceparent"] == (
        TRACEPARENT
    )


def test_frame_max_is_settable_and_counts() -> None:
    builder = MessageBuilder("s", "d", "{aggregatetype}.{type}")
    assert builder.frame_max == 131072
    event = make_event(aggregate_id="A" * 5000)
    builder.build(event, TX)
    builder.frame_max = 4096  # what the broker negotiated
    with pytest.raises(InvalidEvent) as info:
        builder.build(event, TX)
    assert info.value.column == "aggregateid"
    assert "frame_max 4096" in info.value.problem


def test_destination_uses_the_tables_route_and_matches_build() -> None:
    builder = MessageBuilder(
        "s",
        "d",
        "{aggregatetype}.{type}",
        "outbox",
        routes={"billing.events": ("billing", "bill.{type}")},
    )
    assert builder.destination(make_event(table="public.outbox")) == ("outbox", "order.OrderPlaced")
    billing = make_event(table="billing.events")
    assert builder.destination(billing) == ("billing", "bill.OrderPlaced")
    msg = builder.build(billing, TX)
    assert (msg.exchange, msg.routing_key) == ("billing", "bill.OrderPlaced")


def test_destination_refuses_a_long_routing_key() -> None:
    builder = MessageBuilder("s", "d", "{aggregatetype}.{aggregateid}")
    with pytest.raises(InvalidEvent) as info:
        builder.destination(make_event(aggregate_id="x" * 300))
    assert info.value.column == "aggregateid"


# --- invalid events carry the raw row --------------------------------------------------------


def test_invalid_event_from_build_carries_the_row_by_configured_column_names() -> None:
    columns = OutboxColumns(id="event_id", type=("event_type", "type"), headers="hdrs")
    builder = MessageBuilder("s", "d", "{aggregatetype}.{type}", columns=columns)
    event = make_event(id="x" * 300, headers=b'{"a": 1}', table="public.outbox")
    with pytest.raises(InvalidEvent) as info:
        builder.build(event, TX)
    err = info.value
    assert err.column == "event_id"
    assert err.relation == "public.outbox"
    assert err.lsn == EVENT_LSN
    assert err.row == {
        "event_id": b"x" * 300,
        "aggregatetype": b"order",
        "aggregateid": b"42",
        "event_type": b"OrderPlaced",
        "payload": b'{"n": 1.50, "b": [1,2]}',
        "hdrs": b'{"a": 1}',
        "created_at": b"2026-11-27 10:11:12.123456+00",
    }


def test_invalid_event_from_a_logical_message_carries_equivalent_content() -> None:
    builder = MessageBuilder("s", "d", "{aggregatetype}.{type}", message_prefix="events")
    event = make_event(headers=b'{"CC": "x"}', table="", traceparent="tp")
    with pytest.raises(InvalidEvent) as info:
        builder.build(event, TX)
    err = info.value
    assert err.relation is None
    assert err.column == "headers"
    assert err.row is not None and err.row["prefix"] == b"events"
    content = err.row["content"]
    assert content is not None
    assert json.loads(content) == {
        "id": EVENT_ID,
        "aggregatetype": "order",
        "aggregateid": "42",
        "type": "OrderPlaced",
        "payload": {"n": 1.5, "b": [1, 2]},
        "headers": {"CC": "x"},
        "traceparent": "tp",
    }


# --- oversize stubs ------------------------------------------------------------------------------


def test_oversize_stub_omits_payload_and_says_so() -> None:
    builder = MessageBuilder("cdc_relay", "shop", "{aggregatetype}.{type}")
    event = make_event(headers=b'{"tenant": "acme"}')
    out = builder.build(event, TX, TRACEPARENT)
    stub = builder.oversize(event, TX, out, "dlx", "message of 9 bytes exceeds max_message_size 1")
    assert stub.exchange == "dlx"
    assert stub.routing_key == out.routing_key
    assert stub.message_id == EVENT_ID
    assert stub.type == "OrderPlaced"
    assert body_of(stub)["payload"] is None
    headers = assert_decodes_to(stub, 131072)["headers"]
    assert headers == {
        "aggregate_type": "order",
        "aggregate_id": "42",
        "source_lsn": "16/B374D848",
        "traceparent": TRACEPARENT,
        "x-cdc-relay-reason": "message of 9 bytes exceeds max_message_size 1",
        "x-cdc-relay-payload": "omitted",
        "x-original-exchange": "outbox",
        "x-original-routing-key": "order.OrderPlaced",
        "x-source-lsn": "16/B374D848",
    }


def test_oversize_stub_always_fits_a_frame() -> None:
    builder = MessageBuilder("s", "d", "{aggregatetype}.{type}")
    base = builder.build(make_event(aggregate_id=""), TX)
    room = 131072 - 20 - len(base.properties)
    event = make_event(aggregate_id="a" * room)  # the event itself fits exactly
    out = builder.build(event, TX)
    stub = builder.oversize(event, TX, out, "dlx", "too large " * 100)
    headers = assert_decodes_to(stub, 131072)["headers"]
    assert headers["x-cdc-relay-truncated"] == "aggregate_type,aggregate_id"
    assert len(headers["aggregate_id"].encode()) <= 255
    assert body_of(stub)["aggregate_id"] == "a" * room  # the body keeps it whole


def test_oversize_refuses_an_overlong_exchange_name() -> None:
    builder = MessageBuilder("s", "d", "{aggregatetype}.{type}")
    out = builder.build(make_event(), TX)
    with pytest.raises(ConfigError):
        builder.oversize(make_event(), TX, out, "x" * 256, "reason")


# --- dead letters for invalid events -------------------------------------------------------------


def invalid(**changes: Any) -> InvalidEvent:
    fields: dict[str, Any] = {
        "column": "headers",
        "event_id": EVENT_ID,
        "lsn": EVENT_LSN,
        "relation": "public.outbox",
        "row": {
            "id": EVENT_ID.encode(),
            "aggregatetype": b"order",
            "aggregateid": b"42",
            "type": b"OrderPlaced",
            "payload": b'{"n": 1}',
            "headers": b'{"CC": "audit"}',
            "blob": b"\xff\xfe",
            "note": None,
        },
    }
    fields.update(changes)
    return InvalidEvent("header key 'CC' is reserved", **fields)


def test_dead_letter_carries_the_raw_row_and_the_reason() -> None:
    builder = MessageBuilder("cdc_relay", "shop", "{aggregatetype}.{type}")
    msg = builder.dead_letter(invalid(), TX, "dlx")
    assert msg.exchange == "dlx"
    assert msg.routing_key == "order.OrderPlaced"
    assert msg.message_id == EVENT_ID
    assert msg.type == INVALID_EVENT_TYPE
    assert msg.timestamp == TX.timestamp
    body = json.loads(msg.body)
    assert list(body)[:2] == ["v", "kind"]
    assert body == {
        "v": 1,
        "kind": "invalid_event",
        "reason": "header key 'CC' is reserved",
        "column": "headers",
        "event_id": EVENT_ID,
        "relation": "public.outbox",
        "row": {
            "id": EVENT_ID,
            "aggregatetype": "order",
            "aggregateid": "42",
            "type": "OrderPlaced",
            "payload": '{"n": 1}',
            "headers": '{"CC": "audit"}',
            "note": None,
        },
        "row_base64": {"blob": "//4="},
        "source": {
            "lsn": "16/B374D848",
            "commit_lsn": "16/B374D900",
            "txid": 7781,
            "slot": "cdc_relay",
            "database": "shop",
        },
        "committed_at": "2026-11-27T10:11:13.654321Z",
    }
    assert msgspec.json.decode(msg.body, type=InvalidEventV1).row_base64 == {"blob": "//4="}
    headers = assert_decodes_to(msg, 4096)["headers"]
    assert headers == {
        "x-cdc-relay-reason": "header key 'CC' is reserved (column headers)",
        "x-commit-lsn": "16/B374D900",
        "x-source-lsn": "16/B374D848",
        "x-original-relation": "public.outbox",
    }


def test_dead_letter_message_id_when_the_id_cannot_be_one() -> None:
    builder = MessageBuilder("s", "d", "{aggregatetype}.{type}")
    long_id = "x" * 300
    first = builder.dead_letter(invalid(event_id=long_id), TX, "dlx").message_id
    again = builder.dead_letter(invalid(event_id=long_id), TX, "dlx").message_id
    assert first == again, "a replay sends the same id"
    assert first.startswith("invalid:") and len(first) == len("invalid:") + 64
    null_id = invalid(event_id=None, row={"id": None, "type": b"T"})
    other = invalid(event_id=None, row={"id": None, "type": b"U"})
    assert builder.dead_letter(null_id, TX, "dlx").message_id.startswith("invalid:")
    assert (
        builder.dead_letter(null_id, TX, "dlx").message_id
        != builder.dead_letter(other, TX, "dlx").message_id
    )


@pytest.mark.parametrize(
    ("row", "relation", "expected"),
    [
        ({"aggregatetype": b"order", "type": b"Paid"}, "public.outbox", "order.Paid"),
        ({"aggregatetype": b"order"}, "public.outbox", INVALID_ROUTING_KEY),  # no type
        ({"aggregatetype": b"\xff", "type": b"Paid"}, "public.outbox", INVALID_ROUTING_KEY),
        ({"aggregatetype": b"o" * 251, "type": b"Paid"}, "public.outbox", INVALID_ROUTING_KEY),
        (None, None, INVALID_ROUTING_KEY),
        (
            {"content": b'{"aggregatetype": "order", "type": "Paid", "id": 5}', "prefix": b"o"},
            None,
            "order.Paid",
        ),
        ({"content": b"not json", "prefix": b"outbox"}, None, INVALID_ROUTING_KEY),
    ],
)
def test_dead_letter_routing_key(
    row: dict[str, bytes | None] | None, relation: str | None, expected: str
) -> None:
    builder = MessageBuilder("s", "d", "{aggregatetype}.{type}")
    msg = builder.dead_letter(invalid(row=row, relation=relation), TX, "dlx")
    assert msg.routing_key == expected


def test_dead_letter_routing_key_uses_the_tables_route_and_column_names() -> None:
    builder = MessageBuilder(
        "s",
        "d",
        "{aggregatetype}.{type}",
        routes={"billing.events": ("billing", "bill.{type}.{aggregateid}")},
        columns=OutboxColumns(type="event_type", aggregate_id=("agg", "aggregateid")),
    )
    row: dict[str, bytes | None] = {"event_type": b"Sent", "aggregateid": b"7"}
    msg = builder.dead_letter(invalid(row=row, relation="billing.events"), TX, "dlx")
    assert msg.routing_key == "bill.Sent.7"


def test_dead_letter_reason_is_bounded() -> None:
    builder = MessageBuilder("s", "d", "{aggregatetype}.{type}", frame_max=4096)
    msg = builder.dead_letter(InvalidEvent("é" * 5000, column="c" * 5000), TX, "dlx")
    reason = assert_decodes_to(msg, 4096)["headers"]["x-cdc-relay-reason"]
    assert len(reason.encode()) <= 512
    assert reason.endswith("...")
    assert json.loads(msg.body)["reason"] == "é" * 5000  # the body keeps it whole
