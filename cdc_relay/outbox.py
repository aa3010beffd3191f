"""From pgoutput changes to outbox events.

Only INSERTs into an outbox table are events: an UPDATE or DELETE of an outbox row is
housekeeping (applications often delete the row in the same transaction to keep the table empty),
and changes to other tables are none of the relay's business. Columns are found by name in the
latest Relation message, so adding, reordering or retyping columns while the relay runs is
harmless; a required column that vanished is an ``OutboxError`` raised at the first INSERT that
needs it, before anything of that INSERT is published.

Events may also be written without a table, as transactional logical decoding messages
(``pg_logical_emit_message(true, 'outbox', '{...}')``): same envelope, no table bloat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from cdc_relay.errors import OutboxError
from cdc_relay.lsn import Lsn
from cdc_relay.pgoutput import Binary, ColumnValue, Insert, Message, Relation, UnchangedToast

# type OIDs whose text output is already JSON and can be embedded without re-parsing
JSON_OID = 114
JSONB_OID = 3802
BYTEA_OID = 17


class OutboxEvent(msgspec.Struct, frozen=True):
    """One outbox row, as raw as possible: JSON columns stay undecoded bytes."""

    id: str
    aggregate_type: str
    aggregate_id: str
    type: str
    payload: bytes | None  # JSON text, or None for SQL NULL
    headers: bytes | None  # JSON object text from the optional headers column
    traceparent: str | None
    created_at: str | None  # timestamptz text output (ISO, set by the connection's DateStyle)
    lsn: Lsn  # WAL position of the INSERT (or of the logical message)
    table: str = ""  # "schema.table" it came from; "" for a logical message


def _names(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else value


@dataclass(frozen=True, slots=True)
class OutboxColumns:
    """Configured column names (Debezium-compatible defaults); each may list aliases."""

    id: str | tuple[str, ...] = "id"
    aggregate_type: str | tuple[str, ...] = "aggregatetype"
    aggregate_id: str | tuple[str, ...] = "aggregateid"
    type: str | tuple[str, ...] = "type"
    payload: str | tuple[str, ...] = "payload"
    headers: str | tuple[str, ...] = "headers"
    traceparent: str | tuple[str, ...] = "traceparent"
    created_at: str | tuple[str, ...] = "created_at"

    REQUIRED = ("id", "aggregate_type", "aggregate_id", "type", "payload")
    OPTIONAL = ("headers", "traceparent", "created_at")


PAYLOAD_JSON = 0  # json/jsonb: embed as-is
PAYLOAD_TEXT = 1  # text-like: check it is JSON, then embed
PAYLOAD_BYTEA = 2  # bytea hex output: decode, check, embed


@dataclass(frozen=True, slots=True)
class _Layout:
    """Positions of the outbox columns in one Relation's tuples (-1: column absent)."""

    table: str
    id: int
    aggregate_type: int
    aggregate_id: int
    type: int
    payload: int
    payload_kind: int
    headers: int
    traceparent: int
    created_at: int


@dataclass(frozen=True, slots=True)
class _MissingColumn:
    """A Relation of an outbox table that lacks a required column."""

    relation: str
    column: str


class _MessageEvent(msgspec.Struct, frozen=True):
    """The JSON content of a table-less outbox event."""

    id: str
    aggregatetype: str
    aggregateid: str
    type: str
    payload: msgspec.Raw = msgspec.Raw(b"null")
    headers: msgspec.Raw = msgspec.Raw(b"null")  # msgspec cannot decode ``Raw | None``
    traceparent: str | None = None


_message_decoder = msgspec.json.Decoder(_MessageEvent)
_json_check = msgspec.json.Decoder()


class OutboxMapper:
    """Remembers Relation messages and turns outbox INSERTs into ``OutboxEvent`` values."""

    __slots__ = ("_columns", "_layouts", "_prefix", "_relations", "_tables")

    def __init__(
        self,
        tables: Sequence[tuple[str, str]],
        columns: OutboxColumns | None = None,
        message_prefix: str = "outbox",
    ) -> None:
        self._tables = frozenset(tables)
        self._columns = columns or OutboxColumns()
        self._prefix = message_prefix
        self._relations: dict[int, Relation] = {}
        self._layouts: dict[int, _Layout | _MissingColumn] = {}

    def relation(self, rel: Relation) -> None:
        """Apply a Relation message; it replaces any earlier one for the same OID."""
        self._relations[rel.oid] = rel
        self._layouts.pop(rel.oid, None)
        if self.is_outbox(rel):
            self._layouts[rel.oid] = self._layout(rel)

    def is_outbox(self, rel: Relation) -> bool:
        return (rel.namespace or "pg_catalog", rel.name) in self._tables

    def relation_name(self, oid: int) -> str:
        rel = self._relations.get(oid)
        return f"{rel.namespace}.{rel.name}" if rel else f"oid {oid}"

    def is_outbox_oid(self, oid: int) -> bool:
        return oid in self._layouts

    def event(self, insert: Insert, lsn: Lsn) -> OutboxEvent | None:
        """The event an INSERT stands for, or None when it is not into an outbox table."""
        layout = self._layouts.get(insert.relation_oid)
        if layout is None:
            if insert.relation_oid not in self._relations:
                raise OutboxError(
                    "INSERT for a relation the server never described",
                    relation_oid=insert.relation_oid,
                    lsn=lsn,
                )
            return None
        if isinstance(layout, _MissingColumn):
            raise OutboxError(
                f"outbox table has no column {layout.column!r}; restore it, or list its new "
                f'name in the column_* setting (e.g. "{layout.column},new_name"), then '
                "restart: the slot has not moved past this event",
                relation=layout.relation,
                column=layout.column,
                lsn=lsn,
            )
        row = insert.new
        rel = layout.table
        c = self._columns
        event_id = _required(row, layout.id, c.id, rel, lsn, None)
        payload = _value(row, layout.payload, c.payload, rel, lsn, event_id)
        if payload is not None and layout.payload_kind != PAYLOAD_JSON:
            payload = _json_payload(payload, layout.payload_kind, c.payload, rel, lsn, event_id)
        return OutboxEvent(
            id=event_id,
            aggregate_type=_required(
                row, layout.aggregate_type, c.aggregate_type, rel, lsn, event_id
            ),
            aggregate_id=_required(row, layout.aggregate_id, c.aggregate_id, rel, lsn, event_id),
            type=_required(row, layout.type, c.type, rel, lsn, event_id),
            payload=payload,
            headers=_value(row, layout.headers, c.headers, rel, lsn, event_id),
            traceparent=_optional_text(row, layout.traceparent, c.traceparent, rel, lsn, event_id),
            created_at=_optional_text(row, layout.created_at, c.created_at, rel, lsn, event_id),
            lsn=lsn,
            table=rel,
        )

    def message_event(self, msg: Message) -> OutboxEvent | None:
        """The event a logical decoding message stands for; None if it is not one of ours.

        Non-transactional messages are ignored: they are not tied to a commit, so publishing
        them would break the promise that only committed events go out.
        """
        if not msg.transactional or msg.prefix != self._prefix:
            return None
        try:
            m = _message_decoder.decode(msg.content)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise OutboxError(
                f"logical message with prefix {msg.prefix!r} is not an outbox event object "
                f"({_short(exc)})",
                lsn=msg.lsn,
            ) from None
        headers: bytes | None = bytes(m.headers)
        if headers == b"null":
            headers = None
        return OutboxEvent(
            id=m.id,
            aggregate_type=m.aggregatetype,
            aggregate_id=m.aggregateid,
            type=m.type,
            payload=bytes(m.payload),
            headers=headers,
            traceparent=m.traceparent,
            created_at=None,
            lsn=msg.lsn,
            table="",
        )

    def _layout(self, rel: Relation) -> _Layout | _MissingColumn:
        index = {col.name: i for i, col in enumerate(rel.columns)}
        c = self._columns
        name = f"{rel.namespace}.{rel.name}"
        pos: dict[str, int] = {}
        for key in (*OutboxColumns.REQUIRED, *OutboxColumns.OPTIONAL):
            names = _names(getattr(c, key))
            pos[key] = next((index[n] for n in names if n in index), -1)
            if pos[key] < 0 and key in OutboxColumns.REQUIRED:
                # kept, not raised: the relay must fail at the first INSERT that needs it,
                # with that INSERT's LSN, not at a schema change nobody publishes through
                return _MissingColumn(relation=name, column=names[0])
        payload_type = rel.columns[pos["payload"]].type_oid
        kind = (
            PAYLOAD_JSON
            if payload_type in (JSON_OID, JSONB_OID)
            else PAYLOAD_BYTEA
            if payload_type == BYTEA_OID
            else PAYLOAD_TEXT
        )
        return _Layout(
            table=name,
            id=pos["id"],
            aggregate_type=pos["aggregate_type"],
            aggregate_id=pos["aggregate_id"],
            type=pos["type"],
            payload=pos["payload"],
            payload_kind=kind,
            headers=pos["headers"],
            traceparent=pos["traceparent"],
            created_at=pos["created_at"],
        )


def _short(exc: Exception) -> str:
    return str(exc).split("\n")[0][:120]


def _error(
    problem: str, column: str | tuple[str, ...], rel: str, lsn: Lsn, event_id: str | None
) -> OutboxError:
    """Every row-level error names the relation, column, LSN and (when known) the event."""
    return OutboxError(problem, relation=rel, column=_names(column)[0], lsn=lsn, event_id=event_id)


def _value(
    row: tuple[ColumnValue, ...],
    pos: int,
    column: str | tuple[str, ...],
    rel: str,
    lsn: Lsn,
    event_id: str | None,
) -> bytes | None:
    if pos < 0:
        return None
    if pos >= len(row):
        raise _error("INSERT carries fewer columns than the table", column, rel, lsn, event_id)
    value = row[pos]
    if value is None or type(value) is bytes:
        return value
    if isinstance(value, UnchangedToast):
        raise _error(
            "column arrived as unchanged TOAST, its value is unknown", column, rel, lsn, event_id
        )
    if isinstance(value, Binary):
        raise _error(
            "column arrived in binary format, which the relay does not request",
            column,
            rel,
            lsn,
            event_id,
        )
    return bytes(value)


def _text(
    value: bytes, column: str | tuple[str, ...], rel: str, lsn: Lsn, event_id: str | None
) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise _error("column is not valid UTF-8", column, rel, lsn, event_id) from None


def _required(
    row: tuple[ColumnValue, ...],
    pos: int,
    column: str | tuple[str, ...],
    rel: str,
    lsn: Lsn,
    event_id: str | None,
) -> str:
    value = _value(row, pos, column, rel, lsn, event_id)
    if value is None:
        raise _error("required column is NULL", column, rel, lsn, event_id)
    return _text(value, column, rel, lsn, event_id)


def _optional_text(
    row: tuple[ColumnValue, ...],
    pos: int,
    column: str | tuple[str, ...],
    rel: str,
    lsn: Lsn,
    event_id: str | None,
) -> str | None:
    value = _value(row, pos, column, rel, lsn, event_id)
    return None if value is None else _text(value, column, rel, lsn, event_id)


def _json_payload(
    value: bytes,
    kind: int,
    column: str | tuple[str, ...],
    rel: str,
    lsn: Lsn,
    event_id: str,
) -> bytes:
    """A payload column that is not json/jsonb: bytea (hex text output) or text holding JSON."""
    if kind == PAYLOAD_BYTEA:
        if not value.startswith(b"\\x"):
            raise _error(
                "bytea payload is not in hex output format (set bytea_output = 'hex')",
                column,
                rel,
                lsn,
                event_id,
            )
        try:
            value = bytes.fromhex(value[2:].decode("ascii"))
        except ValueError:
            raise _error("bytea payload is not valid hex", column, rel, lsn, event_id) from None
    try:
        _json_check.decode(value)
    except msgspec.DecodeError:
        raise _error(
            "payload column does not hold valid JSON", column, rel, lsn, event_id
        ) from None
    return value
