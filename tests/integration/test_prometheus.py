"""The real Prometheus server against a running relay: with the broker blocked, the shipped
propagation alert fires (a test copy of alerts.yml with short `for` clauses and a 1 s
evaluation interval; the shipped file keeps production values)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.harness import REPO, Env, insert_events, outbox_row
from tests.sandbox import free_port

pytestmark = pytest.mark.integration

RULES = REPO / "compose" / "prometheus" / "alerts.yml"


class Prometheus:
    def __init__(self, root: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: `make test` installs Debian's prometheus package"
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "2s"
        (root / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {"job_name": "cdc-relay", "static_configs": [{"targets": [target]}]}
            ],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = (root / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                return True
        except OSError:
            return False

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/alerts")["data"]["alerts"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def prometheus_for(env: Env) -> Iterator[list[Prometheus]]:
    started: list[Prometheus] = []
    yield started
    for p in started:
        p.close()


def test_the_propagation_alert_fires_in_the_real_prometheus(
    env: Env, prometheus_for: list[Prometheus]
) -> None:
    env.init()
    relay = env.start_relay(alert_latency="1")
    relay.wait_streaming()
    prom = Prometheus(env.tmp, f"127.0.0.1:{relay.http_port()}")
    prometheus_for.append(prom)
    env.wait_for(prom.ready, timeout=60, what="Prometheus to be ready")
    env.wait_for(
        lambda: any(
            t["health"] == "up" for t in prom.get("/api/v1/targets")["data"]["activeTargets"]
        ),
        timeout=30,
        what="Prometheus to scrape the relay",
    )
    assert [a for a in prom.alerts() if a["state"] == "firing"] == []

    def sample(name: str) -> float | None:
        result = prom.get(f"/api/v1/query?query={name}")["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    # the slot's WAL, read with the publication check (every 2 s here)
    env.wait_for(
        lambda: sample("cdc_relay_slot_retained_wal_bytes") is not None,
        timeout=30,
        what="the slot's WAL in Prometheus",
    )
    assert (sample("cdc_relay_slot_retained_wal_bytes") or -1) >= 0
    assert sample("cdc_relay_slot_safe_wal_bytes") == -1  # max_slot_wal_keep_size unlimited
    env.rabbit.block_publishers()
    try:
        with env.sql() as conn:
            insert_events(conn, [outbox_row("SLOW", i) for i in range(5)])

        def firing() -> list[dict[str, Any]]:
            return [
                a
                for a in prom.alerts()
                if a["labels"]["alertname"] == "CdcRelayPropagationSlow" and a["state"] == "firing"
            ]

        env.wait_for(lambda: bool(firing()), timeout=60, what="CdcRelayPropagationSlow firing")
        (alert,) = firing()
        assert alert["labels"]["slot"] == env.name
        assert alert["labels"]["severity"] == "page"
        assert "alert_latency" in alert["annotations"]["summary"]
        assert "RabbitMQ" in alert["annotations"]["runbook"]
    finally:
        env.rabbit.unblock_publishers()
    assert len(env.consume(5, timeout=60)) == 5
    # the relay's episode ends once a transaction goes through in time again
    with env.sql() as conn:
        insert_events(conn, [outbox_row("FAST", 0)])
    assert len(env.consume(1, timeout=30)) == 1
    env.wait_for(
        lambda: (
            not [a for a in prom.alerts() if a["labels"]["alertname"] == "CdcRelayPropagationSlow"]
        ),
        timeout=60,
        what="the alert to resolve",
    )
    assert relay.terminate() == 0
