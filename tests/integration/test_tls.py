"""TLS on both sides against real servers: a throwaway CA, a PostgreSQL and a RabbitMQ node with
TLS listeners, client certificates for both (PostgreSQL ``cert`` authentication, RabbitMQ
EXTERNAL), and the ways TLS goes wrong, each of which must stop the relay with one line that
names the side and the reason, exit 1, without a retry storm and without printing a secret."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from cdc_relay import catalog
from tests.integration.harness import REPO, dsn_for, insert_events, outbox_row
from tests.sandbox import PG_PASSWORD, PostgresSandbox, RabbitSandbox, free_port
from tests.tls import Authority, make_authority

pytestmark = pytest.mark.integration

ROLE = "cdc_relay"  # the certificates' CN: sql/relay_role.sql's role, and the RabbitMQ user
RABBIT_PASSWORD = "mq-Secret-p@ss:w/rd"  # unencoded '@', ':' and '/' must never leak


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return make_authority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_pg(pki: Authority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresSandbox]:
    root = tmp_path_factory.mktemp("tls-pg")
    server = PostgresSandbox(root / "postgres")
    server.init()
    certs = server.data / "certs"
    certs.mkdir(exist_ok=True)
    for name, source in (
        ("server.crt", pki.server.cert),
        ("server.key", pki.server.key),
        ("ca.crt", pki.ca),
    ):
        target = certs / name
        target.write_bytes(source.read_bytes())
        target.chmod(0o600)
        server.chown(target)
    server.chown(certs)
    hba = server.data / "pg_hba.conf"
    # the relay's role may only come in over TLS with a certificate of the test CA
    hba.write_text(
        f"hostssl all {ROLE} 127.0.0.1/32 cert\nhost all {ROLE} 127.0.0.1/32 reject\n"
        + hba.read_text()
    )
    server.settings.update(
        ssl="on",
        ssl_cert_file=str(certs / "server.crt"),
        ssl_key_file=str(certs / "server.key"),
        ssl_ca_file=str(certs / "ca.crt"),
    )
    server.start()
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE app")
    with psycopg.connect(dsn_for(server, "app"), autocommit=True) as conn:
        conn.execute(catalog.outbox_ddl().encode())
        # least privilege, as the README tells: log in, replicate, read the outbox; owns nothing
        conn.execute((REPO / "sql" / "relay_role.sql").read_bytes())
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def tls_rabbit(pki: Authority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitSandbox]:
    root = tmp_path_factory.mktemp("tls-rabbit")
    tls_port = free_port()
    server = RabbitSandbox(
        root / "rabbitmq",
        plugins=["rabbitmq_auth_mechanism_ssl"],
        extra_conf={
            "listeners.ssl.default": f"127.0.0.1:{tls_port}",
            "ssl_options.cacertfile": str(pki.ca),
            "ssl_options.certfile": str(pki.server.cert),
            "ssl_options.keyfile": str(pki.server.key),
            "ssl_options.verify": "verify_peer",
            "ssl_options.fail_if_no_peer_cert": "true",
            "auth_mechanisms.1": "PLAIN",
            "auth_mechanisms.2": "EXTERNAL",
            "ssl_cert_login_from": "common_name",
        },
    )
    server.tls_port = tls_port
    server.start()
    server.ctl("add_user", ROLE, RABBIT_PASSWORD)
    server.ctl(
        "set_permissions",
        "-p",
        "/",
        ROLE,
        "^tls(\\.unroutable)?$",
        "^tls(\\.unroutable)?$",
        "^tls(\\.unroutable)?$",
    )
    try:
        yield server
    finally:
        server.destroy()


def _path(p: Path) -> str:
    return quote(str(p), safe="/")


def pg_dsn(server: PostgresSandbox, pki: Authority, **override: str) -> str:
    params = {
        "host": "localhost",
        "hostaddr": "127.0.0.1",
        "port": str(server.port),
        "dbname": "app",
        "user": ROLE,
        "sslmode": "verify-full",
        "sslrootcert": str(pki.ca),
        "sslcert": str(pki.client.cert),
        "sslkey": str(pki.client.key),
    }
    params.update(override)
    return " ".join(f"{k}={v}" for k, v in params.items() if v)


def amqp_url(server: RabbitSandbox, pki: Authority, **override: str) -> str:
    params = {
        "cacertfile": _path(pki.ca),
        "certfile": _path(pki.client.cert),
        "keyfile": _path(pki.client.key),
        "auth_mechanism": "external",
    }
    params.update(override)
    query = "&".join(f"{k}={v}" for k, v in params.items() if v)
    return f"amqps://localhost:{server.tls_port}/%2F?{query}"


def relay_env(
    pg_server: PostgresSandbox, mq: RabbitSandbox, pki: Authority, **extra: str
) -> dict[str, str]:
    env = {
        "CDC_RELAY_PG_DSN": pg_dsn(pg_server, pki),
        "CDC_RELAY_AMQP_URL": amqp_url(mq, pki),
        "CDC_RELAY_EXCHANGE": "tls",
        "CDC_RELAY_HTTP_ADDRESS": "127.0.0.1:0",
        "CDC_RELAY_STATUS_INTERVAL": "1",
        "CDC_RELAY_RECONNECT_MIN": "0.2",
        "CDC_RELAY_RECONNECT_MAX": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": "/usr/bin:/bin",
    }
    env.update({f"CDC_RELAY_{k.upper()}": v for k, v in extra.items()})
    return env


def run_until_streaming(env: dict[str, str], timeout: float = 60) -> str:
    """Start `run`, stop it with SIGTERM once it streams; its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdc_relay.cli", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        lines.append(line)
        if '"msg": "streaming"' in line or time.monotonic() > deadline:
            break
    proc.terminate()
    rest, _ = proc.communicate(timeout=60)
    return "".join(lines) + (rest or "")


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_relay.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


@pytest.fixture(scope="module")
def ready(tls_pg: PostgresSandbox, tls_rabbit: RabbitSandbox, pki: Authority) -> dict[str, str]:
    """The slot, created by the least-privileged role over TLS with its certificate."""
    env = relay_env(tls_pg, tls_rabbit, pki)
    out = cli(env, "init")
    assert out.returncode == 0, out.stderr
    assert "created slot cdc_relay" in out.stdout
    return env


def _records(stderr: str) -> list[dict[str, object]]:
    out = []
    for line in stderr.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _fails_once(env: dict[str, str], side: str, *reasons: str, retries: int = 0) -> str:
    """`run` must stop at once: exit 1, one error record naming the side and the reason, no
    more than ``retries`` retries, no secret; returns the error text."""
    started = time.monotonic()
    try:
        out = cli(env, "run", timeout=45)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else str(exc.stderr)
        raise AssertionError(f"still running after 45 s:\n{err[-3000:]}") from None
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    assert time.monotonic() - started < 30, "it should stop at once, not after retries"
    records = _records(out.stderr)
    errors = [r for r in records if r.get("level") == "error"]
    assert len(errors) == 1, out.stderr[-2000:]
    retried = [r for r in records if "retrying" in str(r.get("msg"))]
    assert len(retried) <= retries, out.stderr[-2000:]
    text = str(errors[0]["msg"])
    assert side in text, text
    assert any(re.search(reason, text, re.IGNORECASE) for reason in reasons), text
    assert RABBIT_PASSWORD not in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
    return text


def test_the_whole_pipeline_runs_over_tls_on_both_sides_with_client_certificates(
    tls_pg: PostgresSandbox, tls_rabbit: RabbitSandbox, pki: Authority, ready: dict[str, str]
) -> None:
    """PostgreSQL: verify-full, `cert` authentication, a role that only logs in, replicates and
    reads the outbox. RabbitMQ: amqps with the test CA, EXTERNAL login by certificate, a user
    whose permissions cover only the relay's exchanges."""
    import pika

    plain = pika.BlockingConnection(pika.URLParameters(tls_rabbit.amqp_url))
    channel = plain.channel()
    channel.exchange_declare(
        "tls", "topic", durable=True, arguments={"alternate-exchange": "tls.unroutable"}
    )
    channel.queue_declare("tls.events", durable=True)
    channel.queue_bind("tls.events", "tls", "#")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdc_relay.cli", "run"],
        env=ready,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        ids: list[str] = []
        with psycopg.connect(dsn_for(tls_pg, "app"), autocommit=True) as conn:
            for i in range(20):
                rows = [outbox_row(f"TLS-{i % 4}", i // 4)]
                insert_events(conn, rows)
                ids += [r[0] for r in rows]
        got: list[str] = []
        deadline = time.monotonic() + 60
        while len(got) < len(ids) and time.monotonic() < deadline:
            method, props, _body = channel.basic_get("tls.events", auto_ack=True)
            if method is None:
                time.sleep(0.1)
                continue
            got.append(props.message_id)
        assert sorted(got) == sorted(ids)
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=60)
        plain.close()
    assert proc.returncode == 0, err[-2000:]
    assert RABBIT_PASSWORD not in err
    records = _records(err)
    assert any("amqps://localhost" in str(r.get("broker", "")) for r in records), err[-2000:]
    assert not [r for r in records if r.get("level") == "error"], err[-2000:]


@pytest.mark.parametrize(
    ("override", "reasons"),
    [
        ({"sslrootcert": "OTHER_CA"}, ("certificate verify failed",)),
        ({"host": "elsewhere.invalid"}, ("does not match host name",)),
        ({"sslcert": "EXPIRED", "sslkey": "EXPIRED_KEY"}, ("certificate expired", "expired")),
        ({"sslcert": "", "sslkey": ""}, ("certificate",)),
    ],
    ids=["wrong-ca", "wrong-hostname", "expired-client-cert", "no-client-cert"],
)
def test_tls_failures_to_postgresql_stop_with_one_clear_line(
    tls_pg: PostgresSandbox,
    tls_rabbit: RabbitSandbox,
    pki: Authority,
    ready: dict[str, str],
    override: dict[str, str],
    reasons: tuple[str, ...],
) -> None:
    files = {
        "OTHER_CA": str(pki.other_ca),
        "EXPIRED": str(pki.client_expired.cert),
        "EXPIRED_KEY": str(pki.client_expired.key),
    }
    resolved = {k: files.get(v, v) for k, v in override.items()}
    if override.get("sslcert") == "":
        # libpq would still pick up ~/.postgresql/postgresql.crt; point it at nothing
        resolved = {"sslcert": str(pki.root / "absent.crt"), "sslkey": str(pki.root / "absent.key")}
    env = {**ready, "CDC_RELAY_PG_DSN": pg_dsn(tls_pg, pki, **resolved)}
    text = _fails_once(env, "PostgreSQL", *reasons)
    assert "TLS" in text


@pytest.mark.parametrize(
    ("override", "reasons"),
    [
        ({"cacertfile": "OTHER_CA"}, ("certificate verify failed",)),
        ({"server_name_indication": "elsewhere.invalid"}, ("hostname", "match")),
        ({"certfile": "EXPIRED", "keyfile": "EXPIRED_KEY"}, ("expired",)),
        (
            {"certfile": "", "keyfile": "", "auth_mechanism": ""},
            ("certificate required", "handshake", "certificate"),
        ),
        ({"certfile": "FOREIGN", "keyfile": "FOREIGN_KEY"}, ("unknown ca", "certificate")),
    ],
    ids=[
        "wrong-ca",
        "wrong-hostname",
        "expired-client-cert",
        "no-client-cert",
        "foreign-client-cert",
    ],
)
def test_tls_failures_to_rabbitmq_stop_with_one_clear_line(
    tls_pg: PostgresSandbox,
    tls_rabbit: RabbitSandbox,
    pki: Authority,
    ready: dict[str, str],
    override: dict[str, str],
    reasons: tuple[str, ...],
) -> None:
    files = {
        "OTHER_CA": _path(pki.other_ca),
        "EXPIRED": _path(pki.client_expired.cert),
        "EXPIRED_KEY": _path(pki.client_expired.key),
        "FOREIGN": _path(pki.client_foreign.cert),
        "FOREIGN_KEY": _path(pki.client_foreign.key),
    }
    resolved = {k: files.get(v, v) for k, v in override.items()}
    url = amqp_url(tls_rabbit, pki, **resolved)
    if override.get("certfile") == "":
        # no certificate: log in with the password instead (the server still demands one)
        url = url.replace("amqps://", f"amqps://{ROLE}:{quote(RABBIT_PASSWORD, safe='')}@")
    env = {**ready, "CDC_RELAY_AMQP_URL": url}
    # With TLS 1.3 the client's handshake is over before the broker checks the client's
    # certificate; the broker's alert then races its close, and an attempt may see a bare EOF
    # (retried, the warning saying so) before one sees the alert and stops. Not a storm.
    client_side = "certfile" in override
    text = _fails_once(env, "RabbitMQ", *reasons, retries=3 if client_side else 0)
    assert "TLS" in text


def test_plain_amqp_to_a_tls_port_says_what_is_wrong(
    tls_pg: PostgresSandbox, tls_rabbit: RabbitSandbox, pki: Authority, ready: dict[str, str]
) -> None:
    url = f"amqp://{ROLE}:{quote(RABBIT_PASSWORD, safe='')}@localhost:{tls_rabbit.tls_port}/%2F"
    # a port that cuts the AMQP header may be a broker restarting: retried, with backoff
    env = {**ready, "CDC_RELAY_AMQP_URL": url, "CDC_RELAY_RECONNECT_MIN": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdc_relay.cli", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    time.sleep(8)
    proc.terminate()
    _out, err = proc.communicate(timeout=60)
    warnings = [r for r in _records(err) if r.get("level") in ("warning", "error")]
    assert warnings, err[-2000:]
    assert any("amqps://" in str(r.get("error", "")) + str(r.get("msg", "")) for r in warnings), (
        err[-2000:]
    )
    assert RABBIT_PASSWORD not in err
    assert len(warnings) <= 8, "more than one attempt a second: a retry storm"


def test_key_password_and_bad_tls_settings_are_configuration_errors(
    tls_pg: PostgresSandbox, tls_rabbit: RabbitSandbox, pki: Authority, ready: dict[str, str]
) -> None:
    encrypted = {"keyfile": _path(pki.client_encrypted.key)}
    wrong = cli(
        {**ready, "CDC_RELAY_AMQP_URL": amqp_url(tls_rabbit, pki, **encrypted, password="nope")},
        "run",
    )
    assert wrong.returncode == 2, wrong.stderr
    assert "keyfile" in wrong.stderr and "nope" not in wrong.stderr
    missing = cli(
        {
            **ready,
            "CDC_RELAY_AMQP_URL": amqp_url(tls_rabbit, pki, cacertfile="/nonexistent/ca.pem"),
        },
        "run",
    )
    assert missing.returncode == 2
    assert "cacertfile /nonexistent/ca.pem: no such file" in missing.stderr
    plain_tls = cli(
        {**ready, "CDC_RELAY_AMQP_URL": "amqp://localhost/%2F?cacertfile=/x.pem"}, "run"
    )
    assert plain_tls.returncode == 2 and "use an amqps:// URL" in plain_tls.stderr


def test_the_limited_rabbitmq_user_may_not_declare_anything_else(
    tls_pg: PostgresSandbox, tls_rabbit: RabbitSandbox, pki: Authority, ready: dict[str, str]
) -> None:
    """Its permissions cover the relay's exchange and alternate exchange only (README)."""
    text = _fails_once({**ready, "CDC_RELAY_EXCHANGE": "other"}, "RabbitMQ", "refused access")
    assert "exchange 'other'" in text or "other" in text
    assert "configure" in text


def test_a_superuser_is_warned_about_and_the_least_privileged_role_is_not(
    tls_pg: PostgresSandbox, tls_rabbit: RabbitSandbox, pki: Authority, ready: dict[str, str]
) -> None:
    superuser = pg_dsn(
        tls_pg,
        pki,
        user="postgres",
        password=PG_PASSWORD,
        sslcert=str(pki.root / "absent.crt"),
        sslkey=str(pki.root / "absent.key"),
    )
    for dsn, warned in ((superuser, True), (ready["CDC_RELAY_PG_DSN"], False)):
        out = run_until_streaming({**ready, "CDC_RELAY_PG_DSN": dsn})
        records = _records(out)
        assert any(r.get("msg") == "streaming" for r in records), out[-2000:]
        said = any("runs as a superuser" in str(r.get("msg")) for r in records)
        assert said is warned, out[-2000:]
        assert PG_PASSWORD not in out
