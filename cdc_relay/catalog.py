"""Slot, publication and outbox-table management over an ordinary SQL connection.

Start-up checks fail closed: a relay streaming from the wrong slot, an invalidated slot or a
publication that misses the outbox would silently lose events, so every mismatch becomes a
``SetupError`` that tells the operator what to run. A lost slot is never recreated by the relay:
doing so would skip every event in the lost WAL without anyone noticing. To know that a missing
slot is *lost* rather than *not created yet*, every slot the relay creates is recorded in the
publication's comment (a marker that survives failover, ``pg_basebackup`` and restores, because
the publication is an ordinary catalog row); only ``cdc-relay init``, asked for by an operator,
creates a slot the marker says existed.

Names only ever reach SQL as bound parameters or as ``psycopg.sql.Identifier``; the SQL printed
in error hints is quoted the same way, so it can be pasted as-is.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

import psycopg
from psycopg import sql

from cdc_relay import partitions
from cdc_relay.config import Config, redact
from cdc_relay.errors import POSTGRES, ConnectionLost, SetupError, SlotBusy
from cdc_relay.lsn import Lsn
from cdc_relay.postgres import (
    APPLICATION_NAME,
    connect_failure,
    encoding_problem,
    is_transient_sqlstate,
    quote_ident,
    quote_literal,
    session_conninfo,
)

Conn: TypeAlias = "psycopg.Connection[tuple[object, ...]]"

log = logging.getLogger("cdc_relay")

MIN_SERVER_VERSION = 140000
# column lists and row filters on publications exist from PostgreSQL 15 on
PUBLICATION_FILTERS_VERSION = 150000
# failover slots (synchronised to standbys with sync_replication_slots) exist from 17 on
FAILOVER_SLOTS_VERSION = 170000
# how often (at most) the daemon records its newest confirmed commit for `recover --since`
CONFIRMED_RECORD_INTERVAL = 60.0
SINCE_MARGIN = timedelta(minutes=5)
# the periodic publication re-check must never hang the relay on a busy catalog
WATERMARK_STATEMENT_TIMEOUT = "5s"

# (column key as in Config.columns(), default name, type and constraints): sql/outbox.sql
OUTBOX_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("id", "id", "uuid        PRIMARY KEY"),
    ("aggregate_type", "aggregatetype", "text        NOT NULL"),
    ("aggregate_id", "aggregateid", "text        NOT NULL"),
    ("type", "type", "text        NOT NULL"),
    ("payload", "payload", "jsonb"),
    ("headers", "headers", "jsonb"),
    ("traceparent", "traceparent", "text"),
    ("created_at", "created_at", "timestamptz NOT NULL DEFAULT clock_timestamp()"),
)
REQUIRED_COLUMNS = ("id", "aggregate_type", "aggregate_id", "type", "payload")
_RELKINDS = {
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
    "S": "sequence",
    "i": "index",
    "I": "index",
    "c": "composite type",
    "t": "TOAST table",
}
# besides postgres.TRANSIENT_SQLSTATES: a statement cancelled (statement_timeout) may pass next time
_QUERY_CANCELED = "57014"


@dataclass(frozen=True, slots=True)
class SlotStatus:
    slot: str
    exists: bool
    active: bool
    active_pid: int | None
    confirmed_flush_lsn: Lsn | None
    current_wal_lsn: Lsn
    lag_bytes: int | None
    wal_status: str | None
    plugin: str | None
    database: str | None
    publication_exists: bool
    publication_tables: tuple[str, ...]


def connect(cfg: Config) -> Conn:
    """An autocommit SQL connection with the relay's application_name and session settings.

    The same settings as the replication connection (``postgres.session_conninfo``): UTF-8,
    TCP liveness, and a 10 s connect_timeout unless pg_dsn says otherwise (psycopg's own
    default is 130 s, long enough to ignore SIGTERM).
    """
    conninfo = session_conninfo(cfg.pg_dsn)
    try:
        return psycopg.connect(
            conninfo, autocommit=True, application_name=f"{APPLICATION_NAME}-admin"
        )
    except psycopg.OperationalError as exc:
        raise connect_failure(redact(str(exc)).strip(), replication=False) from None
    except psycopg.ProgrammingError:
        # libpq's parse error may quote a fragment of the password: never echo it
        raise SetupError(
            "pg_dsn is not a valid connection string (check quoting and %-encoding)"
        ) from None


@contextlib.contextmanager
def sql_errors(cfg: Config, what: str) -> Iterator[None]:
    """Turn a psycopg error into a typed one (one line, no traceback, no secrets)."""
    try:
        yield
    except psycopg.Error as exc:
        diag = exc.diag
        text = redact(diag.message_primary or str(exc).strip().split("\n", 1)[0])
        state = exc.sqlstate or ""
        # no SQLSTATE: a client-side failure; only a broken connection is worth a retry
        if (
            is_transient_sqlstate(state) or state == _QUERY_CANCELED
            if state
            else isinstance(exc, psycopg.OperationalError)
        ):
            raise ConnectionLost(
                f"PostgreSQL connection failed while {what}: {text}", side=POSTGRES, slot=cfg.slot
            ) from None
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            raise SetupError(
                f"permission denied while {what}: {text}; the role in pg_dsn needs REPLICATION, "
                "CREATE on the database and ownership of the outbox table for `init` "
                "(see sql/relay_role.sql), or run `init` as a more privileged role",
                slot=cfg.slot,
                publication=cfg.publication,
            ) from None
        hint = f" ({redact(diag.message_hint)})" if diag.message_hint else ""
        raise SetupError(
            f"PostgreSQL refused {what}: {text}{hint} [SQLSTATE {state or 'none'}]",
            slot=cfg.slot,
            publication=cfg.publication,
        ) from None


def _one(conn: Conn, query: str, *params: object) -> tuple[object, ...] | None:
    return conn.execute(query, params).fetchone()


def _version_text(version: int) -> str:
    if version >= 100000:
        return str(version // 10000)
    return f"{version // 10000}.{version // 100 % 100}"


def check_server(conn: Conn) -> None:
    """PostgreSQL 14+ with ``wal_level = logical``."""
    version = conn.info.server_version
    if version < MIN_SERVER_VERSION:
        raise SetupError(
            f"PostgreSQL {_version_text(version)} is too old: cdc-relay needs PostgreSQL 14 or "
            "newer; upgrade the server (or point pg_dsn at one that is 14+)"
        )
    row = _one(conn, "SELECT current_setting('wal_level')")
    level = str(row[0]) if row else "unknown"
    if level != "logical":
        raise SetupError(
            f"wal_level is {level}, not logical, so there is no logical decoding: set "
            "wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) "
            "and restart PostgreSQL"
        )


def check_encoding(conn: Conn) -> None:
    """The session carries UTF-8 text: refuses SQL_ASCII databases (see ``encoding_problem``)."""
    problem = encoding_problem(
        conn.info.parameter_status("server_encoding"),
        conn.info.parameter_status("client_encoding"),
    )
    if problem is not None:
        raise SetupError(problem)


# -- the outbox table(s) ---------------------------------------------------------------------------
def _display(schema: str, name: str) -> str:
    return f"{schema}.{name}"


def _sql_table(schema: str, name: str) -> str:
    """The table as SQL text for hints (quoted, so it pastes correctly)."""
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def _relkind(conn: Conn, schema: str, name: str) -> str | None:
    row = _one(
        conn,
        "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        schema,
        name,
    )
    return None if row is None else str(row[0])


def table_columns(conn: Conn, schema: str, name: str) -> set[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped",
        (schema, name),
    ).fetchall()
    return {str(r[0]) for r in rows}


def check_outbox_table(conn: Conn, cfg: Config) -> None:
    """Every outbox table exists, is a table, and has every required column."""
    for schema, name in cfg.tables:
        table = _display(schema, name)
        kind = _relkind(conn, schema, name)
        if kind is None:
            wrong = partitions.missing_partition(conn, schema, name)
            if wrong is not None:
                raise SetupError(wrong)
            raise SetupError(
                f"outbox table {table} does not exist: run `cdc-relay init --create-outbox` or "
                "create it from sql/outbox.sql (or set outbox_table to the table you use; names "
                "are case-sensitive)"
            )
        if kind not in ("r", "p"):
            raise SetupError(
                f"outbox table {table} is a {_RELKINDS.get(kind, 'relation')}, not a table: "
                "only a table's INSERTs are replicated; set outbox_table to the table the "
                "application inserts into"
            )
        have = table_columns(conn, schema, name)
        missing = [key for key in REQUIRED_COLUMNS if not have.intersection(cfg.columns(key))]
        if missing:
            described = ", ".join(
                f"{' or '.join(repr(c) for c in cfg.columns(key))} (setting column_{key})"
                for key in missing
            )
            raise SetupError(
                f"outbox table {table} has no column {described}: add the column, or set the "
                "column_* setting to the name of the column that holds it"
            )
    partitions.check_members(conn, cfg.publication, cfg.tables)


def outbox_ddl(table: str = "public.outbox", columns: Mapping[str, str] | None = None) -> str:
    """The outbox table definition (Debezium-compatible column names) as SQL text.

    ``columns`` maps column keys (``"type"``, ``"aggregate_id"``, ...) to other names; those
    are quoted. With the defaults this is exactly the statement in sql/outbox.sql.
    """
    schema, _, name = table.rpartition(".")
    columns = columns or {}
    lines = []
    for key, default, spec in OUTBOX_COLUMNS:
        column = columns.get(key, default)
        shown = default if column == default else quote_ident(column)
        lines.append(f"    {shown:<13} {spec}")
    body = ",\n".join(lines)
    return f"CREATE TABLE IF NOT EXISTS {_sql_table(schema or 'public', name)} (\n{body}\n);\n"


def _outbox_ddl_sql(schema: str, name: str, columns: Mapping[str, str]) -> sql.Composed:
    """The same statement as ``outbox_ddl``, composed with ``sql.Identifier`` for execution."""
    lines = [
        sql.SQL("    {} ").format(sql.Identifier(columns.get(key, default))) + sql.SQL(spec)
        for key, default, spec in OUTBOX_COLUMNS
    ]
    return sql.SQL("CREATE TABLE IF NOT EXISTS {}.{} (\n{}\n)").format(
        sql.Identifier(schema), sql.Identifier(name), sql.SQL(",\n").join(lines)
    )


def partitioned_outbox_ddl(
    table: str = "public.outbox", columns: Mapping[str, str] | None = None, count: int = 4
) -> str:
    """``outbox_ddl`` partitioned by hash of the aggregate id into ``count`` partitions, as SQL
    text (sql/outbox_partitioned.sql holds the default); what ``init --partitions`` creates.

    A partitioned table's primary key must hold the partition key, so it is (id, aggregate id).
    """
    schema, _, name = table.rpartition(".")
    schema = schema or "public"
    columns = columns or {}

    def shown(key: str, default: str) -> str:
        column = columns.get(key, default)
        return default if column == default else quote_ident(column)

    lines = [
        f"    {shown(key, default):<13} {spec.replace('PRIMARY KEY', 'NOT NULL')}"
        for key, default, spec in OUTBOX_COLUMNS
    ]
    lines.append(f"    PRIMARY KEY ({shown('id', 'id')}, {shown('aggregate_id', 'aggregateid')})")
    body = ",\n".join(lines)
    root = _sql_table(schema, name)
    out = [
        f"CREATE TABLE IF NOT EXISTS {root} (\n{body}\n) "
        f"PARTITION BY HASH ({shown('aggregate_id', 'aggregateid')});"
    ]
    for k in range(count):
        child = _sql_table(schema, partitions.partition_name(name, k))
        out.append(
            f"CREATE TABLE IF NOT EXISTS {child} PARTITION OF {root}\n"
            f"    FOR VALUES WITH (MODULUS {count}, REMAINDER {k});"
        )
    return "\n".join(out) + "\n"


def _partitioned_ddl_sql(schema: str, name: str, columns: Mapping[str, str]) -> sql.Composed:
    """The root statement of ``partitioned_outbox_ddl``, composed for execution."""
    lines = [
        sql.SQL("    {} ").format(sql.Identifier(columns.get(key, default)))
        + sql.SQL(spec.replace("PRIMARY KEY", "NOT NULL"))
        for key, default, spec in OUTBOX_COLUMNS
    ]
    lines.append(
        sql.SQL("    PRIMARY KEY ({}, {})").format(
            sql.Identifier(columns.get("id", "id")),
            sql.Identifier(columns.get("aggregate_id", "aggregateid")),
        )
    )
    return sql.SQL("CREATE TABLE IF NOT EXISTS {}.{} (\n{}\n) PARTITION BY HASH ({})").format(
        sql.Identifier(schema),
        sql.Identifier(name),
        sql.SQL(",\n").join(lines),
        sql.Identifier(columns.get("aggregate_id", "aggregateid")),
    )


def _create_columns(cfg: Config) -> dict[str, str]:
    """Column names a new outbox table gets: the last (newest) name of each setting."""
    return {key: cfg.columns(key)[-1] for key, _, _ in OUTBOX_COLUMNS}


# -- the publication -------------------------------------------------------------------------------
def _publication_kind(conn: Conn, cfg: Config) -> tuple[bool, bool] | None:
    """(publishes inserts, publish_via_partition_root), or None if it does not exist.

    Raises for a publication that can never be right (FOR ALL TABLES).
    """
    pub = cfg.publication
    row = _one(
        conn,
        "SELECT puballtables, pubinsert, pubviaroot FROM pg_publication WHERE pubname = %s",
        pub,
    )
    if row is None:
        return None
    all_tables, pubinsert, viaroot = row
    if all_tables:
        raise SetupError(
            f"publication {pub} is FOR ALL TABLES: the relay would decode every table's "
            f"changes; DROP PUBLICATION {quote_ident(pub)}, then run `cdc-relay init` to create "
            "one for the outbox only (or set publication to another name)",
            publication=pub,
        )
    return bool(pubinsert), bool(viaroot)


def check_publication(conn: Conn, cfg: Config) -> None:
    """The publication exists, publishes inserts and covers every outbox table fully."""
    pub = cfg.publication
    kind = _publication_kind(conn, cfg)
    if kind is None:
        raise SetupError(
            f"publication {pub} does not exist: run `cdc-relay init` (or set publication to "
            "the one that covers the outbox table)",
            publication=pub,
        )
    pubinsert, viaroot = kind
    if not pubinsert:
        raise SetupError(
            f"publication {pub} does not publish inserts: "
            f"ALTER PUBLICATION {quote_ident(pub)} SET (publish = 'insert, truncate')",
            publication=pub,
        )
    partitions.check_publication(conn, pub, cfg.tables)
    for schema, name in cfg.tables:
        table, sql_table = _display(schema, name), _sql_table(schema, name)
        if _relkind(conn, schema, name) == "p" and not viaroot:
            raise SetupError(
                f"outbox table {table} is partitioned but publication {pub} publishes changes "
                "under each partition's name, which the relay would not recognise: "
                f"ALTER PUBLICATION {quote_ident(pub)} SET (publish_via_partition_root = true)",
                publication=pub,
            )
        if conn.info.server_version >= PUBLICATION_FILTERS_VERSION:
            row = _one(
                conn,
                "SELECT attnames::text[], rowfilter FROM pg_publication_tables "
                "WHERE pubname = %s AND schemaname = %s AND tablename = %s",
                pub,
                schema,
                name,
            )
        else:
            row = _one(
                conn,
                "SELECT NULL::text[], NULL::text FROM pg_publication_tables "
                "WHERE pubname = %s AND schemaname = %s AND tablename = %s",
                pub,
                schema,
                name,
            )
        if row is None:
            raise SetupError(
                f"publication {pub} does not include {table}: "
                f"ALTER PUBLICATION {quote_ident(pub)} ADD TABLE {sql_table}",
                publication=pub,
            )
        attnames, rowfilter = row
        if rowfilter is not None:
            raise SetupError(
                f"publication {pub} filters the rows of {table} (WHERE {rowfilter}): events it "
                "filters out would never be relayed; "
                f"ALTER PUBLICATION {quote_ident(pub)} SET TABLE {sql_table}",
                publication=pub,
            )
        if isinstance(attnames, list):
            published = {str(a) for a in attnames}
            wanted = {c for key, _, _ in OUTBOX_COLUMNS for c in cfg.columns(key)}
            left_out = sorted((wanted & table_columns(conn, schema, name)) - published)
            if left_out:
                raise SetupError(
                    f"publication {pub} has a column list for {table} that leaves out "
                    f"{', '.join(left_out)}: events would lose them; "
                    f"ALTER PUBLICATION {quote_ident(pub)} SET TABLE {sql_table}",
                    publication=pub,
                )


# -- the marker: which slots the relay created -----------------------------------------------------
_MARKER_RE = re.compile(
    r"^cdc-relay: slot (?P<slot>\S+) (?P<how>created|seen) at (?P<lsn>\S+) "
    r"on system (?P<system_id>\S+) timeline (?P<timeline>\d+) at (?P<at>\S+)$"
)


@dataclass(frozen=True, slots=True)
class SlotMarker:
    """One line of the publication's comment: a slot the relay created (or found in use).

    A publication is replicated, backed up and restored with the database, unlike a slot, so
    after a failover or a restore the marker says a slot existed that is now gone.
    """

    slot: str
    lsn: str
    system_id: str
    timeline: int
    at: str
    how: str = "created"

    def line(self) -> str:
        return (
            f"cdc-relay: slot {self.slot} {self.how} at {self.lsn} on system {self.system_id} "
            f"timeline {self.timeline} at {self.at}"
        )


_PROGRESS_RE = re.compile(
    r"^cdc-relay: slot (?P<slot>\S+) confirmed (?P<lsn>\S+) committed at (?P<at>\S+)$"
)


@dataclass(frozen=True, slots=True)
class Confirmed:
    """The newest transaction the relay recorded as confirmed: a lower bound for ``recover``.

    Written by the daemon now and then (``CONFIRMED_RECORD_INTERVAL``), so it may be a little
    behind the slot, never ahead of it.
    """

    slot: str
    lsn: str
    at: datetime

    def line(self) -> str:
        stamp = self.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return f"cdc-relay: slot {self.slot} confirmed {self.lsn} committed at {stamp}"


def parse_confirmed(comment: str | None) -> dict[str, Confirmed]:
    found: dict[str, Confirmed] = {}
    for raw in (comment or "").splitlines():
        m = _PROGRESS_RE.match(raw.strip())
        if m is not None:
            with contextlib.suppress(ValueError):
                at = datetime.fromisoformat(m["at"].replace("Z", "+00:00"))
                found[m["slot"]] = Confirmed(m["slot"], m["lsn"], at)
    return found


def with_confirmed(comment: str | None, confirmed: Confirmed) -> str:
    lines = [
        raw
        for raw in (comment or "").splitlines()
        if (m := _PROGRESS_RE.match(raw.strip())) is None or m["slot"] != confirmed.slot
    ]
    return "\n".join([*lines, confirmed.line()])


def suggested_since(comment: str | None, slot: str) -> tuple[datetime, str] | None:
    """A ``recover --since`` that is early enough, and why; None when nothing is recorded.

    The relay's last recorded confirmed commit, less ``SINCE_MARGIN`` for transactions that
    began before it (a row's created_at is its transaction's start) and committed after.
    """
    confirmed = parse_confirmed(comment).get(slot)
    if confirmed is not None:
        return (
            confirmed.at - SINCE_MARGIN,
            f"{int(SINCE_MARGIN.total_seconds() // 60)} minutes before the last commit the "
            f"relay recorded as confirmed ({confirmed.lsn} at {confirmed.at.isoformat()})",
        )
    marker = parse_markers(comment).get(slot)
    if marker is not None:
        with contextlib.suppress(ValueError):
            at = datetime.fromisoformat(marker.at.replace("Z", "+00:00"))
            return at, "when the slot was recorded; every later row is sent again"
    return None


def parse_markers(comment: str | None) -> dict[str, SlotMarker]:
    """Every slot marker in a publication comment, by slot name; other lines are ignored."""
    found: dict[str, SlotMarker] = {}
    for raw in (comment or "").splitlines():
        m = _MARKER_RE.match(raw.strip())
        if m is not None:
            found[m["slot"]] = SlotMarker(
                slot=m["slot"],
                lsn=m["lsn"],
                system_id=m["system_id"],
                timeline=int(m["timeline"]),
                at=m["at"],
                how=m["how"],
            )
    return found


def with_marker(comment: str | None, marker: SlotMarker) -> str:
    """The comment with ``marker`` replacing that slot's line; every other line is kept."""
    lines = [
        raw
        for raw in (comment or "").splitlines()
        if (m := _MARKER_RE.match(raw.strip())) is None or m["slot"] != marker.slot
    ]
    return "\n".join([*lines, marker.line()])


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _system(conn: Conn) -> tuple[str, int]:
    """(system identifier, current timeline) of the server, as IDENTIFY_SYSTEM would say.

    The insert timeline is read from the name of the current WAL segment: pg_control's
    checkpoint timeline lags behind a promotion until the next checkpoint.
    """
    row = _one(
        conn,
        "SELECT system_identifier::text, pg_is_in_recovery() FROM pg_control_system()",
    )
    assert row is not None
    system_id, in_recovery = str(row[0]), bool(row[1])
    if in_recovery:
        tli = _one(conn, "SELECT timeline_id FROM pg_control_checkpoint()")
        return system_id, int(str(tli[0])) if tli else 0
    wal = _one(conn, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    return system_id, int(str(wal[0])[:8], 16) if wal else 0


def _publication_comment(conn: Conn, publication: str) -> str | None:
    row = _one(
        conn,
        "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = %s",
        publication,
    )
    return None if row is None or row[0] is None else str(row[0])


def slot_marker(conn: Conn, cfg: Config, lsn: str, how: str) -> SlotMarker:
    """The marker line for ``cfg.slot`` at ``lsn`` on this server, stamped now."""
    system_id, timeline = _system(conn)
    return SlotMarker(cfg.slot, lsn, system_id, timeline, _utc_now(), how)


def publication_comment(conn: Conn, publication: str) -> str | None:
    return _publication_comment(conn, publication)


def update_comment(conn: Conn, cfg: Config, edit: Callable[[str | None], str]) -> str | None:
    """Rewrite the publication's comment as ``edit(old)``: None when done, else why not
    (the role does not own the publication, or the server is a read-only standby).

    The read and the write happen under one transaction-level advisory lock, so relays that
    share the publication (one slot each) never overwrite each other's lines.
    """
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('cdc-relay publication comment'))")
            comment = edit(_publication_comment(conn, cfg.publication))
            conn.execute(
                sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(
                    sql.Identifier(cfg.publication), sql.Literal(comment)
                )
            )
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ReadOnlySqlTransaction) as exc:
        return redact(exc.diag.message_primary or str(exc))
    return None


def _write_marker(conn: Conn, cfg: Config, lsn: str, how: str) -> str | None:
    """Record the slot in the publication's comment; what was done, or None if not allowed.

    Refused (not the publication's owner, a read-only standby): the relay still works, it just
    cannot tell a lost slot from a new one later, so this is a warning, not a failure.
    """
    marker = slot_marker(conn, cfg, lsn, how)
    refused = update_comment(conn, cfg, lambda comment: with_marker(comment, marker))
    if refused is not None:
        log.warning(
            "cannot record the slot in the publication's comment, so a later loss of the slot "
            "cannot be told from a first start: give the relay's role ownership of the "
            "publication, and keep create_slot off",
            extra={"slot": cfg.slot, "publication": cfg.publication, "error": refused},
        )
        return None
    return f"recorded slot {cfg.slot} in the comment of publication {cfg.publication}"


def vanished_slot_error(
    cfg: Config, marker: SlotMarker, system: tuple[str, int], suggestion: str = ""
) -> SetupError:
    """The refusal for a missing slot that the marker says existed: recreating it loses events."""
    system_id, timeline = system
    moved = (
        f"; this server is system {system_id} timeline {timeline}, so it changed since"
        if (system_id, timeline) != (marker.system_id, marker.timeline)
        else ""
    )
    recorded = "created" if marker.how == "created" else "in use"
    return SetupError(
        f"replication slot {cfg.slot} existed and is gone: publication {cfg.publication} "
        f"records it {recorded} at {marker.lsn} on system {marker.system_id} timeline "
        f"{marker.timeline} ({marker.at}){moved}. A failover to a replica, a dropped slot or a "
        "restore from a base backup loses a slot; a new one would start at the current WAL "
        "position and skip every outbox event committed in between, so the relay will not "
        "create it on its own, whatever create_slot says. Recover with `cdc-relay recover "
        f"--since TIMESTAMP`: it creates the slot and first re-sends every retained outbox row "
        f"of TIMESTAMP or later (same message ids). {_SINCE_HINT}"
        + (suggestion or f" {marker.at} (when the slot was recorded) is always early enough."),
        slot=cfg.slot,
        publication=cfg.publication,
    )


_SINCE_HINT = (
    "Use the committed_at of the last event your consumers are known to have, or earlier: "
    "rows before TIMESTAMP are not re-sent, rows after it that were delivered come again with "
    "the same id."
)


def _suggestion(conn: Conn, cfg: Config) -> str:
    found = suggested_since(_publication_comment(conn, cfg.publication), cfg.slot)
    if found is None:
        return ""
    at, why = found
    stamp = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f" Suggested: --since {stamp} ({why})."


def lost_slot_error(conn: Conn, cfg: Config, confirmed: object) -> SetupError:
    """The refusal for an invalidated slot, with what it knows to choose ``recover --since``."""
    since = _suggestion(conn, cfg)
    return SetupError(
        f"slot {cfg.slot} is invalidated (wal_status = lost): the WAL it needed was removed "
        "(max_slot_wal_keep_size), so events committed after its confirmed position "
        f"{confirmed} cannot be streamed from it. Recover with `cdc-relay recover --since "
        "TIMESTAMP`: it replaces the slot and first re-sends every retained outbox row of "
        f"TIMESTAMP or later (same message ids). {_SINCE_HINT}{since} The relay never "
        "recreates the slot on its own",
        slot=cfg.slot,
        confirmed_flush_lsn=confirmed,
    )


def _check_not_vanished(conn: Conn, cfg: Config) -> None:
    """Raise ``vanished_slot_error`` if the (missing) slot is named by the marker."""
    marker = parse_markers(_publication_comment(conn, cfg.publication)).get(cfg.slot)
    if marker is not None:
        raise vanished_slot_error(cfg, marker, _system(conn), _suggestion(conn, cfg))


# -- the slot --------------------------------------------------------------------------------------
def check_slot(conn: Conn, cfg: Config, own_pids: Collection[int] = ()) -> Lsn:
    """Verify the slot is ours to stream from; return its confirmed_flush_lsn.

    Raises ``SetupError`` for a slot that is missing, of another kind, plugin or database,
    invalidated or two-phase, and ``SlotBusy`` (retryable) while another connection streams
    from it. ``own_pids`` are walsender pids of this relay's earlier sessions: one of them still
    holding the slot is the relay's own connection closing, not a rival.
    """
    slot = cfg.slot
    row = _one(
        conn,
        "SELECT s.plugin, s.slot_type, d.datname, s.active, s.active_pid, "
        "s.confirmed_flush_lsn::text, s.wal_status, current_database(), s.two_phase "
        "FROM pg_replication_slots s LEFT JOIN pg_database d ON d.oid = s.datoid "
        "WHERE s.slot_name = %s",
        slot,
    )
    if row is None:
        _check_not_vanished(conn, cfg)
        raise SetupError(
            f"replication slot {slot} does not exist: run `cdc-relay init` "
            "(or set create_slot = true for the first start)",
            slot=slot,
        )
    (
        plugin,
        slot_type,
        datname,
        active,
        active_pid,
        confirmed,
        wal_status,
        current_db,
        two_phase,
    ) = row
    drop_it = f"SELECT pg_drop_replication_slot({quote_literal(slot)})"
    if slot_type != "logical":
        raise SetupError(
            f"slot {slot} is a {slot_type} replication slot, not a logical pgoutput slot: it "
            f"belongs to something else; set slot to another name (or, if nothing uses it, "
            f"{drop_it} and run `cdc-relay init`)",
            slot=slot,
        )
    if plugin != "pgoutput":
        raise SetupError(
            f"slot {slot} uses plugin {plugin}, not pgoutput: it belongs to something else; "
            f"set slot to another name (or, if nothing uses it, {drop_it} and run "
            "`cdc-relay init`)",
            slot=slot,
        )
    if datname != current_db:
        raise SetupError(
            f"slot {slot} belongs to database {datname}, but pg_dsn connects to database "
            f"{current_db}: a slot decodes one database only; point pg_dsn at {datname}, or "
            "set slot to another name",
            slot=slot,
        )
    if wal_status == "lost":
        raise lost_slot_error(conn, cfg, confirmed)
    if two_phase:
        raise SetupError(
            f"slot {slot} was created with two_phase = true: PostgreSQL would send prepared "
            "transactions as PREPARE / COMMIT PREPARED messages, which the relay does not "
            "handle, so it would halt at the first PREPARE TRANSACTION. Re-create the slot "
            f"without two-phase: {drop_it} (reconcile from the outbox table anything it had "
            "not relayed), then run `cdc-relay init`",
            slot=slot,
        )
    if active:
        raise _busy(slot, active_pid, own_pids)
    if confirmed is None:
        raise SetupError(
            f"slot {slot} has no confirmed_flush_lsn (it was never fully created): "
            f"{drop_it}, then run `cdc-relay init`",
            slot=slot,
        )
    return Lsn.parse(str(confirmed))


def _busy(slot: str, active_pid: object, own_pids: Collection[int]) -> SlotBusy:
    """The retryable refusal for an active slot: a rival relay, or our own last connection."""
    pid = int(str(active_pid)) if active_pid is not None else None
    if pid is not None and pid in own_pids:
        return SlotBusy(
            f"slot {slot} is still held by this relay's own previous connection (pid {pid}), "
            "which PostgreSQL has not finished closing; retrying shortly",
            holder_pid=pid,
            slot=slot,
        )
    return SlotBusy(
        f"slot {slot} is active in another connection (pid {pid}): another relay "
        "is streaming from it; waiting as a standby until it is released (if that process "
        f"is stale, stop it or SELECT pg_terminate_backend({pid}))",
        holder_pid=pid,
        slot=slot,
    )


def slot_exists(conn: Conn, slot: str) -> bool:
    return _slot_exists(conn, slot)


def check_slot_publication(conn: Conn, cfg: Config) -> None:
    """The slot is not another publication's: relays side by side need one slot each.

    A slot streams through whichever publication its relay names. Two relays sharing a slot
    with different publications (a copied config) would look like a relay and its standby,
    and the one that takes over would move the slot past every event of the other's
    publication. The slot markers say which publication a slot was created with.
    """
    rows = conn.execute(
        "SELECT pubname::text, obj_description(oid, 'pg_publication') FROM pg_publication "
        "WHERE obj_description(oid, 'pg_publication') ~ '(^|\\n)cdc-relay: slot '"
    ).fetchall()
    owners = sorted(str(pub) for pub, comment in rows if cfg.slot in parse_markers(str(comment)))
    if owners and cfg.publication not in owners:
        raise SetupError(
            f"slot {cfg.slot} belongs to publication {', '.join(owners)} (its comment records "
            f"the slot), not to {cfg.publication}: another relay streams that slot through its "
            "own publication, and whichever of the two held the slot would skip the other's "
            "events. Give this relay its own slot (relays side by side need one each; a "
            "standby shares slot and publication), or DROP PUBLICATION the other if nothing "
            "uses it",
            slot=cfg.slot,
            publication=cfg.publication,
        )


def check_not_vanished(conn: Conn, cfg: Config) -> None:
    _check_not_vanished(conn, cfg)


def _slot_exists(conn: Conn, slot: str) -> bool:
    return _one(conn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", slot) is not None


def create_slot_query(server_version: int) -> str:
    """The slot-creating statement; ``%s`` is the slot name, the result is its start LSN.

    On PostgreSQL 17+ the slot is a failover slot, so a standby with
    ``sync_replication_slots = on`` keeps a copy and a promotion does not lose it.
    """
    args = "%s, 'pgoutput'"
    if server_version >= FAILOVER_SLOTS_VERSION:
        args += ", failover => true"
    return f"SELECT lsn::text FROM pg_create_logical_replication_slot({args})"


def _create_slot(conn: Conn, cfg: Config) -> list[str]:
    """Create the slot and record it in the marker; what was done (nothing if it raced)."""
    previous = parse_markers(_publication_comment(conn, cfg.publication)).get(cfg.slot)
    try:
        row = _one(conn, create_slot_query(conn.info.server_version), cfg.slot)
    except psycopg.errors.DuplicateObject:  # a concurrent init; checked by the caller
        return []
    lsn = str(row[0]) if row else "?"
    done = [f"created slot {cfg.slot} at {lsn}"]
    if previous is not None:
        done[0] += (
            f" (replacing the one recorded at {previous.lsn} on {previous.at}: events between "
            "that slot's last position and this one were not relayed by it)"
        )
    marked = _write_marker(conn, cfg, lsn, "created")
    return done if marked is None else [*done, marked]


# -- commands --------------------------------------------------------------------------------------
def init(
    cfg: Config, create_outbox: bool, *, deliberate: bool = True, slot: bool = True
) -> list[str]:
    """Create what is missing (outbox, publication, slot); idempotent. Returns what was done.

    An existing slot or publication that is wrong (other plugin or database, invalidated,
    two-phase, FOR ALL TABLES, ...) is refused before anything is created; it is never silently
    reused. ``deliberate`` is an operator's ``cdc-relay init``: it creates the slot even when
    the marker says one existed before. ``run`` with ``create_slot`` passes False and is
    refused then (``vanished_slot_error``). ``slot=False`` leaves the slot to the caller (a
    backfill creates it with an exported snapshot).
    """
    done: list[str] = []
    with connect(cfg) as conn, sql_errors(cfg, "running init"):
        check_server(conn)
        check_encoding(conn)
        slot_exists = _slot_exists(conn, cfg.slot)
        if slot_exists:
            with contextlib.suppress(SlotBusy):  # a running relay is fine for init
                check_slot(conn, cfg)
            check_slot_publication(conn, cfg)
        elif not deliberate:
            _check_not_vanished(conn, cfg)
        pub_exists = _publication_kind(conn, cfg) is not None
        if create_outbox:
            for schema, name in cfg.tables:
                if _relkind(conn, schema, name) is None:
                    wrong = partitions.missing_partition(conn, schema, name)
                    if wrong is not None:
                        raise SetupError(wrong)
                    conn.execute(_outbox_ddl_sql(schema, name, _create_columns(cfg)))
                    done.append(f"created table {_display(schema, name)}")
        check_outbox_table(conn, cfg)
        if not pub_exists:
            partitioned = any(_relkind(conn, s, n) == "p" for s, n in cfg.tables)
            options = "publish = 'insert, truncate'"
            if partitioned:
                options += ", publish_via_partition_root = true"
            with contextlib.suppress(psycopg.errors.DuplicateObject):  # a concurrent init
                conn.execute(
                    sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH ({})").format(
                        sql.Identifier(cfg.publication),
                        sql.SQL(", ").join(
                            sql.Identifier(schema, name) for schema, name in cfg.tables
                        ),
                        sql.SQL(options),
                    )
                )
                done.append(f"created publication {cfg.publication}")
        check_publication(conn, cfg)
        if not slot_exists and slot:
            done += _create_slot(conn, cfg)
        if slot or slot_exists:
            with contextlib.suppress(SlotBusy):
                check_slot(conn, cfg)
        waiting = partitions.uncovered(conn, cfg.tables)
        if waiting:
            done.append(
                f"partitions no publication covers yet, so no relay streams them: "
                f"{', '.join(waiting)} (run `cdc-relay init` with the configs of the relays "
                "that list them before writers insert: rows committed before a relay's slot "
                "exists reach it only through `init --backfill`)"
            )
    return done


def create_partitioned(cfg: Config, count: int) -> list[str]:
    """``init --partitions``: the outbox partitioned by hash of the aggregate id (idempotent)."""
    names = _create_columns(cfg)
    with connect(cfg) as conn, sql_errors(cfg, "creating the partitioned outbox"):
        check_server(conn)
        check_encoding(conn)
        return partitions.create(
            conn,
            cfg.tables,
            count,
            names["aggregate_id"],
            lambda schema, name: _partitioned_ddl_sql(schema, name, names),
        )


def _warn_about_partitions(conn: Conn, cfg: Config) -> None:
    """What a relay side by side with others should hear at every start."""
    if not any(m.ancestors for m in partitions.members(conn, cfg.tables)):
        return
    waiting = partitions.uncovered(conn, cfg.tables)
    if waiting:
        log.warning(
            "partitions of the outbox that no publication covers: no relay streams them",
            extra={"slot": cfg.slot, "partitions": ", ".join(waiting)},
        )
    if cfg.logical_messages:
        log.warning(
            "logical_messages is on in a relay that streams some partitions: every slot of "
            "the database decodes every pg_logical_emit_message, so each relay side by side "
            "publishes it; set logical_messages = false on all of them but one (or all)",
            extra={"slot": cfg.slot},
        )


def prepare(cfg: Config, allow_create: bool = True, own_pids: Collection[int] = ()) -> Lsn:
    """Every start-up check; with ``create_slot``, create what is missing first. → start LSN.

    ``allow_create``: the daemon passes False once a session has seen the slot, so a slot that
    disappears while the process runs is never replaced (the marker covers restarts).
    ``own_pids``: walsender pids of this process's earlier sessions (see ``check_slot``).
    What it creates or records is logged.
    """
    if cfg.create_slot and allow_create:
        for action in init(cfg, create_outbox=False, deliberate=False):
            log.info(action, extra={"slot": cfg.slot, "publication": cfg.publication})
    with connect(cfg) as conn, sql_errors(cfg, "checking the slot and publication"):
        check_server(conn)
        check_encoding(conn)
        check_outbox_table(conn, cfg)
        check_publication(conn, cfg)
        start = check_slot(conn, cfg, own_pids)
        check_slot_publication(conn, cfg)
        _warn_if_superuser(conn, cfg)
        _warn_about_partitions(conn, cfg)
        if cfg.create_slot and cfg.slot not in parse_markers(
            _publication_comment(conn, cfg.publication)
        ):
            # a slot from before markers existed: record it, or create_slot could replace it
            marked = _write_marker(conn, cfg, str(start), "seen")
            if marked is not None:
                log.info(marked, extra={"slot": cfg.slot, "publication": cfg.publication})
        return start


def _warn_if_superuser(conn: Conn, cfg: Config) -> None:
    row = _one(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    if row is not None and row[0]:
        log.warning(
            "the relay runs as a superuser: it needs only LOGIN REPLICATION and SELECT on the "
            "outbox (sql/relay_role.sql); a superuser's password in its config is a key to the "
            "whole database",
            extra={"slot": cfg.slot},
        )


def current_wal_lsn(conn: Conn) -> Lsn:
    row = _one(conn, "SELECT pg_current_wal_lsn()::text")
    assert row is not None
    return Lsn.parse(str(row[0]))


def publication_watermark(cfg: Config) -> Lsn:
    """One re-check of the publication on a connection of its own (see ``PublicationCheck``)."""
    check = PublicationCheck(cfg)
    try:
        return check.watermark()
    finally:
        check.close()


class PublicationCheck:
    """Re-checks the publication while streaming, on one kept connection.

    ``watermark`` reads ``pg_current_wal_lsn()`` first, then runs ``check_publication``: WAL up
    to the returned LSN was written before a check that found the publication intact, so the
    relay may move the slot through idle WAL up to there, and no further. Drift (the outbox
    left out, inserts unpublished, a row filter or a column list) raises ``SetupError``; an
    unreachable server raises ``ConnectionLost`` (the next call reconnects). The connection is
    kept because the check runs every few seconds: a backend fork each time would cost the
    server more than the check. It touches no shared state, so a worker thread may own it.
    """

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._conn: Conn | None = None
        self._vouched: Lsn | None = None  # the newest watermark a passing check returned
        self._may_not_record = False

    def watermark(self) -> Lsn:
        cfg = self._cfg
        try:
            conn = self._conn
            if conn is None or conn.closed:
                conn = self._conn = connect(cfg)
                with sql_errors(cfg, "re-checking the publication"):
                    conn.execute(f"SET statement_timeout = '{WATERMARK_STATEMENT_TIMEOUT}'")
            with sql_errors(cfg, "re-checking the publication"):
                watermark = current_wal_lsn(conn)
                try:
                    check_publication(conn, cfg)
                except SetupError as err:
                    since = f"after {self._vouched}" if self._vouched else "since the last start"
                    raise SetupError(
                        f"the publication changed while streaming: {err.message}. Outbox rows "
                        f"committed {since} while the publication did not cover them are not "
                        "in the replication stream, even once it is restored (PostgreSQL "
                        "decodes them with the publication as it was): re-publish them from "
                        "the outbox table; the slot has not moved past them",
                        **err.context,
                    ) from None
        except ConnectionLost:
            self.close()
            raise
        self._vouched = watermark
        return watermark

    def slot_wal(self) -> tuple[int, int] | None:
        """(WAL bytes the slot retains, bytes it may still retain or -1 when unlimited)."""
        conn = self._conn
        if conn is None or conn.closed:
            return None
        with sql_errors(self._cfg, "reading the slot's WAL"):
            row = _one(
                conn,
                "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint, "
                "coalesce(safe_wal_size, -1)::bigint FROM pg_replication_slots "
                "WHERE slot_name = %s",
                self._cfg.slot,
            )
        if row is None or row[0] is None:
            return None
        return int(str(row[0])), int(str(row[1]))

    def record_confirmed(self, lsn: Lsn, committed: float) -> None:
        """Write the ``Confirmed`` line; a role that may not is told once, then left alone."""
        conn = self._conn
        if conn is None or conn.closed or self._may_not_record:
            return
        confirmed = Confirmed(self._cfg.slot, str(lsn), datetime.fromtimestamp(committed, UTC))
        with sql_errors(self._cfg, "recording the confirmed position"):
            refused = update_comment(conn, self._cfg, lambda c: with_confirmed(c, confirmed))
        if refused is not None:
            self._may_not_record = True
            log.info(
                "not recording the confirmed position in the publication's comment (not its "
                "owner): `recover` will not be able to suggest a --since time",
                extra={"slot": self._cfg.slot, "error": refused},
            )

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()


def status(cfg: Config) -> SlotStatus:
    with connect(cfg) as conn, sql_errors(cfg, "reading the slot status"):
        current_lsn = current_wal_lsn(conn)
        row = _one(
            conn,
            "SELECT s.active, s.active_pid, s.confirmed_flush_lsn::text, s.wal_status, "
            "s.plugin, d.datname FROM pg_replication_slots s "
            "LEFT JOIN pg_database d ON d.oid = s.datoid WHERE s.slot_name = %s",
            cfg.slot,
        )
        pub = _one(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", cfg.publication)
        tables = conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables "
            "WHERE pubname = %s ORDER BY 1",
            (cfg.publication,),
        ).fetchall()
    confirmed = Lsn.parse(str(row[2])) if row and row[2] else None
    return SlotStatus(
        slot=cfg.slot,
        exists=row is not None,
        active=bool(row and row[0]),
        active_pid=int(str(row[1])) if row and row[1] is not None else None,
        confirmed_flush_lsn=confirmed,
        current_wal_lsn=current_lsn,
        lag_bytes=None if confirmed is None else max(0, current_lsn - confirmed),
        wal_status=str(row[3]) if row and row[3] is not None else None,
        plugin=str(row[4]) if row and row[4] is not None else None,
        database=str(row[5]) if row and row[5] is not None else None,
        publication_exists=pub is not None,
        publication_tables=tuple(str(t[0]) for t in tables),
    )


def drop(cfg: Config) -> list[str]:
    """Drop the relay's slot and publication; a slot that is not the relay's is left alone."""
    done: list[str] = []
    with connect(cfg) as conn, sql_errors(cfg, "dropping the slot and publication"):
        row = _one(
            conn,
            "SELECT s.active, s.active_pid, s.slot_type, s.plugin, d.datname, current_database() "
            "FROM pg_replication_slots s LEFT JOIN pg_database d ON d.oid = s.datoid "
            "WHERE s.slot_name = %s",
            cfg.slot,
        )
        if row is not None:
            active, pid, slot_type, plugin, datname, current_db = row
            if active:
                raise SetupError(
                    f"slot {cfg.slot} is in use by pid {pid}: stop the relay first",
                    slot=cfg.slot,
                )
            if slot_type != "logical" or plugin != "pgoutput" or datname != current_db:
                raise SetupError(
                    f"slot {cfg.slot} is not this relay's ({slot_type} slot, plugin {plugin}, "
                    f"database {datname}; pg_dsn connects to {current_db}): not dropping it; "
                    "check what uses it, and drop it with "
                    f"SELECT pg_drop_replication_slot({quote_literal(cfg.slot)}) if nothing does",
                    slot=cfg.slot,
                )
            conn.execute("SELECT pg_drop_replication_slot(%s)", (cfg.slot,))
            done.append(f"dropped slot {cfg.slot}")
        if _one(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", cfg.publication):
            conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(cfg.publication)))
            done.append(f"dropped publication {cfg.publication}")
    return done
