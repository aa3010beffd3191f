"""Outbox rows read from the table instead of the WAL: what backfill, recover and replay send.

A row read here goes through the same ``OutboxMapper`` and ``MessageBuilder`` as a streamed
INSERT: the reader describes the table as a pgoutput Relation would and hands each row over as
the text pgoutput would have sent (every column cast to text, in the relay's session DateStyle
and TimeZone), so a hostile row is refused or dead-lettered for the same reasons, with the same
message id, whichever way it arrives.

What the table cannot say, it says honestly. A row has no WAL position: its events carry
``source.snapshot = true`` and the position of the snapshot they were read in (an upper bound
of their commit), or ``0/0`` for a replay. Its transaction id is the row's ``xmin``. Its commit
time is PostgreSQL's own when ``track_commit_timestamp`` is on, else its ``created_at`` (the
time its transaction started), else the time of the read.

Rows are read in ``(created_at, id)`` order, which keeps every aggregate's events in the order
they were created, through a server-side cursor (memory stays flat whatever the table's size),
and a read can continue after any row's key: how an interrupted backfill resumes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

from psycopg import sql
from psycopg.adapt import Buffer, Loader

from cdc_relay import catalog
from cdc_relay.config import Config
from cdc_relay.errors import BrokerRefused, InvalidEvent, SetupError
from cdc_relay.lsn import Lsn
from cdc_relay.messages import MessageBuilder, OutgoingMessage, TransactionInfo
from cdc_relay.outbox import OutboxColumns, OutboxEvent, OutboxMapper
from cdc_relay.pgoutput import Column, Insert, Relation

FETCH_ROWS = 2000  # rows per round trip of the server-side cursor
# created_at values that make an honest commit-time stand-in (an AMQP timestamp is unsigned
# and Python's datetime ends at year 9999)
_SANE_TIME = "'1970-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00'"
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in µs since 1970

Key = tuple[str | None, str | None]  # (created_at as text, id as text): a read resumes after it


def builder(cfg: Config, database: str, frame_max: int) -> MessageBuilder:
    """The message builder a table read uses: the stream's routes, columns and prefix."""
    return MessageBuilder(
        cfg.slot,
        database,
        cfg.routing_key,
        cfg.exchange,
        {f"{s}.{t}": cfg.route(s, t) for s, t in cfg.tables},
        frame_max,
        columns=OutboxColumns(**{k: cfg.columns(k) for k in OutboxColumns.__dataclass_fields__}),
        message_prefix=cfg.message_prefix,
    )


class _RawText(Loader):
    """text → the bytes PostgreSQL sent: what the mapper reads from pgoutput too."""

    def load(self, data: Buffer) -> bytes:
        return bytes(data)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which rows to read; every field left None selects all of them.

    ``since``/``until`` compare the row's time: its commit time where PostgreSQL knows it
    (``track_commit_timestamp = on``), else its ``created_at``.
    """

    since: dt.datetime | None = None
    until: dt.datetime | None = None
    aggregate_type: str | None = None
    aggregate_id: str | None = None
    ids: tuple[str, ...] | None = None

    def describe(self) -> str:
        parts = []
        if self.since is not None:
            parts.append(f"since {self.since.isoformat()}")
        if self.until is not None:
            parts.append(f"until {self.until.isoformat()}")
        if self.aggregate_type is not None:
            parts.append(f"aggregate type {self.aggregate_type!r}")
        if self.aggregate_id is not None:
            parts.append(f"aggregate id {self.aggregate_id!r}")
        if self.ids is not None:
            parts.append(f"{len(self.ids)} listed ids")
        return ", ".join(parts) or "every row"


@dataclass(frozen=True, slots=True)
class Row:
    """One row read: its event, or why it cannot be one, and where a read resumes after it."""

    key: Key
    tx: TransactionInfo
    event: OutboxEvent | None
    invalid: InvalidEvent | None


def commit_timestamps(conn: catalog.Conn) -> bool:
    """Whether PostgreSQL records commit times (``track_commit_timestamp``)."""
    row = conn.execute("SELECT current_setting('track_commit_timestamp')").fetchone()
    return row is not None and row[0] == "on"


class OutboxTable:
    """One outbox table as a reader sees it: its columns and types, and how it is ordered."""

    def __init__(self, conn: catalog.Conn, cfg: Config, schema: str, name: str) -> None:
        self.schema = schema
        self.name = name
        self.display = f"{schema}.{name}"
        rows = conn.execute(
            "SELECT c.oid::bigint, a.attname, a.atttypid::bigint, a.atttypmod, "
            "format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped "
            "AND a.attgenerated = '' ORDER BY a.attnum",
            (schema, name),
        ).fetchall()
        if not rows:
            raise SetupError(f"outbox table {self.display} does not exist")
        self.oid = int(str(rows[0][0]))
        self.columns = tuple(
            Column(flags=0, name=str(r[1]), type_oid=int(str(r[2])), type_modifier=int(str(r[3])))
            for r in rows
        )
        types = {str(r[1]): str(r[4]) for r in rows}
        self.id_column = next(c for c in cfg.columns("id") if c in types)
        self.id_type = types[self.id_column]
        self.created_column = next((c for c in cfg.columns("created_at") if c in types), None)
        self._names = {
            field: next((c for c in cfg.columns(field) if c in types), cfg.columns(field)[0])
            for field in ("aggregate_type", "aggregate_id")
        }

    def relation(self) -> Relation:
        return Relation(
            oid=self.oid,
            namespace=self.schema,
            name=self.name,
            replica_identity=ord("d"),
            columns=self.columns,
        )

    def query(
        self, selection: Selection, after: Key | None, commit_times: bool
    ) -> tuple[sql.Composed, dict[str, object]]:
        """The ordered SELECT of the selected rows after ``after``, and its parameters."""
        created = sql.Identifier(self.created_column) if self.created_column else None
        ident = sql.Identifier(self.id_column)
        commit = sql.SQL("pg_xact_commit_timestamp(xmin)") if commit_times else sql.NULL
        sane = (
            sql.SQL("CASE WHEN {c} BETWEEN " + _SANE_TIME + " THEN {c} END").format(c=created)
            if created
            else sql.NULL
        )
        row_time = sql.SQL("coalesce({}, {})").format(commit, created or sql.NULL)
        order = sql.SQL("coalesce({}, '-infinity'::timestamptz), {}").format(
            created or sql.NULL, ident
        )
        where: list[sql.Composable] = []
        params: dict[str, object] = {}
        if (selection.since or selection.until) and not (commit_times or created):
            raise SetupError(
                f"outbox table {self.display} has no created_at column and "
                "track_commit_timestamp is off: nothing tells a row's time, so --since and "
                "--until cannot select by it"
            )
        if selection.since is not None:
            where.append(sql.SQL("{} >= %(since)s").format(row_time))
            params["since"] = selection.since
        if selection.until is not None:
            where.append(sql.SQL("{} < %(until)s").format(row_time))
            params["until"] = selection.until
        for field, value in (
            ("aggregate_type", selection.aggregate_type),
            ("aggregate_id", selection.aggregate_id),
        ):
            if value is not None:
                column = self._present(field)
                where.append(sql.SQL("{}::text = %({})s").format(column, sql.SQL(field)))
                params[field] = value
        if selection.ids is not None:
            where.append(
                sql.SQL("{} = ANY(CAST(%(ids)s AS {}[]))").format(ident, sql.SQL(self.id_type))
            )
            params["ids"] = list(selection.ids)
        if after is not None:
            where.append(
                sql.SQL(
                    "({}) > (coalesce(CAST(%(after_at)s AS timestamptz), '-infinity'), "
                    "CAST(%(after_id)s AS {}))"
                ).format(order, sql.SQL(self.id_type))
            )
            params["after_at"], params["after_id"] = after
        query = sql.SQL(
            "SELECT xmin::text::bigint, (extract(epoch FROM coalesce({commit}, {sane}, "
            "transaction_timestamp())) * 1000000)::bigint - {epoch}, {ident}::text, {created}, "
            "{columns} FROM {table}{where} ORDER BY {order}"
        ).format(
            commit=commit,
            sane=sane,
            epoch=sql.Literal(_PG_EPOCH_US),
            ident=ident,
            created=sql.SQL("{}::text").format(created) if created else sql.NULL,
            columns=sql.SQL(", ").join(
                sql.SQL("{}::text").format(sql.Identifier(c.name)) for c in self.columns
            ),
            table=sql.Identifier(self.schema, self.name),
            where=sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
            order=order,
        )
        return query, params

    def _present(self, field: str) -> sql.Identifier:
        return sql.Identifier(self._names[field])


class RowReader:
    """Reads one table's selected rows as events, in order, ``FETCH_ROWS`` at a time.

    ``conn`` must be in a transaction (a named cursor lives in one); for a backfill it is the
    transaction that imported the slot's snapshot.
    """

    def __init__(
        self,
        cfg: Config,
        table: OutboxTable,
        position: Lsn,
        *,
        replay: str | None = None,
    ) -> None:
        self._table = table
        self._position = position
        self._replay = replay
        columns = OutboxColumns(**{k: cfg.columns(k) for k in OutboxColumns.__dataclass_fields__})
        self._mapper = OutboxMapper([(table.schema, table.name)], columns)
        self._mapper.relation(table.relation())

    def rows(
        self, conn: catalog.Conn, selection: Selection, after: Key | None, commit_times: bool
    ) -> Iterator[list[Row]]:
        query, params = self._table.query(selection, after, commit_times)
        with conn.cursor(name="cdc_relay_read") as cur:
            cur.adapters.register_loader("text", _RawText)
            cur.execute(query, params)
            while batch := cur.fetchmany(FETCH_ROWS):
                yield [self._row(r) for r in batch]

    def _row(self, raw: tuple[object, ...]) -> Row:
        xid, commit_us, key_id, key_at, *values = raw
        tx = TransactionInfo(
            int(str(xid)),
            self._position,
            int(str(commit_us)),
            snapshot=True,
            replay=self._replay,
        )
        key = (_text(key_at), _text(key_id))
        insert = Insert(relation_oid=self._table.oid, new=tuple(values))  # type: ignore[arg-type]
        try:
            event = self._mapper.event(insert, self._position)
        except InvalidEvent as err:
            return Row(key, tx, None, err)
        return Row(key, tx, event, None)


def _text(value: object) -> str | None:
    return None if value is None else bytes(value).decode()  # type: ignore[call-overload]


def message(cfg: Config, builder: MessageBuilder, row: Row) -> tuple[OutgoingMessage, str]:
    """The message for a row read from the table, and why it is diverted ("" if it is not).

    The policies are the stream's: an invalid row halts unless ``invalid_event_policy =
    dead_letter``, an event over ``max_message_size`` goes to ``dead_letter_exchange`` as a
    stub or halts. A halt names the row so the operator can fix or delete it and run again.
    """
    invalid = row.invalid
    if invalid is None:
        assert row.event is not None
        try:
            out = builder.build(row.event, row.tx)
        except InvalidEvent as err:
            invalid = err
        else:
            if len(out.body) <= cfg.max_message_size:
                return out, ""
            reason = f"message of {len(out.body)} bytes exceeds max_message_size"
            if not cfg.dead_letter_exchange:
                raise BrokerRefused(
                    f"{reason} {cfg.max_message_size}: set dead_letter_exchange to divert such "
                    "events, or raise the broker's max_message_size and this setting",
                    event_id=row.event.id,
                    relation=row.event.table,
                )
            stub = builder.oversize(row.event, row.tx, out, cfg.dead_letter_exchange, reason)
            return stub, "oversize"
    if cfg.invalid_event_policy != "dead_letter":
        invalid.message = (
            f"{invalid.message}: this row cannot be published as it is; fix or delete it in "
            "the outbox table and run again, or set invalid_event_policy = dead_letter (with "
            "dead_letter_exchange) to divert it"
        )
        raise invalid
    return builder.dead_letter(invalid, row.tx, cfg.dead_letter_exchange), "invalid"
