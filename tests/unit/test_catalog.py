"""catalog without a server: version, wal_level and encoding checks, DDL quoting, error
translation, the slot checks and the slot marker, and the order of the publication re-check."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from cdc_relay import catalog
from cdc_relay.config import Config, load
from cdc_relay.errors import POSTGRES, ConnectionLost, SetupError, SlotBusy
from cdc_relay.lsn import Lsn

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
    with pytest.raises((SetupError, ConnectionLost)) as info, catalog.sql_errors(cfg, "doing x"):
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


def test_cancelled_statement_is_retryable() -> None:
    # statement_timeout on the publication re-check: the next check may pass
    err = _translated(psycopg.errors.QueryCanceled("canceling statement due to statement timeout"))
    assert type(err) is ConnectionLost
    assert err.retryable


def test_lost_connection_is_attributed_to_postgres() -> None:
    err = _translated(psycopg.errors.AdminShutdown("terminating connection"))
    assert err.side == POSTGRES  # type: ignore[attr-defined]


def test_unreachable_server_is_a_retryable_postgres_failure_without_secrets() -> None:
    with socket.socket() as s:  # a port nobody listens on: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(pg_dsn=f"postgresql://relay:hunter2@127.0.0.1:{port}/app")
    with pytest.raises(ConnectionLost) as info:
        catalog.connect(cfg)
    assert info.value.side == POSTGRES
    assert "hunter2" not in str(info.value)
    assert "cannot connect to PostgreSQL" in str(info.value)


def test_invalid_dsn_is_refused_before_connecting() -> None:
    with pytest.raises(SetupError) as info:
        catalog.connect(_cfg(pg_dsn="host=h password='hunter2"))
    assert "hunter2" not in str(info.value)


# -- encoding --------------------------------------------------------------------------------------
class _ParamInfo:
    def __init__(self, params: dict[str, str]) -> None:
        self._params = params

    def parameter_status(self, name: str) -> str | None:
        return self._params.get(name)


class _EncodingConn:
    def __init__(self, server: str, client: str = "UTF8") -> None:
        self.info = _ParamInfo({"server_encoding": server, "client_encoding": client})


def test_sql_ascii_database_is_refused() -> None:
    with pytest.raises(SetupError) as info:
        catalog.check_encoding(cast("catalog.Conn", _EncodingConn("SQL_ASCII")))
    assert "SQL_ASCII" in str(info.value)
    assert not info.value.retryable


@pytest.mark.parametrize("server", ["UTF8", "LATIN1", "WIN1252"])
def test_other_database_encodings_are_fine(server: str) -> None:
    catalog.check_encoding(cast("catalog.Conn", _EncodingConn(server)))


# -- the marker ------------------------------------------------------------------------------------
MARKER = catalog.SlotMarker(
    "cdc_relay", "0/16B3748", "7301234567890123456", 1, "2026-11-28T10:00:00Z"
)


def test_marker_line_has_the_documented_form() -> None:
    assert MARKER.line() == (
        "cdc-relay: slot cdc_relay created at 0/16B3748 on system 7301234567890123456 "
        "timeline 1 at 2026-11-28T10:00:00Z"
    )


def test_marker_round_trips_and_ignores_other_lines() -> None:
    comment = f"owned by team orders\n{MARKER.line()}\nsomething else"
    assert catalog.parse_markers(comment) == {"cdc_relay": MARKER}
    assert catalog.parse_markers(None) == {}
    assert catalog.parse_markers("cdc-relay: slot x created at garbage") == {}


def test_with_marker_replaces_only_that_slots_line() -> None:
    other = catalog.SlotMarker("other_slot", "0/1", "1", 1, "2026-01-01T00:00:00Z")
    comment = f"team orders\n{other.line()}\n{MARKER.line()}"
    newer = catalog.SlotMarker("cdc_relay", "0/9000000", "99", 2, "2026-12-01T00:00:00Z")
    updated = catalog.with_marker(comment, newer)
    assert updated.splitlines() == ["team orders", other.line(), newer.line()]
    assert catalog.parse_markers(updated) == {"other_slot": other, "cdc_relay": newer}
    assert catalog.with_marker(None, MARKER) == MARKER.line()


@pytest.mark.parametrize(
    ("version", "failover"), [(140000, False), (160004, False), (170000, True), (180001, True)]
)
def test_slot_is_a_failover_slot_from_17_on(version: int, failover: bool) -> None:
    query = catalog.create_slot_query(version)
    assert query.startswith("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, ")
    assert ("failover => true" in query) is failover


def test_vanished_slot_error_says_what_happened_and_how_to_recover() -> None:
    cfg = _cfg()
    err = catalog.vanished_slot_error(cfg, MARKER, ("7301234567890123456", 1))
    text = str(err)
    assert "replication slot cdc_relay existed and is gone" in text
    assert "created at 0/16B3748 on system 7301234567890123456 timeline 1" in text
    assert "skip every outbox event committed in between" in text
    assert "Recover with `cdc-relay recover --since TIMESTAMP`" in text
    assert "`cdc-relay recover --since" in text
    assert "this server is system" not in text
    moved = str(catalog.vanished_slot_error(cfg, MARKER, ("7301234567890123456", 2)))
    assert "this server is system 7301234567890123456 timeline 2" in moved
    assert not err.retryable


# -- check_slot ------------------------------------------------------------------------------------
class SlotConn:
    """A fake connection answering the queries ``check_slot`` makes."""

    def __init__(self, slot_row: tuple[object, ...] | None, comment: str | None = None) -> None:
        self.info = _Info(150004)
        self.slot_row = slot_row
        self.comment = comment
        self.queries: list[str] = []

    def execute(self, query: str, params: Any = ()) -> _Result:
        self.queries.append(query)
        if "pg_replication_slots" in query:
            return _Result(self.slot_row)
        if "obj_description" in query:
            return _Result((self.comment,))
        if "pg_control_system" in query:
            return _Result(("7301234567890123456", False))
        if "pg_walfile_name" in query:
            return _Result(("000000030000000000000001",))
        raise AssertionError(query)


def _slot_row(
    active: bool = False, pid: int | None = None, two_phase: bool = False
) -> tuple[object, ...]:
    return ("pgoutput", "logical", "app", active, pid, "0/16B3748", "reserved", "app", two_phase)


def _check_slot(conn: SlotConn, own_pids: tuple[int, ...] = ()) -> Lsn:
    return catalog.check_slot(cast("catalog.Conn", conn), _cfg(), own_pids)


def test_healthy_slot_returns_its_position() -> None:
    assert _check_slot(SlotConn(_slot_row())) == Lsn.parse("0/16B3748")


def test_two_phase_slot_is_refused_with_the_fix() -> None:
    with pytest.raises(SetupError) as info:
        _check_slot(SlotConn(_slot_row(two_phase=True)))
    text = str(info.value)
    assert "two_phase = true" in text
    assert "SELECT pg_drop_replication_slot('cdc_relay')" in text
    assert "`cdc-relay init`" in text


def test_slot_held_by_another_relay_waits_as_standby() -> None:
    with pytest.raises(SlotBusy) as info:
        _check_slot(SlotConn(_slot_row(active=True, pid=77)), own_pids=(12, 13))
    assert info.value.holder_pid == 77
    assert "slot cdc_relay is active in another connection (pid 77)" in str(info.value)
    assert "standby" in str(info.value)


def test_slot_held_by_our_own_previous_connection_is_not_a_standby() -> None:
    with pytest.raises(SlotBusy) as info:
        _check_slot(SlotConn(_slot_row(active=True, pid=13)), own_pids=(12, 13))
    text = str(info.value)
    assert info.value.holder_pid == 13
    assert "this relay's own previous connection (pid 13)" in text
    assert "retrying shortly" in text
    assert "standby" not in text
    assert info.value.retryable


def test_missing_slot_without_a_marker_says_run_init() -> None:
    with pytest.raises(SetupError) as info:
        _check_slot(SlotConn(None, comment="team orders"))
    assert "replication slot cdc_relay does not exist: run `cdc-relay init`" in str(info.value)


def test_missing_slot_named_by_the_marker_existed_and_is_gone() -> None:
    with pytest.raises(SetupError) as info:
        _check_slot(SlotConn(None, comment=MARKER.line()))
    text = str(info.value)
    assert "existed and is gone" in text
    assert "this server is system 7301234567890123456 timeline 3" in text


def test_marker_of_another_slot_does_not_count() -> None:
    other = catalog.SlotMarker("other_slot", "0/1", "1", 1, "2026-01-01T00:00:00Z")
    with pytest.raises(SetupError) as info:
        _check_slot(SlotConn(None, comment=other.line()))
    assert "does not exist" in str(info.value)


# -- prepare and the publication watermark ---------------------------------------------------------
class _Closing:
    """A fake connection usable as ``with connect(cfg) as conn``."""

    def __init__(self, lsn: str = "0/5000060") -> None:
        self.info = _Info(150004)
        self.lsn = lsn
        self.queries: list[str] = []

    def __enter__(self) -> _Closing:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    closed = False

    def close(self) -> None:
        self.closed = True

    def execute(self, query: object, params: Any = ()) -> _Result:
        self.queries.append(str(query))
        if "pg_current_wal_lsn" in str(query):
            return _Result((self.lsn,))
        return _Result(None)


def test_watermark_reads_the_lsn_before_checking_the_publication(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conn = _Closing()
    order: list[str] = []
    monkeypatch.setattr(catalog, "connect", lambda cfg: conn)
    monkeypatch.setattr(
        catalog, "check_publication", lambda c, cfg: order.append(f"check after {len(c.queries)}")
    )
    assert catalog.publication_watermark(_cfg()) == Lsn.parse("0/5000060")
    assert "statement_timeout" in conn.queries[0]
    assert "pg_current_wal_lsn" in conn.queries[1]
    assert order == ["check after 2"]


def test_publication_check_keeps_its_connection_and_reconnects_after_a_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[_Closing] = []

    def connect(cfg: Config) -> _Closing:
        opened.append(_Closing())
        return opened[-1]

    lost = [False]

    def check(conn: object, cfg: Config) -> None:
        if lost[0]:
            raise ConnectionLost("gone", side="postgres")

    monkeypatch.setattr(catalog, "connect", connect)
    monkeypatch.setattr(catalog, "check_publication", check)
    checker = catalog.PublicationCheck(_cfg())
    checker.watermark()
    checker.watermark()
    assert len(opened) == 1, "one connection serves every check"
    lost[0] = True
    with pytest.raises(ConnectionLost):
        checker.watermark()
    assert opened[0].closed
    lost[0] = False
    checker.watermark()
    assert len(opened) == 2, "the next check reconnects"
    checker.close()
    assert opened[1].closed


def test_watermark_reports_drift_as_a_change_while_streaming(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def drifted(conn: object, cfg: Config) -> None:
        raise SetupError("publication p does not publish inserts: ALTER ...", publication="p")

    monkeypatch.setattr(catalog, "connect", lambda cfg: _Closing())
    monkeypatch.setattr(catalog, "check_publication", drifted)
    with pytest.raises(SetupError) as info:
        catalog.publication_watermark(_cfg())
    assert str(info.value) == (
        "the publication changed while streaming: publication p does not publish inserts: "
        "ALTER .... Outbox rows committed since the last start while the publication did not "
        "cover them are not in the replication stream, even once it is restored (PostgreSQL "
        "decodes them with the publication as it was): re-publish them from the outbox "
        "table; the slot has not moved past them (publication=p)"
    )


def _fake_prepare(monkeypatch: pytest.MonkeyPatch, created: list[str]) -> list[tuple[bool, bool]]:
    """Patch prepare's collaborators; returns how ``init`` was called."""
    calls: list[tuple[bool, bool]] = []

    def init(cfg: Config, create_outbox: bool, *, deliberate: bool = True) -> list[str]:
        calls.append((create_outbox, deliberate))
        return created

    monkeypatch.setattr(catalog, "init", init)
    monkeypatch.setattr(catalog, "connect", lambda cfg: _Closing())
    for name in ("check_server", "check_encoding"):
        monkeypatch.setattr(catalog, name, lambda conn: None)
    for name in ("check_outbox_table", "check_publication"):
        monkeypatch.setattr(catalog, name, lambda conn, cfg: None)
    monkeypatch.setattr(catalog, "check_slot", lambda conn, cfg, own: Lsn(own[0]))
    monkeypatch.setattr(catalog, "_warn_about_partitions", lambda conn, cfg: None)
    monkeypatch.setattr(catalog, "check_slot_publication", lambda conn, cfg: None)
    monkeypatch.setattr(catalog, "_publication_comment", lambda conn, pub: MARKER.line())
    return calls


def test_prepare_creates_only_when_allowed_and_logs_what_it_did(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = _fake_prepare(monkeypatch, ["created slot cdc_relay at 0/1"])
    cfg = _cfg(create_slot="true")
    with caplog.at_level(logging.INFO, logger="cdc_relay"):
        assert catalog.prepare(cfg, own_pids=(5,)) == Lsn(5)
    assert calls == [(False, False)]  # never the outbox, never deliberate
    assert [r.getMessage() for r in caplog.records] == ["created slot cdc_relay at 0/1"]
    catalog.prepare(cfg, allow_create=False, own_pids=(5,))
    catalog.prepare(_cfg(), own_pids=(5,))
    assert calls == [(False, False)]
