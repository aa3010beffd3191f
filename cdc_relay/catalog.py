"""Slot, publication and outbox-table management over an ordinary SQL connection.

Start-up checks fail closed: a relay streaming from the wrong slot, an invalidated slot or a
publication that misses the outbox would silently lose events, so every mismatch becomes a
``SetupError`` that tells the operator what to run. A lost slot is never recreated by the relay:
doing so would skip every event in the lost WAL without anyone noticing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import psycopg
from psycopg import sql

from cdc_relay.config import Config, redact
from cdc_relay.errors import AuthenticationFailed, ConnectionLost, SetupError
from cdc_relay.lsn import Lsn
from cdc_relay.postgres import APPLICATION_NAME

MIN_SERVER_VERSION = 140000


class SlotBusy(ConnectionLost):
    """The slot is streaming to another connection (another relay instance). Retry later."""


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


def connect(cfg: Config) -> psycopg.Connection[tuple[object, ...]]:
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


def _one(
    conn: psycopg.Connection[tuple[object, ...]], query: str, *params: object
) -> tuple[object, ...] | None:
    return conn.execute(query, params).fetchone()


def check_server(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    version = conn.info.server_version
    if version < MIN_SERVER_VERSION:
        raise SetupError(f"PostgreSQL {version // 10000} is too old: cdc-relay needs 14 or newer")
    row = _one(conn, "SELECT current_setting('wal_level')")
    if row is None or row[0] != "logical":
        raise SetupError(
            f"wal_level is {row[0] if row else 'unknown'!s}, not logical: set wal_level = logical "
            "in postgresql.conf and restart PostgreSQL"
        )


def check_outbox_table(conn: psycopg.Connection[tuple[object, ...]], cfg: Config) -> None:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
        "AND attnum > 0 AND NOT attisdropped",
        (_qualified(cfg),),
    ).fetchall()
    if not rows:
        raise SetupError(
            f"outbox table {cfg.outbox_table} does not exist: run `cdc-relay init --create-outbox` "
            "or create it from sql/outbox.sql"
        )
    have = {str(r[0]) for r in rows}
    for key in (
        "column_id",
        "column_aggregate_type",
        "column_aggregate_id",
        "column_type",
        "column_payload",
    ):
        column = getattr(cfg, key)
        if column not in have:
            raise SetupError(
                f"outbox table {cfg.outbox_table} has no column {column!r}: add it, or set "
                f"{key} to the column that holds it"
            )


def _qualified(cfg: Config) -> str:
    return f'"{cfg.outbox_schema}"."{cfg.outbox_name}"'


def check_publication(conn: psycopg.Connection[tuple[object, ...]], cfg: Config) -> None:
    row = _one(
        conn,
        "SELECT puballtables, pubinsert FROM pg_publication WHERE pubname = %s",
        cfg.publication,
    )
    if row is None:
        raise SetupError(
            f"publication {cfg.publication} does not exist: run `cdc-relay init`",
            publication=cfg.publication,
        )
    all_tables, pubinsert = row
    if all_tables:
        raise SetupError(
            f"publication {cfg.publication} is FOR ALL TABLES: the relay would decode every "
            "table's changes; drop it and run `cdc-relay init` to create one for the outbox only",
            publication=cfg.publication,
        )
    if not pubinsert:
        raise SetupError(
            f"publication {cfg.publication} does not publish inserts: "
            f"ALTER PUBLICATION {cfg.publication} SET (publish = 'insert, truncate')",
        )
    covered = _one(
        conn,
        "SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s "
        "AND tablename = %s",
        cfg.publication,
        cfg.outbox_schema,
        cfg.outbox_name,
    )
    if covered is None:
        raise SetupError(
            f"publication {cfg.publication} does not include {cfg.outbox_table}: "
            f"ALTER PUBLICATION {cfg.publication} ADD TABLE {cfg.outbox_table}",
        )


def check_slot(conn: psycopg.Connection[tuple[object, ...]], cfg: Config) -> Lsn:
    """Verify the slot is ours to stream from; return its confirmed_flush_lsn."""
    row = _one(
        conn,
        "SELECT s.plugin, s.slot_type, d.datname, s.active, s.active_pid, "
        "s.confirmed_flush_lsn::text, s.wal_status, current_database() "
        "FROM pg_replication_slots s LEFT JOIN pg_database d ON d.oid = s.datoid "
        "WHERE s.slot_name = %s",
        cfg.slot,
    )
    if row is None:
        raise SetupError(
            f"replication slot {cfg.slot} does not exist: run `cdc-relay init` "
            "(or set create_slot = true)",
            slot=cfg.slot,
        )
    plugin, slot_type, datname, active, active_pid, confirmed, wal_status, current_db = row
    if slot_type != "logical" or plugin != "pgoutput":
        raise SetupError(
            f"slot {cfg.slot} uses {slot_type} plugin {plugin!s}, not pgoutput: choose another "
            "slot name, or drop this slot if nothing else uses it",
            slot=cfg.slot,
        )
    if datname != current_db:
        raise SetupError(
            f"slot {cfg.slot} belongs to database {datname!s}, but pg_dsn connects to "
            f"{current_db!s}: point pg_dsn at {datname!s} or use another slot name",
            slot=cfg.slot,
        )
    if wal_status == "lost":
        raise SetupError(
            f"slot {cfg.slot} is invalidated (wal_status = lost): the WAL it needed was removed "
            "and events in it cannot be recovered from the slot. Reconcile from the outbox "
            "table, then `cdc-relay drop --yes` and `cdc-relay init`",
            slot=cfg.slot,
        )
    if active:
        raise SlotBusy(
            f"slot {cfg.slot} is active in another connection (pid {active_pid}); "
            "waiting as a standby",
            slot=cfg.slot,
        )
    if confirmed is None:
        raise SetupError(f"slot {cfg.slot} has no confirmed_flush_lsn", slot=cfg.slot)
    return Lsn.parse(str(confirmed))


def outbox_ddl(table: str = "public.outbox") -> str:
    """The outbox table definition (Debezium-compatible column names)."""
    schema, _, name = table.rpartition(".")
    schema = schema or "public"
    return f"""\
CREATE TABLE IF NOT EXISTS "{schema}"."{name}" (
    id            uuid        PRIMARY KEY,
    aggregatetype text        NOT NULL,
    aggregateid   text        NOT NULL,
    type          text        NOT NULL,
    payload       jsonb,
    headers       jsonb,
    traceparent   text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
"""


def init(cfg: Config, create_outbox: bool) -> list[str]:
    """Create what is missing (outbox, publication, slot); idempotent. Returns what was done."""
    done: list[str] = []
    with connect(cfg) as conn:
        check_server(conn)
        if create_outbox:
            exists = _one(conn, "SELECT to_regclass(%s)", _qualified(cfg))
            if exists is None or exists[0] is None:
                conn.execute(outbox_ddl(f"{cfg.outbox_schema}.{cfg.outbox_name}").encode())
                done.append(f"created table {cfg.outbox_table}")
        check_outbox_table(conn, cfg)
        if _one(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", cfg.publication) is None:
            conn.execute(
                sql.SQL(
                    "CREATE PUBLICATION {} FOR TABLE {}.{} WITH (publish = 'insert, truncate')"
                ).format(
                    sql.Identifier(cfg.publication),
                    sql.Identifier(cfg.outbox_schema),
                    sql.Identifier(cfg.outbox_name),
                )
            )
            done.append(f"created publication {cfg.publication}")
        check_publication(conn, cfg)
        if _one(conn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", cfg.slot) is None:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (cfg.slot,))
            done.append(f"created slot {cfg.slot}")
        with contextlib.suppress(SlotBusy):  # a running relay is fine for init
            check_slot(conn, cfg)
    return done


def prepare(cfg: Config) -> Lsn:
    """Every start-up check; create slot and publication first if configured. → start LSN."""
    if cfg.create_slot:
        init(cfg, create_outbox=False)
    with connect(cfg) as conn:
        check_server(conn)
        check_outbox_table(conn, cfg)
        check_publication(conn, cfg)
        return check_slot(conn, cfg)


def status(cfg: Config) -> SlotStatus:
    with connect(cfg) as conn:
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
    done: list[str] = []
    with connect(cfg) as conn:
        row = _one(
            conn,
            "SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = %s",
            cfg.slot,
        )
        if row is not None:
            if row[0]:
                raise SetupError(
                    f"slot {cfg.slot} is in use by pid {row[1]}: stop the relay first",
                    slot=cfg.slot,
                )
            conn.execute("SELECT pg_drop_replication_slot(%s)", (cfg.slot,))
            done.append(f"dropped slot {cfg.slot}")
        if _one(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", cfg.publication):
            conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(cfg.publication)))
            done.append(f"dropped publication {cfg.publication}")
    return done
