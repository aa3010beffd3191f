"""From pgoutput changes to outbox events.

Only INSERTs into the outbox table are events: an UPDATE or DELETE of an outbox row is
housekeeping (applications often delete the row in the same transaction to keep the table empty),
and changes to other tables are none of the relay's business. Columns are found by name in the
latest Relation message, so adding or reordering columns while the relay runs is harmless; a
required column that vanished is an ``OutboxError`` raised before anything is published.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from cdc_relay.errors import OutboxError
from cdc_relay.lsn import Lsn
from cdc_relay.pgoutput import Binary, ColumnValue, Insert, Relation, UnchangedToast

# type OIDs whose text output is already JSON and can be embedded without re-parsing
JSON_OID = 114
JSONB_OID = 3802


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
    lsn: Lsn  # WAL position of the INSERT


@dataclass(frozen=True, slots=True)
class OutboxColumns:
    """Configured column names (Debezium-compatible defaults)."""

    id: str = "id"
    aggregate_type: str = "aggregatetype"
    aggregate_id: str = "aggregateid"
    type: str = "type"
    payload: str = "payload"
    headers: str = "headers"
    traceparent: str = "traceparent"
    created_at: str = "created_at"


@dataclass(frozen=True, slots=True)
class _Layout:
    """Positions of the outbox columns in one Relation's tuples (-1: column absent)."""

    id: int
    aggregate_type: int
    aggregate_id: int
    type: int
    payload: int
    payload_is_json: bool
    headers: int
    traceparent: int
    created_at: int


@dataclass(frozen=True, slots=True)
class _MissingColumn:
    """A Relation of the outbox that lacks a required column."""

    relation: str
    column: str


class OutboxMapper:
    """Remembers Relation messages and turns outbox INSERTs into ``OutboxEvent`` values."""

    __slots__ = ("_columns", "_layouts", "_name", "_relations", "_schema")

    def __init__(self, schema: str, table: str, columns: OutboxColumns | None = None) -> None:
        self._schema = schema
        self._name = table
        self._columns = columns or OutboxColumns()
        self._relations: dict[int, Relation] = {}
        self._layouts: dict[int, _Layout | _MissingColumn] = {}

    def relation(self, rel: Relation) -> None:
        """Apply a Relation message; it replaces any earlier one for the same OID."""
        self._relations[rel.oid] = rel
        self._layouts.pop(rel.oid, None)
        if self.is_outbox(rel):
            self._layouts[rel.oid] = self._layout(rel)

    def is_outbox(self, rel: Relation) -> bool:
        schema = rel.namespace or "pg_catalog"
        return schema == self._schema and rel.name == self._name

    def relation_name(self, oid: int) -> str:
        rel = self._relations.get(oid)
        return f"{rel.namespace}.{rel.name}" if rel else f"oid {oid}"

    def is_outbox_oid(self, oid: int) -> bool:
        return oid in self._layouts

    def event(self, insert: Insert, lsn: Lsn) -> OutboxEvent | None:
        """The event an INSERT stands for, or None when it is not into the outbox."""
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
                f"outbox table has no column {layout.column!r}; restore it or set the "
                "column_* setting, then restart (the slot has not moved past this event)",
                relation=layout.relation,
                column=layout.column,
                lsn=lsn,
            )
        row = insert.new
        rel = self.relation_name(insert.relation_oid)
        c = self._columns
        event_id = _required(row, layout.id, c.id, rel, lsn, None)
        payload = _value(row, layout.payload, c.payload, rel, lsn, event_id)
        if payload is not None and not layout.payload_is_json:
            _check_json(payload, c.payload, rel, lsn, event_id)
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
        )

    def _layout(self, rel: Relation) -> _Layout | _MissingColumn:
        index = {col.name: i for i, col in enumerate(rel.columns)}
        c = self._columns
        name = f"{rel.namespace}.{rel.name}"
        for required in (c.id, c.aggregate_type, c.aggregate_id, c.type, c.payload):
            if required not in index:
                # kept, not raised: the relay must fail at the first INSERT that needs it,
                # with that INSERT's LSN, not at a schema change nobody publishes through
                return _MissingColumn(relation=name, column=required)
        payload_type = rel.columns[index[c.payload]].type_oid
        return _Layout(
            id=index[c.id],
            aggregate_type=index[c.aggregate_type],
            aggregate_id=index[c.aggregate_id],
            type=index[c.type],
            payload=index[c.payload],
            payload_is_json=payload_type in (JSON_OID, JSONB_OID),
            headers=index.get(c.headers, -1),
            traceparent=index.get(c.traceparent, -1),
            created_at=index.get(c.created_at, -1),
        )


def _value(
    row: tuple[ColumnValue, ...], pos: int, column: str, rel: str, lsn: Lsn, event_id: str | None
) -> bytes | None:
    if pos < 0 or pos >= len(row):
        if pos < 0:
            return None
        raise OutboxError(
            "INSERT carries fewer columns than the table", relation=rel, column=column, lsn=lsn
        )
    value = row[pos]
    if value is None or type(value) is bytes:
        return value
    if isinstance(value, UnchangedToast):
        raise OutboxError(
            "column arrived as unchanged TOAST, its value is unknown",
            relation=rel,
            column=column,
            lsn=lsn,
            event_id=event_id,
        )
    if isinstance(value, Binary):
        raise OutboxError(
            "column arrived in binary format, which the relay does not request",
            relation=rel,
            column=column,
            lsn=lsn,
            event_id=event_id,
        )
    return bytes(value)


def _text(value: bytes, column: str, rel: str, lsn: Lsn, event_id: str | None) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise OutboxError(
            "column is not valid UTF-8", relation=rel, column=column, lsn=lsn, event_id=event_id
        ) from None


def _required(
    row: tuple[ColumnValue, ...], pos: int, column: str, rel: str, lsn: Lsn, event_id: str | None
) -> str:
    value = _value(row, pos, column, rel, lsn, event_id)
    if value is None:
        raise OutboxError(
            "required column is NULL", relation=rel, column=column, lsn=lsn, event_id=event_id
        )
    return _text(value, column, rel, lsn, event_id)


def _optional_text(
    row: tuple[ColumnValue, ...], pos: int, column: str, rel: str, lsn: Lsn, event_id: str | None
) -> str | None:
    value = _value(row, pos, column, rel, lsn, event_id)
    return None if value is None else _text(value, column, rel, lsn, event_id)


_json_check = msgspec.json.Decoder()


def _check_json(value: bytes, column: str, rel: str, lsn: Lsn, event_id: str) -> None:
    try:
        _json_check.decode(value)
    except msgspec.DecodeError:
        raise OutboxError(
            "column does not hold valid JSON",
            relation=rel,
            column=column,
            lsn=lsn,
            event_id=event_id,
        ) from None
