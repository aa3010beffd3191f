"""catalog without a server: version and wal_level checks, DDL quoting, error translation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from cdc_relay import catalog
from cdc_relay.config import Config, load
from cdc_relay.errors import ConnectionLost, SetupError

OUTBOX_SQL = Path(__file__).resolve().parents[2] / "sql" / "outbox.sql"


class _Info:
    def __init__(self, server_version: int) -> None:
        self.server_version = server_version


class _Result:
    def __init__(self, row: tuple[object, ...] | None) -> None:
        self._row = row

    def fetchone(self) -> tuple[object, ...] | None:
        return self._row


class FakeConn:
    """Just enough of a psycopg connection for ``check_server``."""

    def __init__(self, server_version: int, wal_level: str = "logical") -> None:
        self.info = _Info(server_version)
        self.wal_level = wal_level
        self.queries: list[str] = []

    def execute(self, query: str, params: Any = ()) -> _Result:
        self.queries.append(query)
        assert "wal_level" in query
        return _Result((self.wal_level,))


def _check_server(conn: FakeConn) -> None:
    catalog.check_server(cast("psycopg.Connection[tuple[object, ...]]", conn))


def _cfg(**overrides: str) -> Config:
    env = {
        "CDC_RELAY_PG_DSN": "postgresql://relay:hunter2@db.example/app",
        "CDC_RELAY_AMQP_URL": "amqp://guest:guest@mq.example:5672/%2F",
    }
    env.update({f"CDC_RELAY_{k.upper()}": v for k, v in overrides.items()})
    return load(env=env)


# -- check_server ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("version", "shown"), [(130012, "13"), (120000, "12"), (90624, "9.6"), (139999, "13")]
)
def test_server_older_than_14_is_refused_with_the_fix(version: int, shown: str) -> None:
    conn = FakeConn(version)
    with pytest.raises(SetupError) as info:
        _check_server(conn)
    text = str(info.value)
    assert f"PostgreSQL {shown} is too old" in text
    assert "needs PostgreSQL 14 or newer" in text
    assert "upgrade the server" in text
    assert not info.value.retryable
    assert conn.queries == []  # refused before asking anything else


@pytest.mark.parametrize("version", [140000, 150004, 170000])
def test_server_14_or_newer_with_logical_wal_passes(version: int) -> None:
    conn = FakeConn(version)
    _check_server(conn)
    assert len(conn.queries) == 1


@pytest.mark.parametrize("level", ["replica", "minimal"])
def test_wal_level_not_logical_is_refused_with_the_fix(level: str) -> None:
    with pytest.raises(SetupError) as info:
        _check_server(FakeConn(150004, wal_level=level))
    text = str(info.value)
    assert f"wal_level is {level}, not logical" in text
    assert "wal_level = logical" in text
    assert "restart PostgreSQL" in text


# -- the outbox DDL --------------------------------------------------------------------------------
def test_default_ddl_is_the_sql_file_statement() -> None:
    assert catalog.outbox_ddl() in OUTBOX_SQL.read_text()
    assert catalog.outbox_ddl("outbox") == catalog.outbox_ddl("public.outbox")


def test_ddl_quotes_custom_names() -> None:
    text = catalog.outbox_ddl("Sales$.Out", {"type": "Kind", "id": 'we"ird'})
    assert text.startswith('CREATE TABLE IF NOT EXISTS "Sales$"."Out" (\n')
    assert '    "we""ird"     uuid        PRIMARY KEY,\n' in text
    assert '    "Kind"        text        NOT NULL,\n' in text
    assert "    aggregatetype text        NOT NULL,\n" in text


def test_executed_ddl_composes_identifiers() -> None:
    composed = catalog._outbox_ddl_sql("Sales$", 'O"ut', {"aggregate_type": "select"})
    text = composed.as_string()
    assert text.startswith('CREATE TABLE IF NOT EXISTS "Sales$"."O""ut" (\n')
    assert '    "select" text        NOT NULL,\n' in text
    assert '    "id" uuid        PRIMARY KEY,\n' in text


def test_new_table_gets_the_newest_name_of_each_column() -> None:
    cfg = _cfg(column_type="type,event_type")
    columns = catalog._create_columns(cfg)
    assert columns["type"] == "event_type"
    assert columns["id"] == "id"


# -- psycopg errors become typed, one-line errors --------------------------------------------------
def _translated(exc: psycopg.Error) -> Exception:
    cfg = _cfg()
    with pytest.raises((SetupError, ConnectionLost)) as info, catalog._sql_errors(cfg, "doing x"):
        raise exc
    return info.value


def test_permission_denied_is_a_setup_error_with_a_fix() -> None:
    err = _translated(psycopg.errors.InsufficientPrivilege("permission denied for database app"))
    assert isinstance(err, SetupError)
    text = str(err)
    assert "permission denied while doing x" in text
    assert "REPLICATION" in text
    assert "sql/relay_role.sql" in text


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("server closed the connection unexpectedly"),
        psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
        psycopg.errors.TooManyConnections("sorry, too many clients already"),
        psycopg.errors.SerializationFailure("could not serialize access"),
    ],
)
def test_lost_connection_is_retryable(exc: psycopg.Error) -> None:
    err = _translated(exc)
    assert isinstance(err, ConnectionLost)
    assert err.retryable
    assert "PostgreSQL connection failed while doing x" in str(err)


def test_other_errors_are_one_line_without_secrets() -> None:
    err = _translated(
        psycopg.errors.UndefinedTable(
            'relation "x" does not exist (password=hunter2)\nLINE 1: SELECT * FROM x\n      ^'
        )
    )
    assert isinstance(err, SetupError)
    text = str(err)
    assert "\n" not in text
    assert "hunter2" not in text
    assert 'PostgreSQL refused doing x: relation "x" does not exist' in text
    assert "SQLSTATE 42P01" in text
    assert not err.retryable


def test_client_side_error_is_not_retried_forever() -> None:
    err = _translated(psycopg.ProgrammingError("incomplete placeholder: '%'"))
    assert isinstance(err, SetupError)
    assert not err.retryable
