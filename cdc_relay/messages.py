"""The message contract: envelope v1 and the AMQP properties that go with it.

The body is a tagged msgspec Struct (``"v": 1`` first), so a future v2 is a new tagged type that
consumers can add to a union while v1 keeps decoding; new v1 fields only ever come with defaults.
The outbox payload is embedded as ``msgspec.Raw``: the JSON PostgreSQL produced is copied into the
body byte for byte, never parsed and re-serialised (no float or key-order drift, no cost).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import msgspec

from cdc_relay.errors import OutboxError
from cdc_relay.lsn import Lsn
from cdc_relay.outbox import OutboxEvent

APP_ID = "cdc-relay"
CONTENT_TYPE = "application/json"
PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_NULL = msgspec.Raw(b"null")


class Source(msgspec.Struct, frozen=True):
    lsn: str  # the INSERT's WAL position
    commit_lsn: str
    txid: int
    slot: str
    database: str


class EnvelopeV1(msgspec.Struct, frozen=True, tag_field="v", tag=1):
    """Body of every message. Consumers decode ``EnvelopeV1`` (or a union with later versions)."""

    id: str
    aggregate_type: str
    aggregate_id: str
    type: str
    payload: msgspec.Raw
    occurred_at: dt.datetime | None
    committed_at: dt.datetime
    source: Source


@dataclass(frozen=True, slots=True)
class TransactionInfo:
    """What the Begin message tells about the transaction every event in it belongs to."""

    xid: int
    commit_lsn: Lsn
    commit_time: int  # µs since 2000-01-01 UTC

    @property
    def committed_at(self) -> dt.datetime:
        return PG_EPOCH + dt.timedelta(microseconds=self.commit_time)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """Everything the AMQP adapter needs to publish one event; pika-free so it is testable."""

    routing_key: str
    body: bytes
    message_id: str
    type: str
    timestamp: int  # commit time, unix seconds
    headers: dict[str, object]


_encoder = msgspec.json.Encoder()
_headers_decoder = msgspec.json.Decoder(dict[str, object])


class MessageBuilder:
    """Builds outgoing messages for one slot/database with a fixed routing-key template."""

    __slots__ = ("_database", "_slot", "_template")

    def __init__(self, slot: str, database: str, routing_key_template: str) -> None:
        self._slot = slot
        self._database = database
        self._template = routing_key_template

    def build(self, event: OutboxEvent, tx: TransactionInfo) -> OutgoingMessage:
        committed_at = tx.committed_at
        envelope = EnvelopeV1(
            id=event.id,
            aggregate_type=event.aggregate_type,
            aggregate_id=event.aggregate_id,
            type=event.type,
            payload=_NULL if event.payload is None else msgspec.Raw(event.payload),
            occurred_at=_timestamp(event),
            committed_at=committed_at,
            source=Source(
                lsn=str(event.lsn),
                commit_lsn=str(tx.commit_lsn),
                txid=tx.xid,
                slot=self._slot,
                database=self._database,
            ),
        )
        headers: dict[str, object] = {}
        if event.headers is not None:
            headers.update(_extra_headers(event))
        headers["aggregate_type"] = event.aggregate_type
        headers["aggregate_id"] = event.aggregate_id
        headers["source_lsn"] = str(event.lsn)
        if event.traceparent:
            headers["traceparent"] = event.traceparent
        return OutgoingMessage(
            routing_key=self.routing_key(event),
            body=_encoder.encode(envelope),
            message_id=event.id,
            type=event.type,
            timestamp=int(committed_at.timestamp()),
            headers=headers,
        )

    def routing_key(self, event: OutboxEvent) -> str:
        key = self._template.format(
            aggregatetype=event.aggregate_type, aggregateid=event.aggregate_id, type=event.type
        )
        if len(key.encode()) > 255:
            raise OutboxError("routing key longer than 255 bytes", event_id=event.id, lsn=event.lsn)
        return key


def _timestamp(event: OutboxEvent) -> dt.datetime | None:
    """timestamptz text (ISO DateStyle, as the relay's connection requests) → aware datetime."""
    text = event.created_at
    if text is None:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        # 'infinity' and BC dates have no RFC 3339 form; the event is still worth delivering
        return None
    return value.astimezone(dt.UTC) if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _extra_headers(event: OutboxEvent) -> dict[str, object]:
    assert event.headers is not None
    try:
        return _headers_decoder.decode(event.headers)
    except msgspec.DecodeError:
        raise OutboxError(
            "headers column is not a JSON object", event_id=event.id, lsn=event.lsn
        ) from None
