"""From pgoutput changes to outbox events.

Only INSERTs into an outbox table are events: an UPDATE or DELETE of an outbox row is
housekeeping (applications often delete the row in the same transaction to keep the table empty),
and changes to other tables are none of the relay's business. Columns are found by name in the
latest Relation message, so adding, reordering or retyping columns while the relay runs is
harmless; a required column that vanished is an ``OutboxError`` raised at the first INSERT that
needs it, before anything of that INSERT is published.

Events may also be written without a table, as transactional logical decoding messages
(``pg_logical_emit_message(true, 'outbox', '{...}')``): same envelope, no table bloat.

Two kinds of failure, kept apart on purpose:

* the *table* cannot produce events (a required column missing, an INSERT for a relation the
  server never described): ``OutboxError``. Every row would fail the same way; the operator
  fixes the table or the configuration.
* one *row* cannot (NULL id, text that is not UTF-8, unchanged TOAST, payload that is not JSON,
  ...): ``InvalidEvent`` carrying every column of that INSERT as raw bytes, so
  ``invalid_event_policy = dead_letter`` can hand the row, whole, to someone who can repair it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from cdc_relay.errors import InvalidEvent, OutboxError
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

    def names(self, field: str) -> tuple[str, ...]:
        """Every name configured for ``field`` (an ``OutboxEvent`` field name), first preferred."""
        return _names(getattr(self, field))


PAYLOAD_JSON = 0  # json/jsonb: embed as-is
PAYLOAD_TEXT = 1  # text-like: check it is JSON, then embed
PAYLOAD_BYTEA = 2  # bytea hex output: decode, check, embed


@dataclass(frozen=True, slots=True)
class _Layout:
    """Positions of the outbox columns in one Relation's tuples (-1: column absent)."""

    table: str
    names: tuple[str, ...]  # every column of the Relation, for the raw row of an InvalidEvent
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
# Syntax only: nothing is materialised, and numbers jsonb accepts (1e400, 40-digit integers)
# are not rejected for not fitting a Python float.
_json_check = msgspec.json.Decoder(msgspec.Raw)


class _BadValue(Exception):
    """A row-level problem found by the column helpers; ``event`` adds the row's context.

    Raised instead of ``InvalidEvent`` so the per-column helpers need no context arguments on
    the hot path: the full error (relation, LSN, event id, the raw row) is built only when
    something is wrong.
    """

    def __init__(self, problem: str, pos: int) -> None:
        super().__init__(problem)
        self.problem = problem
        self.pos = pos


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

    @property
    def prefix(self) -> str:
        """The logical-message prefix whose messages are outbox events."""
        return self._prefix

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
        """The event an INSERT stands for, or None when it is not into an outbox table.

        A row that cannot be an event raises ``InvalidEvent`` (with the raw row); a table that
        cannot produce events raises ``OutboxError``.
        """
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
        if layout.payload_kind == PAYLOAD_JSON:
            event = _plain_event(row, layout, lsn)
            if event is not None:
                return event
        event_id: str | None = None
        try:
            event_id = _required(row, layout.id)
            payload = _value(row, layout.payload)
            if payload is not None and layout.payload_kind != PAYLOAD_JSON:
                payload = _json_payload(payload, layout.payload_kind, layout.payload)
            return OutboxEvent(
                id=event_id,
                aggregate_type=_required(row, layout.aggregate_type),
                aggregate_id=_required(row, layout.aggregate_id),
                type=_required(row, layout.type),
                payload=payload,
                headers=_value(row, layout.headers),
                traceparent=_optional_text(row, layout.traceparent),
                created_at=_optional_text(row, layout.created_at),
                lsn=lsn,
                table=layout.table,
            )
        except _BadValue as bad:
            raise InvalidEvent(
                bad.problem,
                column=layout.names[bad.pos],
                event_id=event_id,
                lsn=lsn,
                relation=layout.table,
                row=_raw_row(layout.names, row),
            ) from None

    def message_event(self, msg: Message) -> OutboxEvent | None:
        """The event a logical decoding message stands for; None if it is not one of ours.

        Non-transactional messages are ignored: they are not tied to a commit, so publishing
        them would break the promise that only committed events go out. Content with our prefix
        that is not an outbox event object raises ``InvalidEvent`` with the raw content.
        """
        if not msg.transactional or msg.prefix != self._prefix:
            return None
        content = msg.content
        try:
            if not content.isascii():
                # msgspec checks the UTF-8 of the fields it decodes, not of the Raw payload
                content.decode()
            m = _message_decoder.decode(content)
        except UnicodeDecodeError as exc:
            raise self._invalid_message(msg, f"not valid UTF-8 (byte {exc.start})") from None
        except (msgspec.DecodeError, RecursionError) as exc:
            raise self._invalid_message(msg, _short(exc)) from None
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

    @staticmethod
    def _invalid_message(msg: Message, reason: str) -> InvalidEvent:
        return InvalidEvent(
            f"logical message with prefix {msg.prefix!r} is not an outbox event object ({reason})",
            column="content",
            lsn=msg.lsn,
            row={"content": bytes(msg.content), "prefix": msg.prefix.encode()},
        )

    def _layout(self, rel: Relation) -> _Layout | _MissingColumn:
        index = {col.name: i for i, col in enumerate(rel.columns)}
        c = self._columns
        name = f"{rel.namespace}.{rel.name}"
        pos: dict[str, int] = {}
        for key in (*OutboxColumns.REQUIRED, *OutboxColumns.OPTIONAL):
            names = c.names(key)
            pos[key] = next((index[n] for n in names if n in index), -1)
            if pos[key] < 0 and key in OutboxColumns.REQUIRED:
                # kept, not raised: the relay must fail at the first INSERT that needs it,
                # with that INSERT's LSN, not at a schema change nobody publishes through
                return _MissingColumn(relation=name, column=names[0])
        # Domain types: a Relation carries the domain's OID, not its base type's, so a payload
        # column typed as a domain over jsonb lands on the text path below. That is still
        # correct (the text is JSON and gets checked), only slower than passing it through.
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
            names=tuple(col.name for col in rel.columns),
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


def _short(exc: BaseException) -> str:
    return str(exc).split("\n")[0][:120]


def _plain_event(row: tuple[ColumnValue, ...], layout: _Layout, lsn: Lsn) -> OutboxEvent | None:
    """The event of a row with nothing unusual in it, read in one go; else None.

    Nearly every row: text columns in UTF-8, required ones present, a json/jsonb payload. A row
    that is not like that (NULL, TOAST or binary markers, bad UTF-8, too few columns) returns
    None and goes the careful way, which names its problem.
    """
    try:
        payload = row[layout.payload]
        headers = row[layout.headers] if layout.headers >= 0 else None
        traceparent = row[layout.traceparent] if layout.traceparent >= 0 else None
        created_at = row[layout.created_at] if layout.created_at >= 0 else None
        if (payload is not None and type(payload) is not bytes) or (
            headers is not None and type(headers) is not bytes
        ):
            return None
        return OutboxEvent(
            id=row[layout.id].decode(),  # type: ignore[union-attr]
            aggregate_type=row[layout.aggregate_type].decode(),  # type: ignore[union-attr]
            aggregate_id=row[layout.aggregate_id].decode(),  # type: ignore[union-attr]
            type=row[layout.type].decode(),  # type: ignore[union-attr]
            payload=payload,
            headers=headers,
            traceparent=None if traceparent is None else traceparent.decode(),  # type: ignore[union-attr]
            created_at=None if created_at is None else created_at.decode(),  # type: ignore[union-attr]
            lsn=lsn,
            table=layout.table,
        )
    except (AttributeError, IndexError, UnicodeDecodeError):
        return None


def _raw_row(names: tuple[str, ...], row: tuple[ColumnValue, ...]) -> dict[str, bytes | None]:
    """Every column of an INSERT by name, as PostgreSQL sent it (TOAST/binary markers: None)."""
    return {name: _raw(row[i]) if i < len(row) else None for i, name in enumerate(names)}


def _raw(value: ColumnValue) -> bytes | None:
    return bytes(value) if isinstance(value, bytes) else None


def _value(row: tuple[ColumnValue, ...], pos: int) -> bytes | None:
    if pos < 0:
        return None
    if pos >= len(row):
        raise _BadValue("INSERT carries fewer columns than the table", pos)
    value = row[pos]
    if value is None or type(value) is bytes:
        return value
    if isinstance(value, UnchangedToast):
        raise _BadValue("column arrived as unchanged TOAST, its value is unknown", pos)
    if isinstance(value, Binary):
        raise _BadValue("column arrived in binary format, which the relay does not request", pos)
    return bytes(value)


def _text(value: bytes, pos: int) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise _BadValue("column is not valid UTF-8", pos) from None


def _required(row: tuple[ColumnValue, ...], pos: int) -> str:
    value = _value(row, pos)
    if value is None:
        raise _BadValue("required column is NULL", pos)
    return _text(value, pos)


def _optional_text(row: tuple[ColumnValue, ...], pos: int) -> str | None:
    value = _value(row, pos)
    return None if value is None else _text(value, pos)


def _json_payload(value: bytes, kind: int, pos: int) -> bytes:
    """A payload column that is not json/jsonb: bytea (hex text output) or text holding JSON.

    Checked for syntax (and UTF-8) only, without building objects: O(1) memory, and every
    number jsonb accepts passes.
    """
    if kind == PAYLOAD_BYTEA:
        if not value.startswith(b"\\x"):
            raise _BadValue(
                "bytea payload is not in hex output format: the relay sets bytea_output = "
                "'hex' on its sessions, so something (a role or database setting applied "
                "later, a proxy) overrides it",
                pos,
            )
        try:
            value = bytes.fromhex(value[2:].decode("ascii"))
        except ValueError:
            raise _BadValue("bytea payload is not valid hex", pos) from None
    try:
        if not value.isascii():
            value.decode()
        _json_check.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise _BadValue("payload column does not hold valid JSON in UTF-8", pos) from None
    return value
