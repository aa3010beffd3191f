"""Secrets from files (CDC_RELAY_<KEY>_FILE), and the passwords appear nowhere: not in what
`--help`, `init`, `status`, `run` and a failing start print, not in a span, not in /metrics."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.integration.harness import REPO, Env, OtlpReceiver, Relay, insert_events, outbox_row

pytestmark = pytest.mark.integration

PG_SECRET = "pg-S3cret@x:y/z'q"
MQ_SECRET = "mq-S3cret@x:y/z"


@pytest.fixture
def secrets(env: Env) -> Iterator[dict[str, str]]:
    """A PostgreSQL role and a RabbitMQ user with hostile passwords, given to the relay only
    through files."""
    role = f"s_{env.name[-20:]}"
    with env.sql() as conn:
        literal = PG_SECRET.replace("'", "''")
        conn.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{literal}'".encode())
    env.rabbit.ctl("add_user", role, MQ_SECRET)
    env.rabbit.ctl("set_permissions", "-p", "/", role, ".*", ".*", ".*")
    dsn_file = env.tmp / "pg_dsn"
    escaped = PG_SECRET.replace("\\", "\\\\").replace("'", "\\'")
    dsn_file.write_text(
        f"host=127.0.0.1 port={env.pg.port} dbname={env.dbname} user={role} password='{escaped}'\n"
    )
    url_file = env.tmp / "amqp_url"
    url_file.write_text(
        f"amqp://{role}:{quote(MQ_SECRET, safe='')}@127.0.0.1:{env.rabbit.port}/%2F\n"
    )
    base = env.relay_env()
    del base["CDC_RELAY_PG_DSN"], base["CDC_RELAY_AMQP_URL"]
    base["CDC_RELAY_PG_DSN_FILE"] = str(dsn_file)
    base["CDC_RELAY_AMQP_URL_FILE"] = str(url_file)
    try:
        yield base
    finally:
        with env.sql() as conn:
            conn.execute(f"DROP OWNED BY {role}".encode())
            conn.execute(f"DROP ROLE IF EXISTS {role}".encode())
        env.rabbit.ctl("delete_user", role)


def _leaks(text: str | bytes) -> list[str]:
    """Which forms of either password occur in ``text``."""
    forms = {PG_SECRET, MQ_SECRET, quote(MQ_SECRET, safe=""), "S3cret"}
    data = text if isinstance(text, bytes) else text.encode()
    return [f for f in forms if f.encode() in data]


def test_passwords_from_files_work_and_appear_nowhere(env: Env, secrets: dict[str, str]) -> None:
    printed: list[str] = []
    for args in (("--help",), ("run", "--help"), ("init", "--create-outbox"), ("status",)):
        out = env.cli(*args, env=secrets)
        assert out.returncode == 0, out.stderr
        printed.append(out.stdout + out.stderr)
    out = env.cli("status", "--json", env=secrets)
    assert out.returncode == 0 and '"exists": true' in out.stdout
    printed.append(out.stdout + out.stderr)
    env.bind_queue()

    otlp = OtlpReceiver()
    run_env = {
        **secrets,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    relay = Relay(env, run_env, len(env.relays))
    env.relays.append(relay)
    try:
        relay.wait_streaming()
        with env.sql() as conn:
            insert_events(conn, [outbox_row("SECRET", i) for i in range(5)])
        assert len(env.consume(5, timeout=30)) == 5
        port = relay.http_port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        assert "cdc_relay_" in metrics
        env.wait_for(lambda: len(otlp.bodies) > 0, timeout=20, what="spans exported")
    finally:
        code = relay.terminate()
        otlp.close()
    assert code == 0, relay.log()[-2000:]
    printed.append(relay.log())

    # failing starts: a database that does not exist, a vhost that does not exist
    bad_db = Path(secrets["CDC_RELAY_PG_DSN_FILE"]).read_text().replace(env.dbname, "no_such_db")
    bad_dsn = env.tmp / "bad_dsn"
    bad_dsn.write_text(bad_db)
    failed = env.cli("run", env={**secrets, "CDC_RELAY_PG_DSN_FILE": str(bad_dsn)})
    assert failed.returncode == 1 and "no_such_db" in failed.stderr
    printed.append(failed.stdout + failed.stderr)
    bad_vhost = env.tmp / "bad_url"
    bad_vhost.write_text(
        Path(secrets["CDC_RELAY_AMQP_URL_FILE"]).read_text().replace("%2F", "nope")
    )
    refused = subprocess.Popen(
        [sys.executable, "-m", "cdc_relay.cli", "run"],
        env={**secrets, "CDC_RELAY_AMQP_URL_FILE": str(bad_vhost)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    time.sleep(5)
    refused.terminate()
    printed.append("".join(refused.communicate(timeout=60)))
    assert "RabbitMQ" in printed[-1]

    for text in printed:
        assert _leaks(text) == [], text[-3000:]
    assert _leaks(metrics) == []
    for body in otlp.bodies:
        assert _leaks(body) == []


def test_a_setting_and_its_file_together_are_refused(env: Env) -> None:
    secret = env.tmp / "slot"
    secret.write_text("from_file\n")
    both = env.relay_env(slot_file=str(secret))
    out = env.cli("status", env=both)
    assert out.returncode == 2
    assert "both CDC_RELAY_SLOT and CDC_RELAY_SLOT_FILE are set: keep one" in out.stderr
    alone = env.relay_env(slot_file=str(secret))
    del alone["CDC_RELAY_SLOT"]
    out = env.cli("status", env=alone)
    assert "from_file" in out.stdout, "the trailing newline is dropped, the value used"
    missing = env.relay_env(pg_dsn_file=str(env.tmp / "absent"))
    del missing["CDC_RELAY_PG_DSN"]
    out = env.cli("status", env=missing)
    assert out.returncode == 2
    assert f"CDC_RELAY_PG_DSN_FILE: cannot read {env.tmp / 'absent'}" in out.stderr
