"""Start-up fails closed (DESIGN.md, checkpoint rule 8) and names reach SQL only quoted.

Every scenario is produced for real on a PostgreSQL server and checked the way an operator meets
it: ``cdc-relay run`` exits 1 with exactly one error line that names the problem and says how to
fix it, ``init`` refuses instead of reusing something wrong, and there is never a traceback.
"""

from __future__ import annotations

import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_relay.catalog import outbox_ddl
from tests.integration.harness import Env, insert_events, outbox_row
from tests.sandbox import PG_BIN, PG_SETTINGS, PostgresSandbox, RabbitSandbox

pytestmark = pytest.mark.integration

HOSTILE = ['x"; DROP TABLE outbox; --', "a b", "a" * 64]


# -- helpers ---------------------------------------------------------------------------------------
def _one_error(log: str) -> str:
    """The single error record of a relay log (every line must be a JSON record)."""
    assert "Traceback" not in log, log
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 1, log
    msg = str(errors[0]["msg"])
    assert "\n" not in msg
    return msg


def _run_fails(env: Env, **overrides: str) -> str:
    """``cdc-relay run`` must exit 1 at once; returns its one error message."""
    relay = env.start_relay(**overrides)
    try:
        code = relay.proc.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"relay did not fail closed:\n{relay.log()}") from None
    assert code == 1, relay.log()
    return _one_error(relay.log())


def _cli_fails(env: Env, *args: str, code: int = 1, **overrides: str) -> str:
    """A CLI command must exit ``code`` with one ``cdc-relay: ...`` line on stderr."""
    out = env.cli(*args, env=env.relay_env(**overrides))
    assert out.returncode == code, (out.stdout, out.stderr)
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("cdc-relay: "), out.stderr
    return lines[0]


def _cli_ok(env: Env, *args: str, **overrides: str) -> str:
    out = env.cli(*args, env=env.relay_env(**overrides))
    assert out.returncode == 0, (out.stdout, out.stderr)
    return out.stdout


def _scalar(conn: psycopg.Connection[tuple[Any, ...]], query: str, *params: object) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def _slot(env: Env) -> tuple[str, str, str] | None:
    """(plugin, database, wal_status) of the test's slot, looked up cluster-wide."""
    with env.sql() as conn:
        row = conn.execute(
            "SELECT s.plugin, d.datname, s.wal_status FROM pg_replication_slots s "
            "LEFT JOIN pg_database d ON d.oid = s.datoid WHERE s.slot_name = %s",
            (env.name,),
        ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]), str(row[2]))


def _publications(env: Env) -> list[str]:
    with env.sql() as conn:
        return [str(r[0]) for r in conn.execute("SELECT pubname FROM pg_publication").fetchall()]


def _outbox_and_publication(env: Env) -> None:
    """Table and publication as `init` would make them, without touching the slot."""
    with env.sql() as conn:
        conn.execute(outbox_ddl().encode())
        conn.execute(
            f"CREATE PUBLICATION {env.name} FOR TABLE public.outbox "
            "WITH (publish = 'insert, truncate')"
        )


# -- wal_level -------------------------------------------------------------------------------------
def test_wal_level_replica_fails_closed(rabbit: RabbitSandbox, tmp_path: Path) -> None:
    server = PostgresSandbox(
        tmp_path / "pg-replica", settings={**PG_SETTINGS, "wal_level": "replica"}
    )
    env = Env(
        pg=server,
        rabbit=rabbit,
        name="t_wal_level",
        dbname="postgres",
        dsn=server.url,
        exchange="ex.t_wal_level",
        queue="q.t_wal_level",
        tmp=tmp_path,
    )
    try:
        server.start()
        with env.sql() as conn:
            conn.execute(outbox_ddl().encode())
        for text in (_run_fails(env), _cli_fails(env, "init", "--create-outbox")):
            assert "wal_level is replica, not logical" in text
            assert "wal_level = logical" in text
            assert "restart PostgreSQL" in text
        with env.sql() as conn:
            assert _scalar(conn, "SELECT count(*) FROM pg_replication_slots") == 0
            assert _scalar(conn, "SELECT count(*) FROM pg_publication") == 0
    finally:
        for relay in env.relays:
            relay.close()
        server.destroy()


# -- the slot --------------------------------------------------------------------------------------
def test_slot_with_another_plugin_is_refused(env: Env) -> None:
    with env.sql() as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (env.name,))
    line = _cli_fails(env, "init", "--create-outbox")
    # refused before anything was created
    with env.sql() as conn:
        assert _scalar(conn, "SELECT to_regclass('public.outbox')") is None
    assert _publications(env) == []
    _outbox_and_publication(env)
    for text in (line, _run_fails(env), _run_fails(env, create_slot="true")):
        assert f"slot {env.name} uses plugin test_decoding, not pgoutput" in text
        assert "set slot to another name" in text
        assert f"SELECT pg_drop_replication_slot('{env.name}')" in text
    assert _slot(env) == ("test_decoding", env.dbname, "reserved")
    dropped = _cli_fails(env, "drop", "--yes")
    assert "not dropping it" in dropped
    assert _slot(env) is not None


def test_slot_in_another_database_is_refused(env: Env) -> None:
    with psycopg.connect(env.pg.url, autocommit=True) as other_db:
        other_db.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (env.name,))
    line = _cli_fails(env, "init", "--create-outbox")
    assert _publications(env) == []
    _outbox_and_publication(env)
    for text in (line, _run_fails(env), _run_fails(env, create_slot="true")):
        assert f"slot {env.name} belongs to database postgres" in text
        assert f"pg_dsn connects to database {env.dbname}" in text
        assert "point pg_dsn at postgres, or set slot to another name" in text
    assert "not dropping it" in _cli_fails(env, "drop", "--yes")
    assert _slot(env) == ("pgoutput", "postgres", "reserved")


def test_lost_slot_fails_closed_and_is_never_recreated(env: Env) -> None:
    env.init()
    env.invalidate_slot()
    status = json.loads(_cli_ok(env, "status", "--json"))
    assert status["exists"] is True
    assert status["wal_status"] == "lost"
    for text in (
        _run_fails(env),
        _run_fails(env, create_slot="true"),
        _cli_fails(env, "init", "--create-outbox"),
    ):
        assert f"slot {env.name} is invalidated (wal_status = lost)" in text
        assert "Recover with `cdc-relay recover --since TIMESTAMP`" in text
        assert "Suggested: --since " in text
        assert "never recreates the slot on its own" in text
    # still there, still lost: nothing recreated or advanced it
    assert _slot(env) == ("pgoutput", env.dbname, "lost")
    # the fix the message gives works
    out = _cli_ok(env, "recover", "--since", "1h")
    assert f"dropped invalidated slot {env.name}" in out
    assert f"created slot {env.name} at " in out and "with an exported snapshot" in out
    assert _slot(env) == ("pgoutput", env.dbname, "reserved")


def test_vanished_slot_is_never_recreated_by_run(env: Env) -> None:
    """A slot `init` created and that is gone now (dropped, failover, restore) is refused by
    `run` even with create_slot = true: a new slot would skip every event in between."""
    env.init()
    with env.sql() as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (env.name,))
    for text in (_run_fails(env, create_slot="true"), _run_fails(env)):
        assert f"replication slot {env.name} existed and is gone" in text
        assert "Recover with `cdc-relay recover --since TIMESTAMP`" in text
        assert "Suggested: --since " in text
    assert _slot(env) is None
    # the operator's deliberate act creates it, and says what it replaced
    out = _cli_ok(env, "init")
    assert f"created slot {env.name} at " in out
    assert "replacing the one recorded at" in out
    assert _slot(env) == ("pgoutput", env.dbname, "reserved")


def test_two_phase_slot_fails_closed(env: Env) -> None:
    with env.sql() as conn:
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput', false, true)", (env.name,)
        )
    line = _cli_fails(env, "init", "--create-outbox")
    assert _publications(env) == []
    _outbox_and_publication(env)
    for text in (line, _run_fails(env), _run_fails(env, create_slot="true")):
        assert f"slot {env.name} was created with two_phase = true" in text
        assert f"SELECT pg_drop_replication_slot('{env.name}')" in text


def test_sql_ascii_database_fails_closed(env: Env) -> None:
    with psycopg.connect(env.pg.url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{env.dbname}" WITH (FORCE)'.encode())
        conn.execute(
            f"CREATE DATABASE \"{env.dbname}\" ENCODING 'SQL_ASCII' LC_COLLATE 'C' "
            "LC_CTYPE 'C' TEMPLATE template0".encode()
        )
    line = _cli_fails(env, "init", "--create-outbox")
    assert _slot(env) is None
    with env.sql() as conn:
        assert _scalar(conn, "SELECT to_regclass('public.outbox')") is None
    _outbox_and_publication(env)
    for text in (line, _run_fails(env), _run_fails(env, create_slot="true")):
        assert "the database's encoding is SQL_ASCII" in text
        assert "cannot convert to UTF-8" in text
    assert _slot(env) is None


def test_busy_slot_waits_as_standby_and_takes_over(env: Env) -> None:
    env.init()
    holder = subprocess.Popen(
        [
            str(PG_BIN / "pg_recvlogical"),
            "-d",
            env.dsn,
            "--slot",
            env.name,
            "--start",
            "--no-loop",
            "-o",
            "proto_version=1",
            "-o",
            f"publication_names={env.name}",
            "-f",
            "/dev/null",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        pid: list[int] = []

        def held() -> bool:
            assert holder.poll() is None, holder.stderr.read() if holder.stderr else ""
            with env.sql() as conn:
                found = _scalar(
                    conn,
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s AND active",
                    env.name,
                )
            if found is not None:
                pid.append(int(found))
            return found is not None

        env.wait_for(held, timeout=15, what="pg_recvlogical to hold the slot")
        relay = env.start_relay()

        def standby_logged() -> bool:
            return f"pid {pid[0]}" in relay.log()

        env.wait_for(standby_logged, timeout=15, what="the relay to report the busy slot")
        assert relay.proc.poll() is None, "a busy slot must not stop the relay"
        log = relay.log()
        assert "Traceback" not in log
        waits = [json.loads(line) for line in log.splitlines() if f"pid {pid[0]}" in line]
        assert waits
        for record in waits:
            assert record["level"] == "warning"
            assert "standby" in record["error"]
            assert f"slot {env.name} is active in another connection" in record["error"]
        assert '"msg": "streaming"' not in log

        holder.terminate()
        holder.wait(10)
        relay.wait_streaming(timeout=30)
        row = outbox_row("A-1", 1)
        with env.sql() as conn:
            insert_events(conn, [row])
        got = env.consume(1, timeout=30)
        assert [d.message_id for d in got] == [row[0]]
        assert relay.terminate() == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


# -- the publication -------------------------------------------------------------------------------
def test_missing_publication_fails_closed(env: Env) -> None:
    env.init()
    with env.sql() as conn:
        conn.execute(f"DROP PUBLICATION {env.name}")
    text = _run_fails(env)
    assert f"publication {env.name} does not exist" in text
    assert "run `cdc-relay init`" in text
    assert f"created publication {env.name}" in _cli_ok(env, "init")


def test_publication_without_the_outbox_fails_closed(env: Env) -> None:
    env.init()
    with env.sql() as conn:
        conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
        conn.execute(f"ALTER PUBLICATION {env.name} SET TABLE public.other")
    texts = [_run_fails(env), _cli_fails(env, "init")]
    for text in texts:
        assert f"publication {env.name} does not include public.outbox" in text
        assert f'ALTER PUBLICATION "{env.name}" ADD TABLE "public"."outbox"' in text
    # the hint is SQL that can be pasted as-is
    hint = re.search(r"ALTER PUBLICATION \S+ ADD TABLE \S+", texts[0])
    assert hint is not None
    with env.sql() as conn:
        conn.execute(hint.group(0).encode())
    assert "nothing to do" in _cli_ok(env, "init")


def test_publication_for_all_tables_fails_closed(env: Env) -> None:
    env.init()
    with env.sql() as conn:
        conn.execute(f"DROP PUBLICATION {env.name}")
        conn.execute(f"CREATE PUBLICATION {env.name} FOR ALL TABLES")
    for text in (_run_fails(env), _cli_fails(env, "init")):
        assert f"publication {env.name} is FOR ALL TABLES" in text
        assert f'DROP PUBLICATION "{env.name}", then run `cdc-relay init`' in text
    with env.sql() as conn:
        assert _scalar(conn, "SELECT puballtables FROM pg_publication WHERE pubname = %s", env.name)


def test_publication_row_filter_or_column_list_fails_closed(env: Env) -> None:
    env.init()
    fix = f'ALTER PUBLICATION "{env.name}" SET TABLE "public"."outbox"'
    with env.sql() as conn:
        conn.execute(f"ALTER PUBLICATION {env.name} SET TABLE outbox WHERE (type <> 'Secret')")
    text = _run_fails(env)
    assert f"publication {env.name} filters the rows of public.outbox" in text
    assert fix in text
    with env.sql() as conn:
        conn.execute(
            f"ALTER PUBLICATION {env.name} SET TABLE outbox "
            "(id, aggregatetype, aggregateid, type, payload)"
        )
    text = _run_fails(env)
    assert "leaves out created_at, headers, traceparent" in text
    assert fix in text
    with env.sql() as conn:
        conn.execute(fix.encode())
    assert "nothing to do" in _cli_ok(env, "init")


def test_partitioned_outbox_needs_publish_via_partition_root(env: Env) -> None:
    with env.sql() as conn:
        conn.execute(
            "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, "
            "aggregateid text NOT NULL, type text NOT NULL, payload jsonb) PARTITION BY HASH (id)"
        )
        for r in range(2):
            conn.execute(
                f"CREATE TABLE outbox_{r} PARTITION OF outbox "
                f"FOR VALUES WITH (MODULUS 2, REMAINDER {r})"
            )
    env.init()  # creates the publication with publish_via_partition_root
    relay = env.start_relay()
    relay.wait_streaming()
    rows = [outbox_row(f"P-{i}", i) for i in range(6)]
    with env.sql() as conn:
        insert_events(conn, rows)
    got = env.consume(len(rows), timeout=30)
    assert sorted(d.message_id for d in got) == sorted(r[0] for r in rows)
    assert relay.terminate() == 0

    with env.sql() as conn:
        conn.execute(f"DROP PUBLICATION {env.name}")
        conn.execute(f"CREATE PUBLICATION {env.name} FOR TABLE outbox")
    text = _run_fails(env)
    assert "outbox table public.outbox is partitioned" in text
    assert f'ALTER PUBLICATION "{env.name}" SET (publish_via_partition_root = true)' in text


# -- the outbox table ------------------------------------------------------------------------------
def test_missing_outbox_table_fails_closed(env: Env) -> None:
    text = _run_fails(env)
    assert "outbox table public.outbox does not exist" in text
    assert "run `cdc-relay init --create-outbox`" in text
    text = _run_fails(env, outbox_table="app.events")
    assert "outbox table app.events does not exist" in text
    with env.sql() as conn:
        conn.execute(
            "CREATE VIEW outbox AS SELECT gen_random_uuid() AS id, 'a' AS aggregatetype, "
            "'b' AS aggregateid, 'c' AS type, '{}'::jsonb AS payload"
        )
    text = _run_fails(env)
    assert "outbox table public.outbox is a view, not a table" in text
    assert "set outbox_table" in text


def test_outbox_without_a_required_column_names_the_setting(env: Env) -> None:
    with env.sql() as conn:
        conn.execute(
            "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, "
            "aggregateid text NOT NULL, event_type text NOT NULL, payload jsonb)"
        )
    refused = _cli_fails(env, "init")
    # nothing was created for a table the relay cannot use
    assert _publications(env) == []
    assert _slot(env) is None
    for text in (refused, _run_fails(env)):
        assert "outbox table public.outbox has no column 'type' (setting column_type)" in text
        assert "add the column, or set the column_* setting" in text
    _cli_ok(env, "init", column_type="event_type")
    env.bind_queue()
    relay = env.start_relay(column_type="event_type")
    relay.wait_streaming()
    assert relay.terminate() == 0


# -- names (issue item 8) --------------------------------------------------------------------------
def _catalog_snapshot(env: Env) -> tuple[Any, ...]:
    with env.sql() as conn:
        slots = conn.execute(
            "SELECT slot_name, plugin, confirmed_flush_lsn FROM pg_replication_slots ORDER BY 1"
        ).fetchall()
        pubs = conn.execute(
            "SELECT pubname, schemaname, tablename FROM pg_publication_tables ORDER BY 1, 2, 3"
        ).fetchall()
        tables = conn.execute(
            "SELECT schemaname, tablename FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
        ).fetchall()
        rows = _scalar(conn, "SELECT count(*) FROM outbox")
        databases = conn.execute("SELECT datname FROM pg_database ORDER BY 1").fetchall()
    return slots, pubs, tables, rows, databases


def test_hostile_names_are_rejected_before_any_sql(env: Env) -> None:
    env.init()
    with env.sql() as conn:
        insert_events(conn, [outbox_row("A-1", 1)])
    before = _catalog_snapshot(env)
    cases: list[tuple[str, str]] = [
        *((key, value) for key in ("slot", "publication") for value in [*HOSTILE, "Cdc_Relay"]),
        *(("outbox_table", value) for value in HOSTILE),
        ("outbox_table", 'public.x"; DROP TABLE outbox; --'),
        ("outbox_table", "public." + "o" * 64),
        *((f"column_{key}", value) for key in ("id", "type", "payload") for value in HOSTILE),
    ]
    commands = [("init", "--create-outbox"), ("drop", "--yes"), ("run",), ("status",)]

    def attempt(i: int) -> tuple[str, str, tuple[str, ...], str]:
        key, value = cases[i]
        command = commands[i % len(commands)]
        # every setting is also tried with the command that creates things
        line = _cli_fails(env, *command, code=2, **{key: value})
        if command[0] != "init":
            line = _cli_fails(env, "init", "--create-outbox", code=2, **{key: value})
        return key, value, command, line

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(attempt, range(len(cases))))
    for key, value, command, line in results:
        assert line.startswith(f"cdc-relay: setting {key}: "), (key, value, command, line)
        assert (
            "not a valid name: use 1-63 of a-z, 0-9 and _ only" in line
            or "is not a plain SQL identifier" in line
        ), line
    assert _catalog_snapshot(env) == before


def test_unusual_valid_names_are_quoted_everywhere(env: Env) -> None:
    """Mixed case, ``$`` and reserved words are valid names; they only work if quoted."""
    names = {
        "outbox_table": "Sales$.Outbox_Events",
        "publication": "table",  # a reserved word
        "column_id": "EventId",
        "column_aggregate_type": "select",  # a reserved word
        "column_type": "Kind",
    }
    with env.sql() as conn:
        conn.execute('CREATE SCHEMA "Sales$"')
    out = _cli_ok(env, "init", "--create-outbox", **names)
    assert "created table Sales$.Outbox_Events" in out
    assert "created publication table" in out
    with env.sql() as conn:
        columns = {
            str(r[0])
            for r in conn.execute(
                "SELECT attname FROM pg_attribute "
                'WHERE attrelid = \'"Sales$"."Outbox_Events"\'::regclass AND attnum > 0'
            ).fetchall()
        }
        published = conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = 'table'"
        ).fetchall()
    assert {"EventId", "select", "aggregateid", "Kind", "payload"} <= columns
    assert published == [("Sales$", "Outbox_Events")]
    assert "nothing to do" in _cli_ok(env, "init", "--create-outbox", **names)

    env.bind_queue()
    relay = env.start_relay(**names)
    relay.wait_streaming()
    event_id = outbox_row("X-1", 1)[0]
    with env.sql() as conn:
        conn.execute(
            'INSERT INTO "Sales$"."Outbox_Events" ("EventId", "select", aggregateid, "Kind", '
            "payload) VALUES (%s, 'order', 'X-1', 'Placed', '{\"n\": 1}')",
            (event_id,),
        )
    got = env.consume(1, timeout=30)
    assert [d.message_id for d in got] == [event_id]
    assert got[0].body["aggregate_type"] == "order"
    assert got[0].body["type"] == "Placed"
    assert relay.terminate() == 0
    out = _cli_ok(env, "drop", "--yes", **names)
    assert "dropped publication table" in out
    assert _publications(env) == []
