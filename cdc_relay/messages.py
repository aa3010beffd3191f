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


class TransactionInfo:
    """What the Begin message tells about the transaction every event in it belongs to.

    The derived values are computed once here, at Begin, not once per event.
    """

    __slots__ = ("commit_lsn", "commit_lsn_text", "commit_time", "committed_at", "timestamp", "xid")

    def __init__(self, xid: int, commit_lsn: Lsn, commit_time: int) -> None:
        self.xid = xid
        self.commit_lsn = commit_lsn
        self.commit_time = commit_time  # µs since 2000-01-01 UTC
        self.commit_lsn_text = str(commit_lsn)
        self.committed_at = PG_EPOCH + dt.timedelta(microseconds=commit_time)
        self.timestamp = int(self.committed_at.timestamp())


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """Everything the AMQP adapter needs to publish one event; pika-free so it is testable."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    type: str
    timestamp: int  # commit time, unix seconds
    headers: dict[str, object]


_KEY_CACHE_SIZE = 10_000
_encoder = msgspec.json.Encoder()
_headers_decoder = msgspec.json.Decoder(dict[str, object])


class MessageBuilder:
    """Builds outgoing messages for one slot/database.

    Events go to ``exchange`` with ``routing_key_template`` unless their table has a route of
    its own (several outbox tables, one per bounded context).
    """

    __slots__ = ("_database", "_default", "_keys", "_routes", "_slot")

    def __init__(
        self,
        slot: str,
        database: str,
        routing_key_template: str,
        exchange: str = "outbox",
        routes: dict[str, tuple[str, str]] | None = None,
    ) -> None:
        self._slot = slot
        self._database = database
        self._default = (exchange, routing_key_template)
        self._routes = routes or {}
        self._keys: dict[tuple[str, str, str], str] = {}

    def build(self, event: OutboxEvent, tx: TransactionInfo) -> OutgoingMessage:
        lsn = str(event.lsn)
        envelope = EnvelopeV1(
            id=event.id,
            aggregate_type=event.aggregate_type,
            aggregate_id=event.aggregate_id,
            type=event.type,
            payload=_NULL if event.payload is None else msgspec.Raw(event.payload),
            occurred_at=_timestamp(event),
            committed_at=tx.committed_at,
            source=Source(
                lsn=lsn,
                commit_lsn=tx.commit_lsn_text,
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
        headers["source_lsn"] = lsn
        if event.traceparent:
            headers["traceparent"] = event.traceparent
        exchange, template = self._routes.get(event.table, self._default)
        return OutgoingMessage(
            exchange=exchange,
            routing_key=self.routing_key(event, template),
            body=_encoder.encode(envelope),
            message_id=event.id,
            type=event.type,
            timestamp=tx.timestamp,
            headers=headers,
        )

    def routing_key(self, event: OutboxEvent, template: str | None = None) -> str:
        template = template or self._default[1]
        per_aggregate = "{aggregateid" in template
        if not per_aggregate:
            # keys repeat per (aggregate type, event type): render each once
            cached = self._keys.get((template, event.aggregate_type, event.type))
            if cached is not None:
                return cached
        key = template.format(
            aggregatetype=event.aggregate_type, aggregateid=event.aggregate_id, type=event.type
        )
        if len(key.encode()) > 255:
            raise OutboxError("routing key longer than 255 bytes", event_id=event.id, lsn=event.lsn)
        if not per_aggregate:
            if len(self._keys) >= _KEY_CACHE_SIZE:
                self._keys.clear()
            self._keys[(template, event.aggregate_type, event.type)] = key
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
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    if text.endswith("+00"):  # the relay's session runs in UTC: nearly always this
        return value
    return value.astimezone(dt.UTC)


def _extra_headers(event: OutboxEvent) -> dict[str, object]:
    assert event.headers is not None
    try:
        return _headers_decoder.decode(event.headers)
    except msgspec.DecodeError:
        raise OutboxError(
            "headers column is not a JSON object", event_id=event.id, lsn=event.lsn
        ) from None
