"""The PostgreSQL side's safety nets, on a real server: a lost slot is never recreated behind
the operator's back, slots and databases the relay cannot read are refused at start, every
session speaks UTF-8 with hex bytea whatever the database says, publication drift is caught
while streaming, and START_REPLICATION / the final status update never hang or misclassify.

These call ``catalog`` and ``postgres`` directly (no broker, no daemon), so each failure points
at the layer that owns it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from cdc_relay import catalog
from cdc_relay.config import Config, load
from cdc_relay.errors import POSTGRES, ConnectionLost, SetupError, SlotBusy
from cdc_relay.lsn import Lsn
from cdc_relay.pgoutput import Insert, PgOutputMessage, Relation, decode
from cdc_relay.postgres import ReplicationStream
from cdc_relay.replication import XLogData, parse_copy_data, pg_now_us, standby_status_update
from tests.integration.harness import dsn_for
from tests.sandbox import PostgresSandbox

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[tuple[Any, ...]]


# -- a database of its own per test ----------------------------------------------------------------
@dataclass
class Db:
    pg: PostgresSandbox
    name: str
    dsn: str

    def cfg(self, **overrides: Any) -> Config:
        """The relay's settings for this database (no broker is ever contacted here)."""
        return load(
            env={},
            overrides={
                "pg_dsn": self.dsn,
                "amqp_url": "amqp://guest:guest@127.0.0.1:1/%2F",
                "slot": self.name,
                "publication": self.name,
                **overrides,
            },
        )

    @contextlib.contextmanager
    def sql(self) -> Iterator[Conn]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            yield conn

    def scalar(self, query: str, *params: object) -> Any:
        with self.sql() as conn:
            row = conn.execute(query.encode(), params).fetchone()
        return None if row is None else row[0]

    def comment(self) -> str | None:
        value = self.scalar(
            "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = %s",
            self.name,
        )
        return None if value is None else str(value)

    def slot_exists(self) -> bool:
        return bool(
            self.scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", self.name)
        )


@contextlib.contextmanager
def database(pg: PostgresSandbox, name: str, create: str = "") -> Iterator[Db]:
    """A fresh database (``create``: extra CREATE DATABASE clauses); dropped with its slot."""
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
        conn.execute(f'CREATE DATABASE "{name}" {create}'.encode())
    try:
        yield Db(pg, name, dsn_for(pg, name))
    finally:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE slot_name = %s AND active",
                (name,),
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s AND active",
                    (name,),
                ).fetchone()
                if row is not None and row[0] == 0:
                    break
                time.sleep(0.05)
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (name,),
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


@pytest.fixture
def db(pg: PostgresSandbox, request: pytest.FixtureRequest) -> Iterator[Db]:
    name = "c_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    with database(pg, name) as d:
        yield d


def _set_up(db: Db, **overrides: Any) -> Config:
    cfg = db.cfg(**overrides)
    catalog.init(cfg, create_outbox=True)
    return cfg


# -- streaming helpers -----------------------------------------------------------------------------
def _wait(fd: int, *, write: bool, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    assert remaining > 0, "timed out waiting for the replication socket"
    select.select([] if write else [fd], [fd] if write else [], [], remaining)


def start_streaming(
    stream: ReplicationStream, cfg: Config, start: Lsn, timeout: float = 15
) -> None:
    """START_REPLICATION the way the event loop drives it: never a blocking call."""
    deadline = time.monotonic() + timeout
    stream.start_async(cfg.publication, start)
    fd = stream.fileno()
    while stream.flush():
        _wait(fd, write=True, deadline=deadline)
    while not stream.poll_start():
        _wait(fd, write=False, deadline=deadline)


def read_until(
    stream: ReplicationStream,
    done: Callable[[list[PgOutputMessage]], bool],
    timeout: float = 15,
) -> list[PgOutputMessage]:
    """Decode XLogData until ``done(messages)``; answers keepalives that ask for a reply."""
    deadline = time.monotonic() + timeout
    messages: list[PgOutputMessage] = []
    fd = stream.fileno()
    while not done(messages):
        _wait(fd, write=False, deadline=deadline)
        stream.consume()
        while (data := stream.read()) is not None:
            frame = parse_copy_data(data)
            if isinstance(frame, XLogData):
                messages.append(decode(frame.payload))
            elif frame.reply_requested:
                stream.send(standby_status_update(0, 0, 0, pg_now_us()))
    return messages


def _first_insert(messages: list[PgOutputMessage]) -> bool:
    return any(isinstance(m, Insert) for m in messages)


def _stream_one_insert(
    cfg: Config, insert: Callable[[], None]
) -> tuple[Relation, tuple[bytes | None, ...]]:
    """Run ``insert`` and return the outbox Relation and the Insert's text values as streamed."""
    start = catalog.prepare(cfg)
    stream = ReplicationStream(cfg.pg_dsn, cfg.slot)
    try:
        stream.connect()
        start_streaming(stream, cfg, start)
        insert()
        messages = read_until(stream, _first_insert)
    finally:
        stream.close()
    relation = next(m for m in messages if isinstance(m, Relation))
    row = next(m for m in messages if isinstance(m, Insert))
    values = tuple(v if isinstance(v, bytes) or v is None else b"?" for v in row.new)
    return relation, values


def _by_name(relation: Relation, values: tuple[bytes | None, ...]) -> dict[str, bytes | None]:
    return {c.name: v for c, v in zip(relation.columns, values, strict=True)}


# -- 1.1: a slot that existed is never recreated by `run` ------------------------------------------
def test_first_start_with_create_slot_creates_and_records_the_slot(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    with db.sql() as conn:
        conn.execute(catalog.outbox_ddl().encode())
    cfg = db.cfg(create_slot=True)
    with caplog.at_level(logging.INFO, logger="cdc_relay"):
        start = catalog.prepare(cfg)
    logged = [r.getMessage() for r in caplog.records]
    assert f"created publication {db.name}" in logged
    assert any(m.startswith(f"created slot {db.name} at ") for m in logged), logged
    markers = catalog.parse_markers(db.comment())
    assert set(markers) == {db.name}
    marker = markers[db.name]
    assert marker.how == "created"
    assert Lsn.parse(marker.lsn) <= start
    assert marker.system_id == str(db.scalar("SELECT system_identifier FROM pg_control_system()"))
    assert marker.timeline == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", marker.at)
    # later starts find everything in place and create nothing
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cdc_relay"):
        assert catalog.prepare(cfg) == start
    # (the suite's role is a superuser, which is worth a warning, and only that)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("the relay runs as a superuser"), said


def test_dropped_slot_is_not_recreated_by_create_slot(db: Db) -> None:
    cfg = _set_up(db)
    created = catalog.parse_markers(db.comment())[db.name]
    with db.sql() as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (db.name,))
    for attempt in (db.cfg(create_slot=True), cfg):
        with pytest.raises(SetupError) as info:
            catalog.prepare(attempt)
        text = str(info.value)
        assert f"replication slot {db.name} existed and is gone" in text
        assert f"created at {created.lsn} on system {created.system_id}" in text
        assert "skip every outbox event committed in between" in text
        assert "Recover with `cdc-relay recover --since TIMESTAMP`" in text
        assert "`cdc-relay recover --since" in text
        assert "this server is system" not in text  # same server: dropped, not a failover
        assert not info.value.retryable
    assert not db.slot_exists()
    # the daemon's own guard: once a session saw the slot, no later session creates it
    with pytest.raises(SetupError, match="existed and is gone"):
        catalog.prepare(db.cfg(create_slot=True), allow_create=False)
    assert not db.slot_exists()


def test_init_recreates_a_vanished_slot_deliberately_and_rewrites_the_marker(db: Db) -> None:
    cfg = _set_up(db)
    with db.sql() as conn:
        conn.execute("COMMENT ON PUBLICATION " + db.name + " IS 'team orders'")
    catalog.init(cfg, create_outbox=False)  # nothing to create: comment kept, no marker yet
    assert db.comment() == "team orders"
    with db.sql() as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (db.name,))
    done = catalog.init(cfg, create_outbox=False)
    assert db.slot_exists()  # no marker: a first creation as far as anyone can tell
    assert done[0].startswith(f"created slot {db.name} at ")
    first = catalog.parse_markers(db.comment())[db.name]
    assert db.comment() == f"team orders\n{first.line()}"

    with db.sql() as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (db.name,))
        conn.execute("SELECT pg_switch_wal()")
        conn.execute("SELECT txid_current()")
    with pytest.raises(SetupError, match="existed and is gone"):
        catalog.prepare(db.cfg(create_slot=True))
    done = catalog.init(cfg, create_outbox=False)  # the operator's deliberate act
    assert done[0].startswith(f"created slot {db.name} at ")
    assert f"replacing the one recorded at {first.lsn}" in done[0]
    assert done[1] == f"recorded slot {db.name} in the comment of publication {db.name}"
    second = catalog.parse_markers(db.comment())[db.name]
    assert Lsn.parse(second.lsn) > Lsn.parse(first.lsn)
    assert db.comment() == f"team orders\n{second.line()}"
    assert catalog.prepare(db.cfg(create_slot=True)) >= Lsn.parse(second.lsn)


def test_create_slot_records_a_slot_it_finds_without_a_marker(db: Db) -> None:
    """A slot made by hand (or by an older relay) is protected from its first start on."""
    with db.sql() as conn:
        conn.execute(catalog.outbox_ddl().encode())
        conn.execute(f"CREATE PUBLICATION {db.name} FOR TABLE outbox".encode())
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (db.name,))
    start = catalog.prepare(db.cfg(create_slot=True))
    marker = catalog.parse_markers(db.comment())[db.name]
    assert marker.how == "seen"
    assert marker.lsn == str(start)
    with db.sql() as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (db.name,))
    with pytest.raises(SetupError, match=f"records it in use at {start}"):
        catalog.prepare(db.cfg(create_slot=True))
    assert not db.slot_exists()


def test_a_role_that_may_not_comment_still_creates_the_slot(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    role = f"r_{uuid.uuid4().hex[:8]}"
    with db.sql() as conn:
        conn.execute(catalog.outbox_ddl().encode())
        conn.execute(f"CREATE PUBLICATION {db.name} FOR TABLE outbox".encode())
        conn.execute(f"CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'pw'".encode())
        conn.execute(f"GRANT SELECT ON outbox TO {role}".encode())
    try:
        dsn = db.dsn.replace("postgres:sandbox-pw@", f"{role}:pw@")
        with caplog.at_level(logging.INFO, logger="cdc_relay"):
            catalog.prepare(db.cfg(pg_dsn=dsn, create_slot=True))
        assert db.slot_exists()
        assert db.comment() is None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings, caplog.text
        assert "cannot record the slot in the publication's comment" in warnings[0].getMessage()
    finally:
        with db.sql() as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (db.name,))
            conn.execute(f"DROP OWNED BY {role}".encode())
            conn.execute(f"DROP ROLE {role}".encode())


# -- slots and databases the relay cannot read -----------------------------------------------------
def test_two_phase_slot_is_refused(db: Db) -> None:
    with db.sql() as conn:
        conn.execute(catalog.outbox_ddl().encode())
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput', false, true)", (db.name,)
        )
    with pytest.raises(SetupError) as refused:
        catalog.init(db.cfg(), create_outbox=True)
    assert db.scalar("SELECT count(*) FROM pg_publication") == 0  # refused before creating
    with db.sql() as conn:
        conn.execute(f"CREATE PUBLICATION {db.name} FOR TABLE outbox".encode())
    texts = [str(refused.value)]
    for cfg in (db.cfg(), db.cfg(create_slot=True)):
        with pytest.raises(SetupError) as info:
            catalog.prepare(cfg)
        texts.append(str(info.value))
    for text in texts:
        assert f"slot {db.name} was created with two_phase = true" in text
        assert f"SELECT pg_drop_replication_slot('{db.name}')" in text
        assert "`cdc-relay init`" in text
    # the fix the message gives works
    with db.sql() as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (db.name,))
    catalog.init(db.cfg(), create_outbox=False)
    assert catalog.prepare(db.cfg()) > Lsn(0)


def test_sql_ascii_database_is_refused(pg: PostgresSandbox) -> None:
    create = "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    with database(pg, "c_sql_ascii", create) as d:
        with d.sql() as conn:
            conn.execute(catalog.outbox_ddl().encode())
        for attempt in (
            lambda: catalog.init(d.cfg(), create_outbox=True),
            lambda: catalog.prepare(d.cfg(create_slot=True)),
            lambda: ReplicationStream(d.dsn, d.name).connect(),
        ):
            with pytest.raises(SetupError) as info:
                attempt()
            assert "encoding is SQL_ASCII" in str(info.value)
            assert "cannot convert to UTF-8" in str(info.value)
        assert not d.slot_exists()


def test_latin1_database_streams_utf8(pg: PostgresSandbox) -> None:
    create = "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    with database(pg, "c_latin1", create) as d:
        with d.sql() as conn:
            conn.execute(catalog.outbox_ddl().encode())
            conn.execute('ALTER TABLE outbox ADD COLUMN "straße" text')
        cfg = _set_up(d)
        event_id = str(uuid.uuid4())

        def insert() -> None:
            with d.sql() as conn:
                conn.execute(
                    'INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, "straße") '
                    "VALUES (%s, 'Bestellung', 'Zürich-ÿ', 'Größe', %s::jsonb, 'Fußweg')",
                    (event_id, '{"stadt": "Köln", "preis": "5 ½"}'),
                )

        relation, values = _stream_one_insert(cfg, insert)
    row = _by_name(relation, values)
    assert "straße" in row  # names are converted too
    assert row["aggregateid"] == "Zürich-ÿ".encode()
    assert row["type"] == "Größe".encode()
    assert row["straße"] == "Fußweg".encode()
    payload = row["payload"]
    assert payload is not None
    assert payload.decode("utf-8") == '{"preis": "5 ½", "stadt": "Köln"}'


def test_database_bytea_output_does_not_reach_the_relay(db: Db) -> None:
    with db.sql() as conn:
        conn.execute(catalog.outbox_ddl().encode())
        conn.execute("ALTER TABLE outbox ADD COLUMN blob bytea")
        conn.execute(f"ALTER DATABASE {db.name} SET bytea_output = 'escape'".encode())
    with db.sql() as conn:  # a session that does not set it gets the database's setting
        assert conn.execute("SHOW bytea_output").fetchone() == ("escape",)
    cfg = _set_up(db)
    with catalog.connect(cfg) as conn:  # the relay's catalog session
        assert conn.execute("SHOW bytea_output").fetchone() == ("hex",)
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        assert conn.execute("SHOW TimeZone").fetchone() == ("UTC",)

    def insert() -> None:
        with db.sql() as conn:
            conn.execute(
                "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, blob) "
                "VALUES (gen_random_uuid(), 'a', 'b', 'c', '{}', '\\x00ff41'::bytea)"
            )

    relation, values = _stream_one_insert(cfg, insert)
    assert _by_name(relation, values)["blob"] == b"\\x00ff41"


# -- 1.2: publication drift while streaming --------------------------------------------------------
def test_publication_watermark_vouches_for_wal_written_before_the_check(db: Db) -> None:
    cfg = _set_up(db)
    before = Lsn.parse(str(db.scalar("SELECT pg_current_wal_lsn()::text")))
    mark = catalog.publication_watermark(cfg)
    after = Lsn.parse(str(db.scalar("SELECT pg_current_wal_lsn()::text")))
    assert before <= mark <= after


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("SET TABLE public.other", "does not include public.outbox"),
        ("SET (publish = 'update')", "does not publish inserts"),
        ("SET TABLE outbox WHERE (type <> 'Secret')", "filters the rows of public.outbox"),
        (
            "SET TABLE outbox (id, aggregatetype, aggregateid, type, payload)",
            "leaves out created_at, headers, traceparent",
        ),
    ],
)
def test_publication_watermark_detects_drift(db: Db, change: str, problem: str) -> None:
    cfg = _set_up(db)
    catalog.publication_watermark(cfg)
    with db.sql() as conn:
        conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
        conn.execute(f"ALTER PUBLICATION {db.name} {change}".encode())
    with pytest.raises(SetupError) as info:
        catalog.publication_watermark(cfg)
    text = str(info.value)
    assert text.startswith("the publication changed while streaming: ")
    assert problem in text
    assert f'ALTER PUBLICATION "{db.name}"' in text  # still says how to fix it
    assert not info.value.retryable


def test_publication_watermark_on_an_unreachable_server_is_retryable(db: Db) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = db.cfg(pg_dsn=f"postgresql://postgres:sandbox-pw@127.0.0.1:{port}/{db.name}")
    started = time.monotonic()
    with pytest.raises(ConnectionLost) as info:
        catalog.publication_watermark(cfg)
    assert time.monotonic() - started < 10
    assert info.value.side == POSTGRES
    assert "sandbox-pw" not in str(info.value)


# -- START_REPLICATION and the final status update -------------------------------------------------
def test_start_replication_on_a_busy_slot_is_slot_busy(db: Db) -> None:
    cfg = _set_up(db)
    start = catalog.prepare(cfg)
    holder = ReplicationStream(cfg.pg_dsn, cfg.slot)
    rival = ReplicationStream(cfg.pg_dsn, cfg.slot)
    try:
        holder.connect()
        start_streaming(holder, cfg, start)
        rival.connect()  # both passed the catalog check: the race START_REPLICATION settles
        with pytest.raises(SlotBusy) as info:
            start_streaming(rival, cfg, start)
        assert info.value.holder_pid == holder.backend_pid
        assert info.value.side == POSTGRES
        assert "waiting as a standby" in str(info.value)
        # the catalog check recognises the holder as ours when told its pid
        assert holder.backend_pid is not None
        with pytest.raises(SlotBusy, match="own previous connection"):
            catalog.prepare(cfg, own_pids=[holder.backend_pid])
        with pytest.raises(SlotBusy, match="another relay"):
            catalog.prepare(cfg, own_pids=[rival.backend_pid or 0])
    finally:
        rival.close()
        holder.close()


def test_start_replication_on_a_terminated_connection_is_retryable(db: Db) -> None:
    cfg = _set_up(db)
    start = catalog.prepare(cfg)
    stream = ReplicationStream(cfg.pg_dsn, cfg.slot)
    try:
        stream.connect()
        with db.sql() as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (stream.backend_pid,))
        time.sleep(0.2)
        with pytest.raises(ConnectionLost) as info:
            start_streaming(stream, cfg, start)
        assert type(info.value) is ConnectionLost
        assert info.value.side == POSTGRES
    finally:
        stream.close()


def test_missing_slot_at_start_replication_is_a_setup_error(db: Db) -> None:
    cfg = _set_up(db)
    stream = ReplicationStream(cfg.pg_dsn, "c_no_such_slot")
    try:
        stream.connect()
        with pytest.raises(SetupError) as info:
            start_streaming(stream, cfg, Lsn(0))
        assert "SQLSTATE 42704" in str(info.value)
    finally:
        stream.close()


def _fill_until_stuck(stream: ReplicationStream, message: bytes, limit: float = 30) -> None:
    """Queue status updates until the kernel stops taking them (the peer is not reading)."""
    deadline = time.monotonic() + limit
    pgconn = stream.pgconn
    while time.monotonic() < deadline:
        for _ in range(2000):
            pgconn.put_copy_data(message)
        if stream.flush():
            time.sleep(0.05)
            if stream.flush():
                return
    raise AssertionError("the socket never filled up")


def test_send_final_gives_up_at_its_deadline_when_the_server_does_not_read(db: Db) -> None:
    cfg = _set_up(db)
    start = catalog.prepare(cfg)
    stream = ReplicationStream(cfg.pg_dsn, cfg.slot)
    stream.connect()
    pid = stream.backend_pid
    assert pid is not None
    message = standby_status_update(start, start, start, pg_now_us())
    try:
        start_streaming(stream, cfg, start)
        os.kill(pid, signal.SIGSTOP)  # the walsender stops reading: a partition, as seen by us
        try:
            _fill_until_stuck(stream, message)
            started = time.monotonic()
            assert stream.send_final(message, timeout=0.5) is False
            assert time.monotonic() - started < 1.5
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        stream.close()


def test_send_final_to_a_terminated_walsender_never_raises(db: Db) -> None:
    cfg = _set_up(db)
    start = catalog.prepare(cfg)
    stream = ReplicationStream(cfg.pg_dsn, cfg.slot)
    message = standby_status_update(start, start, start, pg_now_us())
    try:
        stream.connect()
        start_streaming(stream, cfg, start)
        with db.sql() as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (stream.backend_pid,))
        time.sleep(0.2)
        started = time.monotonic()
        assert stream.send_final(message, timeout=0.5) is False
        assert time.monotonic() - started < 1.5
    finally:
        stream.close()
    assert stream.send_final(message) is False
