"""The message contract: envelope v1, the AMQP properties that go with it, and the messages the
relay sends instead when an event cannot go out as it is.

The body is a tagged msgspec Struct (``"v": 1`` first), so a future v2 is a new tagged type that
consumers can add to a union while v1 keeps decoding; new v1 fields only ever come with defaults.
The outbox payload is embedded as ``msgspec.Raw``: the JSON PostgreSQL produced is copied into the
body byte for byte, never parsed and re-serialised (no float or key-order drift, no cost).

Everything AMQP-bound is validated and encoded here, before the relay issues a delivery tag:
``MessageBuilder.build`` either returns a message the broker accepts exactly as built (its
properties already encoded, its content-header frame within ``frame_max``) or raises
``InvalidEvent``. A publish can then only fail at the broker for the broker's own reasons.

Row headers (the outbox ``headers`` column) become AMQP header values by JSON type: string → S,
boolean → t, integer within signed 64 bits → l, other number → d, null → V, object → F (nested
table), array → A. Numbers jsonb accepts but AMQP cannot hold travel as their text in an S
value: integers beyond signed 64 bits as their decimal digits, and numbers a double cannot hold
(``1e400``, which overflows, or ``1e-400``, which would silently become 0) as their JSON text.
Reserved keys are refused, never renamed: ``CC`` and ``BCC`` (RabbitMQ routes extra copies by
them, or closes the channel), any ``x-*`` key (the broker's and the relay's own: ``x-death``,
``x-delay``, ``x-cdc-relay-reason``, ``x-original-*`` must not be forgeable), and the headers the
relay sets itself. All of these are compared without regard to case.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import math

import msgspec

from cdc_relay.amqp import (
    CONTENT_HEADER_OVERHEAD,
    SHORTSTR_MAX,
    EncodeError,
    encode_event_properties,
    encode_properties,
)
from cdc_relay.errors import ConfigError, InvalidEvent
from cdc_relay.lsn import Lsn
from cdc_relay.outbox import OutboxColumns, OutboxEvent
from cdc_relay.replication import PG_EPOCH_UNIX

APP_ID = "cdc-relay"
CONTENT_TYPE = "application/json"
DELIVERY_MODE = 2  # persistent
DEFAULT_FRAME_MAX = 131072  # RabbitMQ's default; the driver sets the negotiated value
PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
INVALID_EVENT_TYPE = "cdc-relay.invalid_event"
INVALID_ROUTING_KEY = "cdc-relay.invalid"
# headers the relay sets on every event; a row may not set them
RELAY_HEADERS = ("aggregate_type", "aggregate_id", "source_lsn", "traceparent", "tracestate")
REPLAY_HEADER = "x-cdc-relay-replay"  # on a re-published event: the replay's id
_RESERVED = frozenset(("cc", "bcc", *RELAY_HEADERS))
_REASON_MAX = 512  # bytes of x-cdc-relay-reason: bounded, so a dead letter always fits a frame
_NULL = msgspec.Raw(b"null")


class Source(msgspec.Struct, frozen=True, omit_defaults=True):
    """Where an event came from. ``snapshot`` is true for an event read from the outbox
    *table* (backfill, recover, replay) instead of the WAL: its ``lsn`` and ``commit_lsn`` are
    then the position of the snapshot it was read in (every such row committed before it), or
    ``0/0`` for a replay, not the row's own. Streamed events leave it out (false)."""

    lsn: str  # the INSERT's WAL position
    commit_lsn: str
    txid: int
    slot: str
    database: str
    snapshot: bool = False


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


class InvalidEventSource(msgspec.Struct, frozen=True):
    lsn: str | None  # the INSERT's (or logical message's) WAL position, when known
    commit_lsn: str
    txid: int
    slot: str
    database: str


class InvalidEventV1(msgspec.Struct, frozen=True):
    """Body of a dead-lettered invalid event (AMQP type ``cdc-relay.invalid_event``).

    It carries the row exactly as PostgreSQL sent it, so a person or a tool can repair it and
    insert it again: ``row`` maps every column to its text (null for SQL NULL, and for values
    PostgreSQL did not send as text: unchanged TOAST, binary); a value that is not valid UTF-8
    is left out of ``row`` and given in ``row_base64`` instead. For a logical message the
    "columns" are ``content`` and ``prefix``. ``reason`` and ``column`` say what was wrong.
    """

    v: int = 1
    kind: str = "invalid_event"
    reason: str = ""
    column: str | None = None
    event_id: str | None = None
    relation: str | None = None  # "schema.table"; null for a logical message
    row: dict[str, str | None] = {}
    row_base64: dict[str, str] = {}
    source: InvalidEventSource | None = None
    committed_at: dt.datetime | None = None


class TransactionInfo:
    """What the Begin message tells about the transaction every event in it belongs to.

    The derived values are computed once here, at Begin, not once per event.
    """

    __slots__ = (
        "commit_lsn",
        "commit_lsn_text",
        "commit_time",
        "committed_at",
        "replay",
        "snapshot",
        "timestamp",
        "xid",
    )

    def __init__(
        self,
        xid: int,
        commit_lsn: Lsn,
        commit_time: int,
        *,
        snapshot: bool = False,
        replay: str | None = None,
    ) -> None:
        """``snapshot``: the event was read from the table (see ``Source.snapshot``);
        ``replay``: the replay's id, sent in the ``x-cdc-relay-replay`` header."""
        self.xid = xid
        self.snapshot = snapshot
        self.replay = replay
        self.commit_lsn = commit_lsn
        self.commit_time = commit_time  # µs since 2000-01-01 UTC
        self.commit_lsn_text = str(commit_lsn)
        # (days, seconds, microseconds) positionally: a third cheaper than the keyword
        self.committed_at = PG_EPOCH + dt.timedelta(0, 0, commit_time)
        self.timestamp = commit_time // 1_000_000 + PG_EPOCH_UNIX


class OutgoingMessage(msgspec.Struct, frozen=True, gc=False):
    """Everything the AMQP adapter needs to publish one message; pika-free so it is testable.

    ``properties`` is the encoded AMQP basic-properties list (what follows the content-header
    prefix on the wire) and is what gets sent; ``headers`` is the same table as Python values,
    for tests and tracing only: changing it changes nothing on the wire.
    """

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    type: str
    timestamp: int  # commit time, unix seconds
    headers: dict[str, object]
    properties: bytes


_KEY_CACHE_SIZE = 10_000
_encoder = msgspec.json.Encoder()
# the names a logical message's JSON uses for the event's fields (the Debezium defaults)
_MESSAGE_FIELDS = OutboxColumns()
# where a routing-key template field comes from: (template name, OutboxEvent field)
_KEY_FIELDS = (
    ("aggregatetype", "aggregate_type"),
    ("aggregateid", "aggregate_id"),
    ("type", "type"),
)


class MessageBuilder:
    """Builds outgoing messages for one slot/database.

    Events go to ``exchange`` with ``routing_key_template`` unless their table has a route of
    its own (several outbox tables, one per bounded context). ``frame_max`` is the connection's
    negotiated frame size: the driver sets it when the broker connection opens, because a
    content-header frame (properties, so ids and headers) can never be split across frames.
    ``columns`` and ``message_prefix`` are the mapper's, so errors and dead letters name
    columns as the table does.
    """

    __slots__ = (
        "_columns",
        "_database",
        "_default",
        "_keys",
        "_prefix",
        "_routes",
        "_slot",
        "frame_max",
    )

    def __init__(
        self,
        slot: str,
        database: str,
        routing_key_template: str,
        exchange: str = "outbox",
        routes: dict[str, tuple[str, str]] | None = None,
        frame_max: int = DEFAULT_FRAME_MAX,
        *,
        columns: OutboxColumns | None = None,
        message_prefix: str = "outbox",
    ) -> None:
        self._slot = slot
        self._database = database
        self._default = (exchange, routing_key_template)
        self._routes = routes or {}
        self._keys: dict[tuple[str, str, str], str] = {}
        self._columns = columns or OutboxColumns()
        self._prefix = message_prefix
        self.frame_max = frame_max

    # -- events -----------------------------------------------------------------------------------
    def build(
        self, event: OutboxEvent, tx: TransactionInfo, traceparent: str | None = None
    ) -> OutgoingMessage:
        """The message for one event, fully encoded; ``InvalidEvent`` if it cannot be one.

        ``traceparent`` (the relay's own span, when tracing is on) replaces the row's
        traceparent column in the headers.
        """
        exchange, template = self._routes.get(event.table, self._default)
        routing_key = self.routing_key(event, template)
        lsn = str(event.lsn)
        row_headers = event.headers
        headers = {} if row_headers is None else self._row_headers(event)
        headers["aggregate_type"] = event.aggregate_type
        headers["aggregate_id"] = event.aggregate_id
        headers["source_lsn"] = lsn
        if traceparent is None:
            traceparent = event.traceparent
        if traceparent:
            headers["traceparent"] = traceparent
        replay = tx.replay
        if replay is not None:
            headers[REPLAY_HEADER] = replay
        body = self._body(event, tx, lsn)
        properties = self._properties(event, tx, headers, row_headers is None and replay is None)
        return OutgoingMessage(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            message_id=event.id,
            type=event.type,
            timestamp=tx.timestamp,
            headers=headers,
            properties=properties,
        )

    def destination(self, event: OutboxEvent) -> tuple[str, str]:
        """(exchange, routing key) of an event: cheap, so a span can name them before build.

        Routing keys are built from row data (review 2.4): a dot inside ``aggregatetype`` or
        ``type`` adds a topic word, and ``#``/``*`` in data are plain characters to the broker
        (they are wildcards only in binding keys). Only the AMQP limit is enforced here.
        """
        exchange, template = self._routes.get(event.table, self._default)
        return exchange, self.routing_key(event, template)

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
        try:
            size = len(key.encode())
        except UnicodeEncodeError:
            raise self._invalid(
                "routing key text holds a lone surrogate", _key_field(template, event), event
            ) from None
        if size > SHORTSTR_MAX:
            raise self._invalid(
                f"routing key of {size} bytes is longer than 255 bytes (AMQP's limit); it is "
                "built from this column by the routing_key template",
                _key_field(template, event),
                event,
            )
        if not per_aggregate:
            if len(self._keys) >= _KEY_CACHE_SIZE:
                self._keys.clear()
            self._keys[(template, event.aggregate_type, event.type)] = key
        return key

    # -- what goes instead ------------------------------------------------------------------------
    def oversize(
        self,
        event: OutboxEvent,
        tx: TransactionInfo,
        out: OutgoingMessage,
        exchange: str,
        reason: str,
    ) -> OutgoingMessage:
        """A stub for the dead-letter exchange, for an event whose body the broker refuses.

        Payload and row headers are omitted (the body is what was too large); the headers
        say why, where the event would have gone, and that the payload is gone
        (``x-cdc-relay-payload: omitted``): with the insert-then-delete pattern it exists
        nowhere else any more. Never raises ``InvalidEvent`` (``out`` was built, so its id and
        type fit): if the stub's headers would not fit a frame, the long relay headers are cut
        to 255 bytes and named in ``x-cdc-relay-truncated``; the body keeps them whole.
        """
        _check_exchange(exchange)
        stub = msgspec.structs.replace(event, payload=None, headers=None)
        lsn = str(event.lsn)
        headers: dict[str, object] = {
            "aggregate_type": event.aggregate_type,
            "aggregate_id": event.aggregate_id,
            "source_lsn": lsn,
        }
        traceparent = out.headers.get("traceparent")
        if isinstance(traceparent, str) and traceparent:
            headers["traceparent"] = traceparent
        headers["x-cdc-relay-reason"] = _truncate(_printable(reason), _REASON_MAX)
        headers["x-cdc-relay-payload"] = "omitted"
        headers["x-original-exchange"] = out.exchange
        headers["x-original-routing-key"] = out.routing_key
        headers["x-source-lsn"] = lsn
        try:
            properties = self._properties(stub, tx, headers)
        except InvalidEvent:
            cut = [k for k in ("aggregate_type", "aggregate_id", "traceparent") if k in headers]
            for key in cut:
                headers[key] = _truncate(_printable(str(headers[key])), SHORTSTR_MAX)
            headers["x-cdc-relay-truncated"] = ",".join(cut)
            properties = self._properties(stub, tx, headers)
        return OutgoingMessage(
            exchange=exchange,
            routing_key=out.routing_key,
            body=self._body(stub, tx, lsn),
            message_id=event.id,
            type=event.type,
            timestamp=tx.timestamp,
            headers=headers,
            properties=properties,
        )

    def dead_letter(self, err: InvalidEvent, tx: TransactionInfo, exchange: str) -> OutgoingMessage:
        """The message for the dead-letter exchange that carries an invalid row and the reason.

        Always encodable, whatever the row: the body is an ``InvalidEventV1`` (raw values as
        text or base64), the headers are the relay's own and bounded, the message id is the
        event id when AMQP can carry it, else ``invalid:`` + the SHA-256 of the raw id (or of
        the whole row when there is no id) so a replay sends the same id again. The routing key
        is the event's when its row allows building one, else ``cdc-relay.invalid``.
        """
        _check_exchange(exchange)
        row = err.row or {}
        text, base64_values = _split_row(row)
        lsn = None if err.lsn is None else str(err.lsn)
        body = _encoder.encode(
            InvalidEventV1(
                reason=_printable(err.problem),
                column=_printable_or_none(err.column),
                event_id=_printable_or_none(err.event_id),
                relation=_printable_or_none(err.relation),
                row=text,
                row_base64=base64_values,
                source=InvalidEventSource(
                    lsn=lsn,
                    commit_lsn=tx.commit_lsn_text,
                    txid=tx.xid,
                    slot=self._slot,
                    database=self._database,
                ),
                committed_at=tx.committed_at,
            )
        )
        reason = err.problem if err.column is None else f"{err.problem} (column {err.column})"
        headers: dict[str, object] = {
            "x-cdc-relay-reason": _truncate(_printable(reason), _REASON_MAX),
            "x-commit-lsn": tx.commit_lsn_text,
        }
        if lsn is not None:
            headers["x-source-lsn"] = lsn
        if err.relation:
            headers["x-original-relation"] = _truncate(_printable(err.relation), SHORTSTR_MAX)
        message_id = self._dead_letter_id(err, row)
        timestamp = max(tx.timestamp, 0)
        return OutgoingMessage(
            exchange=exchange,
            routing_key=self._dead_letter_key(err, row),
            body=body,
            message_id=message_id,
            type=INVALID_EVENT_TYPE,
            timestamp=timestamp,
            headers=headers,
            properties=encode_properties(
                CONTENT_TYPE,
                headers,
                DELIVERY_MODE,
                message_id,
                timestamp,
                INVALID_EVENT_TYPE,
                APP_ID,
            ),
        )

    # -- parts of build ---------------------------------------------------------------------------
    def _body(self, event: OutboxEvent, tx: TransactionInfo, lsn: str) -> bytes:
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
                snapshot=tx.snapshot,
            ),
        )
        try:
            return _encoder.encode(envelope)
        except UnicodeEncodeError:
            raise self._not_unicode(event) from None

    def _properties(
        self,
        event: OutboxEvent,
        tx: TransactionInfo,
        headers: dict[str, object],
        strings: bool | None = None,
    ) -> bytes:
        """``strings=True``: ``headers`` are the relay's own only (the row added none), built
        by ``build``, and take the one-join encoder; ``False``: the row added some, take the
        general encoder; ``None``: look."""
        try:
            if strings:
                properties = encode_event_properties(
                    CONTENT_TYPE,
                    event.aggregate_type,
                    event.aggregate_id,
                    headers["source_lsn"],  # type: ignore[arg-type]
                    headers.get("traceparent"),  # type: ignore[arg-type]
                    DELIVERY_MODE,
                    event.id,
                    tx.timestamp,
                    event.type,
                    APP_ID,
                )
            else:
                properties = encode_properties(
                    CONTENT_TYPE,
                    headers,
                    DELIVERY_MODE,
                    event.id,
                    tx.timestamp,
                    event.type,
                    APP_ID,
                    strings=strings,
                )
        except UnicodeEncodeError:
            raise self._not_unicode(event) from None
        except EncodeError as exc:
            raise self._unencodable(exc, event) from None
        if CONTENT_HEADER_OVERHEAD + len(properties) > self.frame_max:
            raise self._too_large(event, headers, len(properties))
        return properties

    def _not_unicode(self, event: OutboxEvent) -> InvalidEvent:
        # only text made in Python, never text decoded from WAL, can hold a lone surrogate
        return self._invalid(
            "text holds a lone surrogate, not valid Unicode", _surrogate_field(event), event
        )

    def _unencodable(self, exc: EncodeError, event: OutboxEvent) -> InvalidEvent:
        field = {"message_id": "id", "type": "type", "timestamp": None}.get(exc.field, "headers")
        return self._invalid(exc.problem, field, event)

    def _too_large(
        self, event: OutboxEvent, headers: dict[str, object], properties: int
    ) -> InvalidEvent:
        size = CONTENT_HEADER_OVERHEAD + properties
        field, part = _largest_part(event, headers)
        return self._invalid(
            f"AMQP content header of {size} bytes exceeds frame_max {self.frame_max}: ids "
            f"and headers must fit one frame (only a body is split); this column adds "
            f"{part} bytes",
            field,
            event,
        )

    def _row_headers(self, event: OutboxEvent) -> dict[str, object]:
        """The row's headers JSON as AMQP-ready values; refuses non-objects and reserved keys."""
        raw = event.headers
        assert raw is not None
        try:
            value = _headers_decoder.decode(raw)
        except msgspec.ValidationError:  # an integer msgspec will not read (> 4300 digits)
            try:
                value = _decode_headers_slowly(raw)
            except (ValueError, RecursionError):
                raise self._invalid("headers column is not valid JSON", "headers", event) from None
        except (msgspec.DecodeError, RecursionError):
            raise self._invalid("headers column is not valid JSON", "headers", event) from None
        if type(value) is not dict:
            raise self._invalid("headers column is not a JSON object", "headers", event)
        for key in value:
            folded = key.lower()
            if folded in _RESERVED or folded.startswith("x-"):
                raise self._invalid(
                    f"header key {_prefix(key)} is reserved: CC/BCC route copies, x-* keys "
                    "belong to the broker and the relay, and the relay sets "
                    f"{', '.join(RELAY_HEADERS)} itself",
                    "headers",
                    event,
                )
        return value

    # -- errors -----------------------------------------------------------------------------------
    def _invalid(self, problem: str, field: str | None, event: OutboxEvent) -> InvalidEvent:
        """``InvalidEvent`` for an event, naming the column (as configured, first name)."""
        names = self._columns if event.table else _MESSAGE_FIELDS
        return InvalidEvent(
            problem,
            column=None if field is None else names.names(field)[0],
            event_id=event.id,
            lsn=event.lsn,
            relation=event.table or None,
            row=self._row_of(event),
        )

    def _row_of(self, event: OutboxEvent) -> dict[str, bytes | None]:
        """The raw row an event came from, as far as the event still holds it.

        Text columns come back byte for byte (they were decoded from UTF-8); columns of the
        table that are not outbox columns are not known here. A logical message is rebuilt as
        equivalent JSON content.
        """
        if not event.table:
            return {"content": _message_content(event), "prefix": self._prefix.encode()}
        c = self._columns
        row: dict[str, bytes | None] = {
            c.names("id")[0]: _utf8(event.id),
            c.names("aggregate_type")[0]: _utf8(event.aggregate_type),
            c.names("aggregate_id")[0]: _utf8(event.aggregate_id),
            c.names("type")[0]: _utf8(event.type),
            c.names("payload")[0]: event.payload,
        }
        if event.headers is not None:
            row[c.names("headers")[0]] = event.headers
        if event.traceparent is not None:
            row[c.names("traceparent")[0]] = _utf8(event.traceparent)
        if event.created_at is not None:
            row[c.names("created_at")[0]] = _utf8(event.created_at)
        return row

    def _dead_letter_id(self, err: InvalidEvent, row: dict[str, bytes | None]) -> str:
        event_id = err.event_id
        if event_id:
            try:
                if len(event_id.encode()) <= SHORTSTR_MAX:
                    return event_id
            except UnicodeEncodeError:
                pass
            seed = _utf8(event_id)
        else:
            raw_id = next((row[n] for n in self._columns.names("id") if row.get(n)), None)
            seed = raw_id if raw_id is not None else _canonical(row)
        return "invalid:" + hashlib.sha256(seed).hexdigest()

    def _dead_letter_key(self, err: InvalidEvent, row: dict[str, bytes | None]) -> str:
        """The routing key the event would have had, when its row still allows building it."""
        template = self._routes.get(err.relation or "", self._default)[1]
        fields = _message_key_fields(row) if err.relation is None else self._key_fields(row)
        try:
            key = template.format_map(fields)
            if len(key.encode()) <= SHORTSTR_MAX:
                return key
        except (KeyError, IndexError, AttributeError, ValueError):
            pass  # the template needs a field the row cannot give (UnicodeError is a ValueError)
        return INVALID_ROUTING_KEY

    def _key_fields(self, row: dict[str, bytes | None]) -> dict[str, str]:
        fields: dict[str, str] = {}
        for name, field in _KEY_FIELDS:
            raw = next((row[n] for n in self._columns.names(field) if row.get(n) is not None), None)
            if raw is not None:
                with contextlib.suppress(UnicodeDecodeError):
                    fields[name] = raw.decode()
        return fields


# -- helpers --------------------------------------------------------------------------------------
def _json_float(text: str) -> float | str:
    """A JSON number with a fraction or exponent: a double when one holds it, else its text."""
    value = float(text)
    if math.isinf(value) or (value == 0.0 and _nonzero(text)):
        return text
    return value


def _nonzero(text: str) -> bool:
    mantissa = text.lower().partition("e")[0]
    return mantissa.strip("+-0.") != ""


def _json_int(text: str) -> int | str:
    # JSON integers have no leading zeros: more than 20 characters is beyond signed 64 bits
    return int(text) if len(text) <= 20 else text


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


_headers_decoder = msgspec.json.Decoder(float_hook=_json_float)


def _decode_headers_slowly(raw: bytes) -> object:
    """The fallback for integers msgspec will not read (over 4300 digits; jsonb takes them)."""
    return json.loads(
        raw.decode(), parse_int=_json_int, parse_float=_json_float, parse_constant=_no_constant
    )


def _key_field(template: str, event: OutboxEvent) -> str | None:
    """The event field that makes the largest part of a routing key built from ``template``."""
    used = [field for name, field in _KEY_FIELDS if "{" + name in template]
    return max(used, key=lambda f: len(getattr(event, f)), default=None)


def _largest_part(event: OutboxEvent, headers: dict[str, object]) -> tuple[str, int]:
    """Which column contributes most to the properties, and how many bytes."""
    traceparent = headers.get("traceparent")
    parts = {
        "aggregate_id": len(_utf8(event.aggregate_id)),
        "aggregate_type": len(_utf8(event.aggregate_type)),
        "headers": len(event.headers or b""),
        "traceparent": len(_utf8(traceparent)) if isinstance(traceparent, str) else 0,
    }
    field = max(parts, key=parts.__getitem__)
    return field, parts[field]


def _surrogate_field(event: OutboxEvent) -> str | None:
    for field in ("id", "aggregate_type", "aggregate_id", "type", "traceparent", "created_at"):
        value = getattr(event, field)
        if value is not None:
            try:
                value.encode()
            except UnicodeEncodeError:
                return field
    return None


def _utf8(text: str) -> bytes:
    """Text as bytes, even when made in Python with a lone surrogate (kept, not lost)."""
    return text.encode("utf-8", "surrogatepass")


def _printable(text: str) -> str:
    """Text that encodes as UTF-8: lone surrogates become visible escapes."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def _printable_or_none(text: str | None) -> str | None:
    return None if text is None else _printable(text)


def _truncate(text: str, limit: int) -> str:
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."


def _prefix(text: str) -> str:
    return repr(text[:40]) + ("..." if len(text) > 40 else "")


def _check_exchange(exchange: str) -> None:
    if len(exchange.encode()) > SHORTSTR_MAX:
        raise ConfigError("dead_letter_exchange", "exchange name longer than 255 bytes")


def _split_row(row: dict[str, bytes | None]) -> tuple[dict[str, str | None], dict[str, str]]:
    """Raw column values as JSON-safe text, and base64 for values that are not UTF-8."""
    text: dict[str, str | None] = {}
    other: dict[str, str] = {}
    for name, value in row.items():
        key = _printable(name)
        if value is None:
            text[key] = None
            continue
        try:
            text[key] = value.decode()
        except UnicodeDecodeError:
            other[key] = base64.b64encode(value).decode("ascii")
    return text, other


def _canonical(row: dict[str, bytes | None]) -> bytes:
    """An unambiguous byte form of a row, for a stable message id when there is no id."""
    parts = []
    for name, value in sorted(row.items()):
        parts.append(_utf8(name) + b"\x00")
        if value is None:
            parts.append(b"-")
        else:
            parts.append(b"+" + len(value).to_bytes(8, "big") + value)
    return b"".join(parts)


class _KeyFieldsOfMessage(msgspec.Struct):
    aggregatetype: str | None = None
    aggregateid: str | None = None
    type: str | None = None


_key_fields_decoder = msgspec.json.Decoder(_KeyFieldsOfMessage)


def _message_key_fields(row: dict[str, bytes | None]) -> dict[str, str]:
    """Routing-key fields from a logical message's content, when it is an object holding them."""
    content = row.get("content")
    if content is None:
        return {}
    try:
        m = _key_fields_decoder.decode(content)
    except (msgspec.DecodeError, RecursionError):
        return {}
    found = (("aggregatetype", m.aggregatetype), ("aggregateid", m.aggregateid), ("type", m.type))
    return {name: value for name, value in found if value is not None}


def _message_content(event: OutboxEvent) -> bytes:
    """A logical message's JSON content rebuilt from its event (ASCII-escaped text)."""
    parts = [
        b'{"id":',
        json.dumps(event.id).encode(),
        b',"aggregatetype":',
        json.dumps(event.aggregate_type).encode(),
        b',"aggregateid":',
        json.dumps(event.aggregate_id).encode(),
        b',"type":',
        json.dumps(event.type).encode(),
        b',"payload":',
        b"null" if event.payload is None else event.payload,
        b',"headers":',
        b"null" if event.headers is None else event.headers,
    ]
    if event.traceparent is not None:
        parts += (b',"traceparent":', json.dumps(event.traceparent).encode())
    parts.append(b"}")
    return b"".join(parts)


def _timestamp(event: OutboxEvent) -> dt.datetime | None:
    """timestamptz text (ISO DateStyle, as the relay's connection requests) → aware datetime."""
    text = event.created_at
    if text is None:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        if text.endswith("+00"):  # the relay's session runs in UTC: nearly always this
            return value
        return value.astimezone(dt.UTC)
    except (ValueError, OverflowError):
        # 'infinity', BC dates and instants beyond year 9999 in UTC have no RFC 3339 form; the
        # event is still worth delivering
        return None
