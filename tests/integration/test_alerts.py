"""The operators' kit checked with the real Prometheus tools: `promtool check rules`, `promtool
check config`, and `promtool test rules` over compose/prometheus/alerts_test.yml, in which every
alert of alerts.yml fires on the series that should fire it and stays quiet otherwise.

promtool compares annotations too; where the test file leaves them out, they are filled in here
from alerts.yml itself (its templates rendered with the expected labels), so the runbook text
lives in one place.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration  # needs promtool, which `make test` installs

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "compose" / "prometheus"


def _promtool(*args: str, cwd: Path = KIT) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: `make test` installs it (Debian's prometheus package)"
    return subprocess.run(
        [tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((KIT / "alerts.yml").read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def _render(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def test_every_alert_has_a_summary_a_runbook_and_a_severity() -> None:
    rules = _rules()
    assert len(rules) >= 9
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("page", "warn"), name
        assert rule["annotations"]["summary"], name
        assert len(rule["annotations"]["runbook"]) > 80, f"{name}: a runbook says what to do"


def test_promtool_accepts_the_rules_and_the_scrape_config() -> None:
    rules = _promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_alert_is_unit_tested_and_the_tests_pass(tmp_path: Path) -> None:
    rules = _rules()
    tests = yaml.safe_load((KIT / "alerts_test.yml").read_text())
    covered = set()
    fired = set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            name = check["alertname"]
            covered.add(name)
            for alert in check["exp_alerts"]:
                fired.add(name)
                labels = {k: str(v) for k, v in alert["exp_labels"].items()}
                if "exp_annotations" not in alert:
                    alert["exp_annotations"] = {
                        k: _render(v, labels) for k, v in rules[name]["annotations"].items()
                    }
    assert covered == set(rules), f"alerts without a test: {set(rules) - covered}"
    assert fired == set(rules), f"alerts never shown firing: {set(rules) - fired}"
    shutil.copy(KIT / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    out = _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
