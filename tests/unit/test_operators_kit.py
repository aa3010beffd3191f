"""The dashboard and the compose stack's monitoring services: the dashboard parses, references
only metrics the relay exports (read from the relay's own registry, not a hand-kept list), and
every exported metric is on it; compose runs Prometheus and Grafana with the shipped files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cdc_relay.telemetry import Telemetry

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "compose" / "grafana" / "dashboards" / "cdc-relay.json"
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def exported() -> set[str]:
    """Metric families the relay's /metrics serves, with every optional series present."""
    telemetry = Telemetry.create("s1", 5.0, False)
    telemetry.stats.unroutable["outbox.unroutable"] = 1
    telemetry.stats.slot_wal = (1, 2)
    text = generate_latest(telemetry.metrics.registry).decode()
    return {f.name for f in text_string_to_metric_families(text) if f.name.startswith("cdc_relay")}


def _family(name: str, known: set[str]) -> str:
    if name in known:
        return name
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in known:
            return name.removesuffix(suffix)
    return name


def referenced(known: set[str]) -> set[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    return {_family(m, known) for e in exprs for m in re.findall(r"\bcdc_relay_\w+", e)}


def test_the_dashboard_uses_only_exported_metrics_and_shows_every_one() -> None:
    known = exported()
    assert len(known) >= 20
    used = referenced(known)
    assert used - known == set(), f"the dashboard asks for metrics nobody exports: {used - known}"
    assert known - used == set(), f"exported metrics missing from the dashboard: {known - used}"


def test_the_dashboard_is_provisioned_against_the_compose_prometheus() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "cdc-relay" and doc["panels"]
    uids = {t["datasource"]["uid"] for p in doc["panels"] for t in p["targets"]}
    provisioning = REPO / "compose" / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert uids == {s["uid"] for s in sources["datasources"]}
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    titles = " ".join(p["title"] for p in doc["panels"]).lower()
    for word in ("throughput", "in flight", "commit → confirm", "lag", "reconnects", "alerts"):
        assert word in titles, word


def test_compose_runs_prometheus_with_the_rules_and_grafana_with_the_dashboard() -> None:
    compose = REPO / "compose"
    services = yaml.safe_load((compose / "docker-compose.yml").read_text())["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    mounts = {m.split(":")[1]: compose / m.split(":")[0] for m in prometheus["volumes"]}
    assert (
        mounts["/etc/prometheus/prometheus.yml"].resolve()
        == (compose / "prometheus" / "prometheus.yml").resolve()
    )
    assert mounts["/etc/prometheus/alerts.yml"].exists()
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "cdc-relay"  # the rules select job="cdc-relay"
    relay_port = services["relay"]["environment"]["CDC_RELAY_HTTP_ADDRESS"].rsplit(":", 1)[1]
    assert job["static_configs"][0]["targets"] == [f"relay:{relay_port}"]
    graf = {m.split(":")[1]: compose / m.split(":")[0] for m in grafana["volumes"]}
    assert (graf["/var/lib/grafana/dashboards"] / "cdc-relay.json").exists()
    assert (graf["/etc/grafana/provisioning"] / "dashboards" / "cdc-relay.yml").exists()
