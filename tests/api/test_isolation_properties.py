"""Tenant isolation as a property (hypothesis): random tenants upload adapters under random names
(unicode, case variants, '@', path-like, served-name-like; the registry refuses most, cleanly), some in
several versions, then call models by random names, their own and each other's, with their keys and
with random ones. Whatever the names: a request reaches the backend only for the caller's own adapter
(the scripted upstream records the served name it was sent), a listing shows the caller's own adapters
only, an unknown key is a 401, and no answer carries a served name.

The gateway runs in-process on its own event loop in a thread (tests/fixtures/world.py: hypothesis
drives a synchronous test), on a SQLite registry, in front of the scripted upstream (a vLLM-shaped
server that records what it was sent)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import registry
from tests.factories.adapters import TINY_BASE, adapter_files, multipart
from tests.fixtures.world import World


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("isolation")).start()
    yield w
    w.close()


_SPECIAL = [
    "@",
    "/",
    "..",
    "../",
    "%2F",
    "\\",
    " ",
    "\u00e9",
    "\u0130",
    "\u212a",
    "\U0001f600",
    "\x00",
    "lgw-",
]
names = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}[A-Za-z0-9]", fullmatch=True),
    st.builds(
        "".join, st.lists(st.sampled_from([*_SPECIAL, "a", "B", "support", "1"]), min_size=1, max_size=5)
    ),
    st.text(min_size=1, max_size=12),
)
tenant_plans = st.lists(
    st.lists(st.tuples(names, st.integers(1, 2)), min_size=1, max_size=3),  # (adapter name, versions)
    min_size=2,
    max_size=3,
)


def _variants(name: str) -> list[str]:
    return [
        name,
        name.upper(),
        name.lower(),
        name.swapcase(),
        f"{name}@1",
        f"{name}@2",
        f"{name}@99",
        f"../{name}",
    ]


async def _scenario(w: World, plans: list[list[tuple[str, int]]], probes: list[str], bad_key: str) -> None:
    run = uuid.uuid4().hex[:8]
    owned: dict[str, dict[str, set[int]]] = {}  # tenant -> adapter name -> versions
    served: dict[str, tuple[str, str, int]] = {}  # served name -> (tenant, name, version)
    keys: dict[str, str] = {}
    for i, plan in enumerate(plans):
        tenant = f"t{i}-{run}"
        await registry.tenant(w.admin, tenant)
        keys[tenant] = str((await registry.api_key(w.admin, tenant))["key"])
        owned[tenant] = {}
        for name, versions in plan:
            for v in range(versions):
                files = multipart(adapter_files(seed=i * 10 + v))
                up = await w.admin.post(
                    f"/admin/v1/tenants/{tenant}/adapters", data={"name": name}, files=files
                )
                if up.status_code == 201:
                    row = up.json()
                    owned[tenant].setdefault(row["name"], set()).add(row["version"])
                    served[f"lgw-{uuid.UUID(row['id']).hex}-{row['sha256'][:12]}"] = (
                        tenant, row["name"], row["version"],
                    )  # fmt: skip
                else:
                    assert up.status_code in (400, 409, 413), up.text
                    assert up.json()["error"]["message"]
    everyone = [n for t in owned.values() for n in t]
    for tenant, key in keys.items():
        auth = {"Authorization": f"Bearer {key}"}
        listing = await w.client.get("/v1/models", headers=auth)
        assert listing.status_code == 200, listing.text
        ids = {m["id"] for m in listing.json()["data"]}
        assert ids - {TINY_BASE} == set(owned[tenant]), (tenant, ids, owned[tenant])
        for model in {v for n in [*everyone, *probes] for v in _variants(n)} | set(served):
            before = len(w.script.bodies)
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            r = await w.client.post("/v1/chat/completions", json=body, headers=auth)
            assert r.status_code < 500, r.text
            # No served name in any answer, unless it echoes the one the caller sent.
            leaked = [n for n in served if n in r.text and n not in model]
            assert not leaked, r.text
            if model in served:  # a served name is never a name a tenant can call
                assert r.status_code == 404, r.text
            sent = w.script.bodies[before:]
            for forwarded in sent:
                owner = served.get(forwarded["model"])
                if forwarded["model"] != TINY_BASE:
                    assert owner is not None and owner[0] == tenant, (tenant, model, owner)
            if r.status_code == 200:
                assert r.json()["model"] in (model, model.rpartition("@")[0]), r.text
            if model in owned[tenant]:  # its own adapter, by its exact name: served, from its own files
                assert r.status_code == 200, r.text
                assert [served[b["model"]][:2] for b in sent] == [(tenant, model)], sent
        r = await w.client.get("/v1/models", headers={"Authorization": f"Bearer {bad_key}"})
        assert r.status_code == 401, r.text


_KEY_CHARS = st.characters(min_codepoint=33, max_codepoint=126)  # what an HTTP header can carry


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plans=tenant_plans, probes=st.lists(names, max_size=3), bad_key=st.text(_KEY_CHARS, max_size=80))
def test_no_request_reaches_another_tenants_adapter(
    world: World, plans: list[list[tuple[str, int]]], probes: list[str], bad_key: str
) -> None:
    world.run(_scenario(world, plans, probes, bad_key))
