"""The shipped alert rules and Grafana dashboard (helm/lora-gateway/files/): the rules valid for Prometheus
(`promtool check rules`) and doing what they say (`promtool test rules` on tests/promtool/alerts_test.yaml:
every alert firing, and not firing where it should not); each rule and the dashboard well formed. Their
queries against a real Prometheus scraping real traffic: tests/integration/test_prometheus.py. promtool
comes from Debian's `prometheus` package (scripts/ensure-services.sh installs it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
FILES = REPO_ROOT / "helm" / "lora-gateway" / "files"
ALERTS = FILES / "alerts.yaml"
DASHBOARD = FILES / "grafana-dashboard.json"
UNIT_TESTS = REPO_ROOT / "tests" / "promtool" / "alerts_test.yaml"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: scripts/ensure-services.sh installs it")
        pytest.skip("no promtool: run scripts/ensure-services.sh (Debian's prometheus package)")
    return path


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], check=False, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_promtool_unit_tests() -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", str(UNIT_TESTS)],
        check=False, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_unit_tested_firing_and_not() -> None:
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    cases = [case for t in tests for case in t.get("alert_rule_test", [])]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    names = {r["alert"] for r in rules()}
    assert names - fired == set(), "alerts no unit test sees firing"
    assert quiet, "no unit test of an alert staying quiet"
    assert names - quiet == set(), "alerts no unit test sees staying quiet (pending, under the threshold)"


def test_every_rule_has_for_severity_and_annotations() -> None:
    seen = set()
    for rule in rules():
        name = rule["alert"]
        assert re.fullmatch(r"LoraGateway[A-Za-z0-9]+", name), name
        assert name not in seen, f"{name} twice"
        seen.add(name)
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no for:"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        assert {"summary", "description"} <= set(rule.get("annotations", {})), name


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def test_dashboard_is_importable_as_is() -> None:
    d = dashboard()
    text = DASHBOARD.read_text()
    assert d["uid"] == "lora-gateway" and d["title"]
    assert 36 <= d["schemaVersion"] <= 41
    # File provisioning does not resolve ${DS_...} inputs: a datasource variable instead.
    assert "__inputs" not in d and "DS_PROMETHEUS" not in text
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for name in ("tenant", "model"):
        var = variables[name]
        assert var["type"] == "query" and var["includeAll"] and var["allValue"] == ".*", name
        assert var["definition"].startswith("label_values("), name
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels:
        pos = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(pos) and pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip(), p["title"]
    # No two panels overlap.
    cells: set[tuple[int, int]] = set()
    for p in panels:
        pos = p["gridPos"]
        mine = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
