"""The message contract: envelope v1 body, AMQP properties, routing key."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import msgspec
import pytest

from cdc_relay.errors import OutboxError
from cdc_relay.lsn import Lsn
from cdc_relay.messages import (
    APP_ID,
    CONTENT_TYPE,
    EnvelopeV1,
    MessageBuilder,
    OutgoingMessage,
    Source,
    TransactionInfo,
)
from cdc_relay.outbox import OutboxEvent

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


def test_relay_headers_win_over_extra_headers() -> None:
    extra = b'{"aggregate_id": "spoofed", "source_lsn": "0/0", "x": "y"}'
    msg = build(make_event(headers=extra))
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
