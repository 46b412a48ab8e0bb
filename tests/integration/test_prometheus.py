"""The shipped Grafana dashboard and alert rules against a real Prometheus (Debian's binary) scraping the
gateway (with its metrics token) and the vLLM CPU backend, after real traffic: streaming and not, several
adapters (more than the backend's slots, so that loads and evictions happen), an unknown model. Every
panel and template-variable query of the dashboard, its variables substituted as Grafana would, must
parse; those the traffic feeds must return finite data; and every alert rule must load and evaluate."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from app.backends.launcher import VllmCpuServer
from tests.integration.conftest import ADMIN_KEY, VLLM_KEY, Gateway, free_port, upload

pytestmark = pytest.mark.vllm

REPO_ROOT = Path(__file__).resolve().parents[2]
FILES = REPO_ROOT / "helm" / "lora-gateway" / "files"
DASHBOARD = FILES / "grafana-dashboard.json"
ALERTS = FILES / "alerts.yaml"
GATEWAY_JOB, VLLM_JOB = "lora-gateway", "vllm"
MSG = [{"role": "user", "content": "Hello! How are you today?"}]
TENANT = "promscrape"  # a tenant of this test's own, deleted at its end
# Its adapters: with acme's two and globex's one, one more than the backend's capacity (8 registered).
OWN_ADAPTERS = [f"a{i}" for i in range(6)]

# Grafana's built-in interval variables, as a dashboard with a 5-minute range would get them.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}

# Panels whose every query must return finite data after the traffic below. The others: rate limits (no
# 429 here), single-flight waits (loads here are not contended), placement waiters by base model (the
# gauge has a series once a request queued for placement: requests here find a free slot), store and
# database failures and promotion jobs (none in this traffic).
REQUEST_PANELS = {
    "Requests/s",
    "5xx ratio",
    "Gateway overhead p99",
    "Requests/s by tenant and model",
    "Errors/s by status and error type",
    "Errors/s by tenant and model",
    "Error ratio",
    "Requests/s by backend and status",
    "Requests/s by operation (GenAI server series)",
    "Request duration (successful)",
    "Request duration p99 by model",
    "Time to first token (streaming)",
    "Time per output token (streaming)",
    "Gateway overhead",
    "Placement wait",
    "Placement outcomes/s",
    "Tokens/s by tenant",
    "Output tokens/s by model",
    "Tokens in the time range by tenant",
    "Scrape targets up",
    "vLLM requests running / waiting",
    "vLLM KV cache usage",
    "vLLM LoRA adapters (vllm:lora_requests_info)",
    "vLLM time to first token",
    "vLLM end-to-end and inter-token latency",
    "vLLM tokens/s",
}
# The residency and fleet-state series: required once the gateway exposes them.
RESIDENCY_PANELS = {
    "Backends up",
    "Adapters active / registered",
    "Placement waiters",
    "Adapters loaded vs GPU slots per backend",
    "Adapters registered vs active by base model",
    "Adapter loads and evictions/s",
    "Thrash: evictions and loads per request",
    "Adapter load latency",
    "Adapter cache hit ratio",
    "Backend health (gateway health checks)",
    "Residency store call latency",
    "Database statement latency",
}
# Template variables that must list values after the traffic.
VARIABLES_WITH_DATA = {"tenant", "model", "vllm_job", "gateway_job"}
RESIDENCY_VARIABLES = {"backend"}


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("the prometheus binary is missing: scripts/ensure-services.sh installs it")
        pytest.skip("no prometheus binary: run scripts/ensure-services.sh (Debian's prometheus package)")
    return path


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str) -> dict[str, Any]:
        resp = self.http.post("/api/v1/query", data={"query": expr})
        body = resp.json()
        assert resp.status_code in (200, 400, 422), resp.text
        return dict(body)

    def value(self, expr: str) -> float | None:
        body = self.query(expr)
        assert body["status"] == "success", (expr, body)
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def scraped_since(self, since: float, timeout: float = 15) -> None:
        """Waits until both jobs have been scraped, successfully, by a scrape that began after `since`."""
        deadline = time.monotonic() + timeout
        jobs = f'job=~"{GATEWAY_JOB}|{VLLM_JOB}"'
        while True:
            last = self.value(f"min(timestamp(up{{{jobs}}}))")
            if last is not None and last > since and self.value(f"count(up{{{jobs}}} == 1)") == 2:
                return
            assert time.monotonic() < deadline, f"no scrape of both targets since {since}: {self.targets()}"
            time.sleep(0.2)

    def targets(self) -> list[dict[str, Any]]:
        return list(self.http.get("/api/v1/targets").json()["data"]["activeTargets"])


@pytest.fixture(scope="module")
def prometheus(
    gateway: Gateway, vllm: VllmCpuServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary = prometheus_binary()
    home = tmp_path_factory.mktemp("prometheus")
    (home / "gateway-token").write_text(ADMIN_KEY)  # no GATEWAY_METRICS_TOKEN here: the admin key
    (home / "vllm-token").write_text(VLLM_KEY)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": GATEWAY_JOB,
                "metrics_path": "/metrics",
                "authorization": {"credentials_file": str(home / "gateway-token")},
                "static_configs": [{"targets": [urlsplit(gateway.url).netloc]}],
            },
            {
                "job_name": VLLM_JOB,
                "metrics_path": "/metrics",
                "authorization": {"credentials_file": str(home / "vllm-token")},
                "static_configs": [{"targets": [urlsplit(vllm.base_url).netloc]}],
            },
        ],
    }
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (home / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={home / 'prometheus.yml'}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start:\n{(home / 'prometheus.log').read_text()}")
            time.sleep(0.1)
        prom = Prometheus(url)
        try:
            prom.scraped_since(time.time())
            yield prom
        finally:
            prom.http.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def send_traffic(gw: Gateway, own: httpx.Client) -> None:
    """One round: acme's two adapters (chat, streamed completions and chat), globex's, an unknown model
    (404), and this test's tenant's adapters: nine on a backend that registers eight (capacity), so that
    the second round evicts."""
    with gw.tenant_client("acme") as c:
        resp = c.post("/v1/chat/completions", json={"model": "support", "messages": MSG, "max_tokens": 6})
        assert resp.status_code == 200, resp.text
        for route, body in (
            ("/v1/completions", {"model": "legal", "prompt": "The gateway"}),
            ("/v1/chat/completions", {"model": "support", "messages": MSG}),
        ):
            payload = {**body, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}
            with c.stream("POST", route, json=payload) as s:
                assert s.status_code == 200
                assert any(line.startswith("data: [DONE]") for line in s.iter_lines())
        missing = c.post("/v1/chat/completions", json={"model": "no-such-adapter", "messages": MSG})
        assert missing.status_code == 404
    with gw.tenant_client("globex") as c:
        resp = c.post("/v1/chat/completions", json={"model": "support", "messages": MSG, "max_tokens": 4})
        assert resp.status_code == 200, resp.text
    for name in OWN_ADAPTERS:
        resp = own.post("/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 4})
        assert resp.status_code == 200, resp.text


def substitute(expr: str, values: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in values, f"unknown variable ${name} in {expr}"
        return values[name]

    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", one, expr)
    assert "$" not in out, out
    return out


LABEL_VALUES = re.compile(r"^label_values\((?:(.*),\s*)?(\w+)\)$", re.DOTALL)


def resolve_variables(
    prom: Prometheus, dashboard: dict[str, Any]
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Each query variable's values (via the label-values API, as Grafana's Prometheus data source asks),
    and what "All" stands for: its allValue, or the values found joined into a regex."""
    values = dict(BUILTINS)
    found: dict[str, list[str]] = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = LABEL_VALUES.match(query.strip())
        assert m, f"variable {var['name']}: not a label_values() query: {query}"
        selector, label = m.group(1), m.group(2)
        params = {"match[]": substitute(selector, values)} if selector else {}
        resp = prom.http.get(f"/api/v1/label/{label}/values", params=params)
        assert resp.status_code == 200 and resp.json()["status"] == "success", (var["name"], resp.text)
        found[var["name"]] = names = list(resp.json()["data"])
        # The same selector as a PromQL query must parse too.
        if selector:
            body = prom.query(f"group by ({label}) ({substitute(selector, values)})")
            assert body["status"] == "success", (var["name"], body)
        all_value = var.get("allValue")
        values[var["name"]] = all_value or "(" + "|".join(grafana_escape(n) for n in names) + ")"
    return values, found


def grafana_escape(value: str) -> str:
    """A value in a multi-value regex, escaped as Grafana's Prometheus data source does (the backslash
    doubled: it stands in a PromQL string literal)."""
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value.replace("\\", "\\" * 4))


def finite(body: dict[str, Any]) -> bool:
    result = body["data"]["result"]
    if body["data"]["resultType"] == "scalar":
        result = [{"value": result}]
    return any(math.isfinite(float(r["value"][1])) for r in result)


def test_dashboard_queries_and_alert_rules(gateway: Gateway, prometheus: Prometheus, tiny) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    admin = gateway.admin
    assert admin.post("/admin/v1/tenants", json={"name": TENANT}).status_code == 201
    try:
        key = admin.post(f"/admin/v1/tenants/{TENANT}/api-keys", json={}).json()["key"]
        for i, name in enumerate(OWN_ADAPTERS):
            upload(admin, TENANT, name, tiny.adapters[i % len(tiny.adapters)])
        with httpx.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        ) as own:
            # Round one makes the series; round two, once Prometheus has them, makes their rates.
            send_traffic(gateway, own)
            prometheus.scraped_since(time.time() + 0.3)
            send_traffic(gateway, own)
            prometheus.scraped_since(time.time() + 0.3)
    finally:
        admin.delete(f"/admin/v1/tenants/{TENANT}")
    traffic_s = time.monotonic() - started

    dashboard = json.loads(DASHBOARD.read_text())
    residency = prometheus.value("count(gateway_backend_up)") is not None
    values, found = resolve_variables(prometheus, dashboard)
    for name in VARIABLES_WITH_DATA | (RESIDENCY_VARIABLES if residency else set()):
        assert found[name], f"variable {name} lists no values"
    assert {"acme", "globex"} <= set(found["tenant"]) and {"support", "legal"} <= set(found["model"])
    assert found["vllm_job"] == [VLLM_JOB] and found["gateway_job"] == [GATEWAY_JOB]

    want = REQUEST_PANELS | (RESIDENCY_PANELS if residency else set())
    titles = {p["title"] for p in dashboard["panels"]}
    assert want <= titles, f"panels named here but not in the dashboard: {want - titles}"
    parsed, with_data, empty, missing = 0, 0, [], []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], values)
            body = prometheus.query(expr)
            assert body["status"] == "success", f"{panel['title']} / {target['refId']}: {expr}\n{body}"
            parsed += 1
            if finite(body):
                with_data += 1
            else:
                empty.append(f"{panel['title']} / {target.get('legendFormat')}")
                if panel["title"] in want:
                    missing.append(f"{panel['title']} / {target['refId']}: {expr}")
    print(  # noqa: T201
        f"\n{parsed} dashboard queries parsed, {with_data} had data ({len(found)} variables; residency series: "
        f"{residency}); traffic and scrapes {traffic_s:.1f} s\nno data: {empty}"
    )
    assert not missing, "queries without data after the traffic:\n" + "\n".join(missing)

    # The alert rules: all loaded from the file, each evaluated (they evaluate every second here).
    names = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    deadline = time.monotonic() + 10
    while True:
        groups = prometheus.http.get("/api/v1/rules").json()["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        evaluated = all(not r["lastEvaluation"].startswith("0001") for r in loaded.values())
        if (set(loaded) == names and evaluated) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert set(loaded) == names
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert not rule["lastEvaluation"].startswith("0001"), f"{name} never evaluated"
    firing = sorted(n for n, r in loaded.items() if r["state"] != "inactive")
    print(f"{len(loaded)} alert rules loaded and evaluated, health ok; not inactive: {firing}")  # noqa: T201
