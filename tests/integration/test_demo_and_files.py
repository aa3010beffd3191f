"""The newcomer's path and the files users copy: demo, compose, SQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdc_relay.catalog import outbox_ddl
from tests.integration.harness import REPO, Env


def test_sql_file_holds_the_ddl_init_applies() -> None:
    text = (REPO / "sql" / "outbox.sql").read_text()
    assert outbox_ddl() in text


def test_compose_file_is_complete() -> None:
    doc = yaml.safe_load((REPO / "compose" / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"postgres", "rabbitmq", "relay"} <= set(services)
    pg_cmd = " ".join(services["postgres"]["command"])
    assert "wal_level=logical" in pg_cmd
    assert "management" in services["rabbitmq"]["image"]
    relay = services["relay"]
    env = relay["environment"]
    assert env["CDC_RELAY_PG_DSN"].startswith("postgresql://")
    assert "@postgres:5432/" in env["CDC_RELAY_PG_DSN"]
    assert "@rabbitmq:5672/" in env["CDC_RELAY_AMQP_URL"]
    assert relay["stop_signal"] == "SIGTERM"
    assert set(relay["depends_on"]) == {"postgres", "rabbitmq", "jaeger"}
    jaeger = services["jaeger"]
    assert "jaeger" in jaeger["image"]
    assert any(p.endswith(":4318") for p in jaeger["ports"]), "OTLP/HTTP must be exposed"
    assert any(p.endswith(":16686") for p in jaeger["ports"]), "the UI must be exposed"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert env["CDC_RELAY_HTTP_ADDRESS"].endswith(":9187")
    dockerfile = REPO / "compose" / Path(relay["build"]["dockerfile"]).name
    assert dockerfile.exists()
    assert "cdc-relay" in dockerfile.read_text()
    mounted = services["postgres"]["volumes"][0].split(":")[0]
    assert (REPO / "compose" / mounted).resolve() == (REPO / "sql" / "outbox.sql").resolve()


@pytest.mark.integration
def test_demo_shows_events_flowing(env: Env) -> None:
    proc_env = env.relay_env()
    out = subprocess.run(
        [sys.executable, "-m", "tests.demo", "--once", "--orders", "2"],
        env=proc_env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert sum(line.startswith("received ") for line in out.stdout.splitlines()) == 6
    for kind in ("order.OrderPlaced", "inventory.InventoryReserved", "shipment.ShipmentDispatched"):
        assert kind in out.stdout
    assert "6 events received for 6 written" in out.stdout
    # the warehouse (the kit's consumer) took all six, applied the two reservations, and the
    # audit agrees with the source
    assert "warehouse took 6 events; stock reserved: SKU-CRATE-07=1, SKU-PALLET-01=2" in out.stdout
    assert "cdc-relay audit: audited" in out.stdout and ": agree" in out.stdout


def test_readme_documents_every_setting_and_the_two_commands() -> None:
    from cdc_relay.config import HELP, env_name

    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme
    assert "make test" in readme
    for key in HELP:
        assert f"`{key}`" in readme, key
        assert f"`{env_name(key)}`" in readme, key
