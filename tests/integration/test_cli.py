"""The command line as an operator meets it: help, init, status, drop, and readable failures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cdc_relay.config import HELP, env_name
from tests.integration.harness import REPO, Env
from tests.sandbox import PG_PASSWORD

pytestmark = pytest.mark.integration


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_relay.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_help_explains_every_command_and_setting() -> None:
    out = _cli("--help", env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0
    for command in ("run", "init", "status", "drop"):
        assert command in out.stdout
    for key in HELP:
        assert key in out.stdout
        assert env_name(key) in out.stdout
    run_help = _cli("run", "--help", env={"PATH": "/usr/bin:/bin"})
    assert "SIGTERM" in run_help.stdout


def test_missing_setting_is_one_line_exit_2() -> None:
    out = _cli("status", env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "pg_dsn" in out.stderr
    assert "Traceback" not in out.stderr


def test_invalid_setting_names_the_setting(env: Env) -> None:
    out = env.cli("status", env=env.relay_env(max_in_flight="lots"))
    assert out.returncode == 2
    assert "max_in_flight" in out.stderr
    assert "Traceback" not in out.stderr
    out = env.cli("status", env=env.relay_env(slot="Robert'); DROP TABLE x;--"))
    assert out.returncode == 2
    assert "slot" in out.stderr


def test_init_is_idempotent_and_status_reports_the_slot(env: Env) -> None:
    first = env.cli("init", "--create-outbox")
    assert first.returncode == 0, first.stderr
    assert "created table public.outbox" in first.stdout
    assert f"created slot {env.name}" in first.stdout
    again = env.cli("init", "--create-outbox")
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    status = env.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["slot"] == env.name
    assert data["exists"] is True
    assert data["active"] is False
    assert data["plugin"] == "pgoutput"
    assert data["database"] == env.dbname
    assert data["wal_status"] in ("reserved", "extended")
    assert data["publication_tables"] == ["public.outbox"]
    assert isinstance(data["lag_bytes"], int)
    text = env.cli("status")
    assert "confirmed_flush_lsn" in text.stdout


def test_sql_file_creates_the_same_table(env: Env) -> None:
    with env.sql() as conn:
        conn.execute((REPO / "sql" / "outbox.sql").read_text().encode())
    out = env.cli("init")
    assert out.returncode == 0, out.stderr


def test_drop_needs_yes_and_removes_slot_and_publication(env: Env) -> None:
    env.init()
    refused = env.cli("drop")
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    out = env.cli("drop", "--yes")
    assert out.returncode == 0, out.stderr
    assert f"dropped slot {env.name}" in out.stdout
    assert f"dropped publication {env.name}" in out.stdout
    with env.sql() as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (env.name,)
        ).fetchone() == (0,)
    status = env.cli("status", "--json")
    assert json.loads(status.stdout)["exists"] is False
    assert status.returncode == 1


def test_run_without_slot_fails_closed_with_a_fix(env: Env) -> None:
    with env.sql() as conn:
        from cdc_relay.catalog import outbox_ddl

        conn.execute(outbox_ddl().encode())
    relay = env.start_relay()
    code = relay.proc.wait(60)
    assert code == 1
    log = relay.log()
    assert "cdc-relay init" in log
    assert "Traceback" not in log


def test_wrong_password_is_clear_and_never_printed(env: Env) -> None:
    env.init()
    bad_dsn = env.dsn.replace(PG_PASSWORD, "hunter2-wrong")
    out = env.cli("status", env=env.relay_env(pg_dsn=bad_dsn))
    assert out.returncode == 1
    assert "password authentication failed" in out.stderr
    assert "hunter2" not in out.stderr + out.stdout
    relay = env.start_relay(pg_dsn=bad_dsn)
    assert relay.proc.wait(60) == 1, "bad credentials must not be retried forever"
    assert "hunter2" not in relay.log()
    bad_amqp = env.rabbit.amqp_url.replace("guest:guest", "guest:hunter2")
    relay = env.start_relay(amqp_url=bad_amqp)
    assert relay.proc.wait(60) == 1, relay.log()
    assert "RabbitMQ refused the credentials" in relay.log()
    assert "hunter2" not in relay.log()
