"""Outage drills: a gateway process on a Postgres and a Redis this test starts itself (own ports, own
data dirs) and stops under a continuous load against the tiny model on vLLM's CPU build.

Postgres down: known keys keep being served from the registry cache, unknown keys and admin calls get a
503 in the OpenAI envelope. Redis down: requests that need the placement state get a 503 within 1 s
(fail closed), base-model requests go on; Redis back (empty, as one without persistence restarts):
requests succeed again within 5 s, without a gateway restart. Never a 500, and the log gets a line per
outage, not one per request."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
import pytest

from app.backends.launcher import VllmCpuServer
from tests.fixtures.services import PrivatePostgres, PrivateRedis
from tests.integration.conftest import ADMIN_KEY, BASE, start_gateway, stop_process, upload

pytestmark = pytest.mark.vllm


@dataclass
class Stack:
    url: str
    log: Path
    pg: PrivatePostgres
    redis: PrivateRedis
    known: str  # a key the gateway has used (cached)
    unknown: str  # a key it has never seen
    admin: httpx.Client


@pytest.fixture(scope="module")
def stack(vllm: VllmCpuServer, tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    pg, redis = PrivatePostgres(), PrivateRedis()
    pg.start()
    redis.start()
    proc, url, log = start_gateway(
        tmp_path_factory.mktemp("outage-gw"),
        {
            "GATEWAY_DATABASE_URL": pg.url,
            "GATEWAY_REDIS_URL": redis.url,
            "GATEWAY_REDIS_PREFIX": f"lgw-outage-{uuid.uuid4().hex[:6]}",
            "GATEWAY_CACHE_TTL_S": "1",
            "GATEWAY_RECONCILE_INTERVAL_S": "2",
        },
    )
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    try:
        for path, body in (
            ("/admin/v1/base-models", {"name": BASE, "path": str(tiny.base)}),
            (
                "/admin/v1/backends",
                {
                    "name": "cpu-o",
                    "url": vllm.base_url,
                    "base_model": BASE,
                    "gpu_slots": 4,
                    "max_lora_rank": 8,
                    "capacity": 8,
                    "api_key": vllm.config.api_key,
                },
            ),
            ("/admin/v1/tenants", {"name": "acme"}),
        ):
            resp = admin.post(path, json=body)
            assert resp.is_success, resp.text
        keys = [admin.post("/admin/v1/tenants/acme/api-keys", json={}).json()["key"] for _ in range(2)]
        upload(admin, "acme", "support", tiny.adapters[0])
        yield Stack(url, log, pg, redis, keys[0], keys[1], admin)
    finally:
        admin.close()
        stop_process(proc)
        redis.stop()
        pg.destroy()


@dataclass
class Load:
    """Closed-loop clients in threads: (sent at, answered at, model, status, body) per request."""

    stack: Stack
    results: list[tuple[float, float, str, int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _client(self, model: str) -> None:
        with httpx.Client(
            base_url=self.stack.url, headers={"Authorization": f"Bearer {self.stack.known}"}, timeout=30
        ) as c:
            while not self.stop.is_set():
                t = time.monotonic()
                try:
                    r = c.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 2})
                    self.results.append((t, time.monotonic(), model, r.status_code, r.text))
                except httpx.TransportError as exc:
                    self.results.append((t, time.monotonic(), model, -1, repr(exc)))
                time.sleep(0.05)

    def __enter__(self) -> Self:
        self.threads = [
            threading.Thread(target=self._client, args=(m,), daemon=True)
            for m in ("support", "support", BASE)
        ]
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(35)

    def between(
        self, start: float, end: float, model: str | None = None
    ) -> list[tuple[float, float, str, int, str]]:
        return [r for r in self.results if start <= r[0] < end and (model is None or r[2] == model)]


def _assert_clean(load: Load) -> None:
    bad = [r for r in load.results if r[3] not in (200, 503)]
    assert not bad, bad[:3]
    for _, _, _, status, body in load.results:
        if status == 503:
            assert (
                "127.0.0.1" not in body
                and "lgw-" not in body
                and '"type":"server_error"' in body.replace(" ", "")
            )


def _wait_ok(load: Load, model: str, after: float, within_s: float) -> float:
    deadline = after + within_s
    while time.monotonic() < deadline + 1:
        oks = [r for r in load.between(after, deadline, model) if r[3] == 200]
        if oks:
            return oks[0][1] - after
        time.sleep(0.05)
    raise AssertionError(
        f"no successful {model} request within {within_s} s: {load.between(after, deadline, model)[-3:]}"
    )


def test_postgres_down_serves_known_keys_and_503s_the_rest(stack: Stack) -> None:
    with Load(stack) as load:
        time.sleep(2)
        assert load.between(0, time.monotonic(), "support") and all(r[3] == 200 for r in load.results)
        stack.pg.stop()
        down = time.monotonic()
        time.sleep(3)  # three cache TTLs
        unknown = httpx.post(
            f"{stack.url}/v1/completions",
            headers={"Authorization": f"Bearer {stack.unknown}"},
            json={"model": "support", "prompt": "x", "max_tokens": 2},
            timeout=10,
        )
        listing = stack.admin.get("/admin/v1/tenants")
        stack.pg.start()
        up = time.monotonic()
        _wait_ok(load, "support", up, 5)
        deadline = time.monotonic() + 5
        while stack.admin.get("/admin/v1/tenants").status_code != 200:
            assert time.monotonic() < deadline, "admin calls did not recover within 5 s"
            time.sleep(0.1)
    during = load.between(down, up)
    assert len(during) >= 10 and all(r[3] == 200 for r in during), [r[3] for r in during]
    assert unknown.status_code == 503 and unknown.json()["error"]["code"] == "service_unavailable"
    assert listing.status_code == 503 and "Retry-After" in listing.headers
    _assert_clean(load)


def test_redis_down_fails_closed_fast_and_recovers_without_a_restart(stack: Stack) -> None:
    with Load(stack) as load:
        time.sleep(2)
        assert all(r[3] == 200 for r in load.results), [r for r in load.results if r[3] != 200][:2]
        stack.redis.stop()
        down = time.monotonic()
        time.sleep(3)
        restart = time.monotonic()
        stack.redis.start()  # the same port, empty: every lease and registration is gone
        up = time.monotonic()
        recovered_s = _wait_ok(load, "support", up, 5)
        time.sleep(2)
    during = load.between(down + 0.2, restart, "support")  # sent while Redis was down
    assert during and all(r[3] == 503 for r in during), [(round(r[0] - down, 2), r[3]) for r in during]
    assert all(answered - sent < 1.0 for sent, answered, *_ in during)  # the 503s come within 1 s
    first_503 = min(r[1] for r in load.between(down, restart, "support") if r[3] == 503)
    assert first_503 - down < 1.0
    base = load.between(down, restart, BASE)
    assert base and all(r[3] == 200 for r in base)  # no adapter: placement state is not needed
    assert recovered_s < 5.0
    after = load.between(up + recovered_s + 0.5, time.monotonic())
    assert after and all(r[3] == 200 for r in after), [r[3] for r in after]
    _assert_clean(load)
    text = stack.log.read_text()
    assert "Traceback" not in text
    outage_lines = [line for line in text.splitlines() if "unreachable" in line]
    assert 1 <= len(outage_lines) <= 12, outage_lines[:20]
