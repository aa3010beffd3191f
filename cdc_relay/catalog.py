"""Slot, publication and outbox-table management over an ordinary SQL connection.

Start-up checks fail closed: a relay streaming from the wrong slot, an invalidated slot or a
publication that misses the outbox would silently lose events, so every mismatch becomes a
``SetupError`` that tells the operator what to run. A lost slot is never recreated by the relay:
doing so would skip every event in the lost WAL without anyone noticing.

Names only ever reach SQL as bound parameters or as ``psycopg.sql.Identifier``; the SQL printed
in error hints is quoted the same way, so it can be pasted as-is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeAlias

import psycopg
from psycopg import sql

from cdc_relay.config import Config, redact
from cdc_relay.errors import AuthenticationFailed, ConnectionLost, SetupError, SlotBusy
from cdc_relay.lsn import Lsn
from cdc_relay.postgres import APPLICATION_NAME, quote_ident, quote_literal

Conn: TypeAlias = "psycopg.Connection[tuple[object, ...]]"

MIN_SERVER_VERSION = 140000
# column lists and row filters on publications exist from PostgreSQL 15 on
PUBLICATION_FILTERS_VERSION = 150000

# (column key as in Config.columns(), default name, type and constraints): sql/outbox.sql
OUTBOX_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("id", "id", "uuid        PRIMARY KEY"),
    ("aggregate_type", "aggregatetype", "text        NOT NULL"),
    ("aggregate_id", "aggregateid", "text        NOT NULL"),
    ("type", "type", "text        NOT NULL"),
    ("payload", "payload", "jsonb"),
    ("headers", "headers", "jsonb"),
    ("traceparent", "traceparent", "text"),
    ("created_at", "created_at", "timestamptz NOT NULL DEFAULT now()"),
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
# SQLSTATEs a retry can fix: connection exceptions, shutdowns, serialization, too many clients
_TRANSIENT_SQLSTATES = ("08", "57P", "40", "53300")


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
    """An autocommit SQL connection with the relay's application_name."""
    try:
        return psycopg.connect(
            cfg.pg_dsn, autocommit=True, application_name=f"{APPLICATION_NAME}-admin"
        )
    except psycopg.OperationalError as exc:
        text = redact(str(exc)).strip()
        if "password authentication failed" in text or "no pg_hba.conf entry" in text:
            raise AuthenticationFailed(f"PostgreSQL refused the credentials: {text}") from None
        raise ConnectionLost(f"cannot connect to PostgreSQL: {text}") from None
    except psycopg.ProgrammingError:
        # libpq's parse error may quote a fragment of the password: never echo it
        raise SetupError(
            "pg_dsn is not a valid connection string (check quoting and %-encoding)"
        ) from None


@contextlib.contextmanager
def _sql_errors(cfg: Config, what: str) -> Iterator[None]:
    """Turn a psycopg error into a typed one (one line, no traceback, no secrets)."""
    try:
        yield
    except psycopg.Error as exc:
        diag = exc.diag
        text = redact(diag.message_primary or str(exc).strip().split("\n", 1)[0])
        state = exc.sqlstate or ""
        # no SQLSTATE: a client-side failure; only a broken connection is worth a retry
        if (
            state.startswith(_TRANSIENT_SQLSTATES)
            if state
            else isinstance(exc, psycopg.OperationalError)
        ):
            raise ConnectionLost(
                f"PostgreSQL connection failed while {what}: {text}", slot=cfg.slot
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


def _table_columns(conn: Conn, schema: str, name: str) -> set[str]:
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
        have = _table_columns(conn, schema, name)
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
            left_out = sorted((wanted & _table_columns(conn, schema, name)) - published)
            if left_out:
                raise SetupError(
                    f"publication {pub} has a column list for {table} that leaves out "
                    f"{', '.join(left_out)}: events would lose them; "
                    f"ALTER PUBLICATION {quote_ident(pub)} SET TABLE {sql_table}",
                    publication=pub,
                )


# -- the slot --------------------------------------------------------------------------------------
def check_slot(conn: Conn, cfg: Config) -> Lsn:
    """Verify the slot is ours to stream from; return its confirmed_flush_lsn.

    Raises ``SetupError`` for a slot that is missing, of another kind, plugin or database, or
    invalidated, and ``SlotBusy`` (retryable) while another connection streams from it.
    """
    slot = cfg.slot
    row = _one(
        conn,
        "SELECT s.plugin, s.slot_type, d.datname, s.active, s.active_pid, "
        "s.confirmed_flush_lsn::text, s.wal_status, current_database() "
        "FROM pg_replication_slots s LEFT JOIN pg_database d ON d.oid = s.datoid "
        "WHERE s.slot_name = %s",
        slot,
    )
    if row is None:
        raise SetupError(
            f"replication slot {slot} does not exist: run `cdc-relay init` "
            "(or set create_slot = true)",
            slot=slot,
        )
    plugin, slot_type, datname, active, active_pid, confirmed, wal_status, current_db = row
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
        raise SetupError(
            f"slot {slot} is invalidated (wal_status = lost): the WAL it needed was removed "
            "(max_slot_wal_keep_size) and events in it cannot be recovered from the slot. "
            "Reconcile from the outbox table, then `cdc-relay drop --yes` and `cdc-relay init`; "
            "the relay never recreates it on its own",
            slot=slot,
        )
    if active:
        raise SlotBusy(
            f"slot {slot} is active in another connection (pid {active_pid}): another relay "
            "is streaming from it; waiting as a standby until it is released (if that process "
            f"is stale, stop it or SELECT pg_terminate_backend({active_pid}))",
            slot=slot,
            pid=active_pid,
        )
    if confirmed is None:
        raise SetupError(
            f"slot {slot} has no confirmed_flush_lsn (it was never fully created): "
            f"{drop_it}, then run `cdc-relay init`",
            slot=slot,
        )
    return Lsn.parse(str(confirmed))


def _slot_exists(conn: Conn, slot: str) -> bool:
    return _one(conn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", slot) is not None


# -- commands --------------------------------------------------------------------------------------
def init(cfg: Config, create_outbox: bool) -> list[str]:
    """Create what is missing (outbox, publication, slot); idempotent. Returns what was done.

    An existing slot or publication that is wrong (other plugin or database, invalidated,
    FOR ALL TABLES, ...) is refused before anything is created; it is never silently reused.
    """
    done: list[str] = []
    with connect(cfg) as conn, _sql_errors(cfg, "running init"):
        check_server(conn)
        slot_exists = _slot_exists(conn, cfg.slot)
        if slot_exists:
            with contextlib.suppress(SlotBusy):  # a running relay is fine for init
                check_slot(conn, cfg)
        pub_exists = _publication_kind(conn, cfg) is not None
        if create_outbox:
            for schema, name in cfg.tables:
                if _relkind(conn, schema, name) is None:
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
        if not slot_exists:
            with contextlib.suppress(psycopg.errors.DuplicateObject):  # checked just below
                conn.execute(
                    "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (cfg.slot,)
                )
                done.append(f"created slot {cfg.slot}")
        with contextlib.suppress(SlotBusy):
            check_slot(conn, cfg)
    return done


def prepare(cfg: Config) -> Lsn:
    """Every start-up check; create slot and publication first if configured. → start LSN."""
    if cfg.create_slot:
        init(cfg, create_outbox=False)
    with connect(cfg) as conn, _sql_errors(cfg, "checking the slot and publication"):
        check_server(conn)
        check_outbox_table(conn, cfg)
        check_publication(conn, cfg)
        return check_slot(conn, cfg)


def status(cfg: Config) -> SlotStatus:
    with connect(cfg) as conn, _sql_errors(cfg, "reading the slot status"):
        current = _one(conn, "SELECT pg_current_wal_lsn()::text")
        assert current is not None
        current_lsn = Lsn.parse(str(current[0]))
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
    with connect(cfg) as conn, _sql_errors(cfg, "dropping the slot and publication"):
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
