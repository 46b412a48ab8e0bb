"""Admin API: adapter uploads. Every refusal is a 4xx in the OpenAI envelope and leaves no file, no row."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from tests.api.test_tenants import assert_envelope
from tests.factories import registry
from tests.factories.adapters import (
    adapter_config,
    adapter_files,
    adapter_tensors,
    multipart,
    tar_gz,
    zip_bytes,
)

URL = "/admin/v1/tenants/acme/adapters"


@pytest.fixture
async def world(admin: httpx.AsyncClient) -> None:
    await registry.tenant(admin, "acme")
    await registry.base_model(admin, aliases=["org/tiny-llama-hub"])
    await registry.backend(admin, max_lora_rank=16)


async def upload(
    admin: httpx.AsyncClient, files: dict[str, bytes], *, name: str = "support", url: str = URL, **form: str
) -> httpx.Response:
    return await admin.post(url, data={"name": name, **form}, files=multipart(files))


def stored_files(settings: Settings) -> list[Path]:
    root = settings.store_root
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def adapter_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM adapters"))).scalar_one())


@pytest.fixture
def assert_nothing_left(settings: Settings, engine: AsyncEngine):  # type: ignore[no-untyped-def]
    async def check() -> None:
        assert stored_files(settings) == []
        assert await adapter_rows(engine) == 0

    return check


@pytest.mark.usefixtures("world")
class TestUploadAccepted:
    async def test_two_files(self, admin: httpx.AsyncClient, settings: Settings) -> None:
        resp = await upload(admin, adapter_files())
        assert resp.status_code == 201, resp.text
        body = resp.json()
        assert (body["name"], body["version"], body["tenant"], body["base_model"]) == (
            "support",
            1,
            "acme",
            "tiny-llama",
        )
        assert (body["rank"], body["alpha"], body["target_modules"]) == (8, 16.0, ["q_proj", "v_proj"])
        folder = settings.store_root / body["sha256"][:2] / body["sha256"]
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        assert body["size_bytes"] == sum(p.stat().st_size for p in folder.iterdir())
        # Nothing else: no staging leftovers.
        assert len(stored_files(settings)) == 2
        assert (await admin.get(f"/admin/v1/adapters/{body['id']}")).json() == body

    async def test_tar_gz_with_a_top_folder_and_extra_files(self, admin: httpx.AsyncClient) -> None:
        members = {f"my-adapter/{k}": v for k, v in adapter_files().items()} | {
            "my-adapter/README.md": b"# hi"
        }
        resp = await upload(admin, {"adapter.tar.gz": tar_gz(members)})
        assert resp.status_code == 201, resp.text

    async def test_zip(self, admin: httpx.AsyncClient) -> None:
        resp = await upload(admin, {"adapter.zip": zip_bytes(adapter_files())})
        assert resp.status_code == 201, resp.text

    async def test_same_name_becomes_new_version_and_list_shows_both(self, admin: httpx.AsyncClient) -> None:
        first = (await upload(admin, adapter_files(seed=1))).json()
        second = (await upload(admin, adapter_files(seed=2))).json()
        assert (first["version"], second["version"]) == (1, 2)
        assert first["sha256"] != second["sha256"]
        listed = (await admin.get(URL)).json()["data"]
        assert [(a["name"], a["version"]) for a in listed] == [("support", 1), ("support", 2)]

    async def test_identical_content_is_stored_once(
        self, admin: httpx.AsyncClient, settings: Settings
    ) -> None:
        await registry.tenant(admin, "globex")
        a = (await upload(admin, adapter_files())).json()
        b = (await upload(admin, adapter_files(), url="/admin/v1/tenants/globex/adapters")).json()
        assert a["sha256"] == b["sha256"]
        assert a["id"] != b["id"]
        assert len(stored_files(settings)) == 2

    async def test_base_model_by_alias_and_by_override(self, admin: httpx.AsyncClient) -> None:
        aliased = adapter_files(config=adapter_config(base="org/tiny-llama-hub"))
        assert (await upload(admin, aliased, name="a")).json()["base_model"] == "tiny-llama"
        no_base = adapter_files(config=adapter_config(base=None))
        resp = await upload(admin, no_base, name="b", base_model="tiny-llama")
        assert resp.status_code == 201, resp.text

    async def test_regex_targets_and_rank_pattern(self, admin: httpx.AsyncClient) -> None:
        tensors = adapter_tensors(r=4, modules=["q_proj"]) | adapter_tensors(r=8, modules=["v_proj"], seed=3)
        config = adapter_config(r=4, targets=r".*\.(q_proj|v_proj)", rank_pattern={"v_proj": 8})
        resp = await upload(admin, adapter_files(config=config, tensors=tensors))
        assert resp.status_code == 201, resp.text
        assert resp.json()["rank"] == 8

    async def test_delete_hides_adapter_but_keeps_files(
        self, admin: httpx.AsyncClient, settings: Settings
    ) -> None:
        body = (await upload(admin, adapter_files())).json()
        assert (await admin.delete(f"/admin/v1/adapters/{body['id']}")).status_code == 204
        assert_envelope(await admin.get(f"/admin/v1/adapters/{body['id']}"), 404, "not_found")
        assert (await admin.get(URL)).json()["data"] == []
        # vLLM dies if a loaded adapter's folder vanishes: files outlive the row until no backend has it.
        assert len(stored_files(settings)) == 2

    async def test_tenant_models_list(self, admin: httpx.AsyncClient, client: httpx.AsyncClient) -> None:
        await upload(admin, adapter_files(seed=1))
        await upload(admin, adapter_files(seed=2))
        await upload(admin, adapter_files(seed=3), name="legal")
        key = (await registry.api_key(admin))["key"]
        resp = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert sorted(m["id"] for m in resp.json()["data"]) == ["legal", "support", "tiny-llama"]

    async def test_tenant_models_retrieve(self, admin: httpx.AsyncClient, client: httpx.AsyncClient) -> None:
        """OpenAI's `client.models.retrieve(name)`: the names a request's `model` takes, nothing else."""
        await upload(admin, adapter_files(seed=1))
        await upload(admin, adapter_files(seed=2))
        mine = {"Authorization": f"Bearer {(await registry.api_key(admin))['key']}"}
        await registry.tenant(admin, "other")
        theirs = {"Authorization": f"Bearer {(await registry.api_key(admin, 'other'))['key']}"}
        for name, owner, parent in (
            ("support", "acme", "tiny-llama"),
            ("support@1", "acme", "tiny-llama"),
            ("tiny-llama", "lora-gateway", None),
            ("org/tiny-llama-hub", "lora-gateway", None),  # an alias, with a slash
        ):
            resp = await client.get(f"/v1/models/{name}", headers=mine)
            assert resp.status_code == 200, (name, resp.text)
            body = resp.json()
            assert (body["id"], body["object"], body["owned_by"], body["parent"]) == (
                name,
                "model",
                owner,
                parent,
            )
        # Another tenant's adapter and an unknown name get the same 404.
        gone = assert_envelope(await client.get("/v1/models/support", headers=theirs), 404, "model_not_found")
        unknown = assert_envelope(await client.get("/v1/models/nope", headers=mine), 404, "model_not_found")
        assert str(gone["message"]).replace("support", "X") == str(unknown["message"]).replace("nope", "X")
        assert_envelope(await client.get("/v1/models/support@3", headers=mine), 404, "model_not_found")
        assert_envelope(await client.get("/v1/models/" + "x" * 300, headers=mine), 400)
        assert_envelope(await client.get("/v1/models/support"), 401)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) - 100]


def _config_bytes(**kw: object) -> bytes:
    return json.dumps(adapter_config(**kw)).encode()  # type: ignore[arg-type]


def _with(**replace: bytes) -> dict[str, bytes]:
    files = adapter_files()
    files.update(replace)
    return files


# (case id, files, expected status, what the message must mention)
REFUSED: list[tuple[str, dict[str, bytes], int, str]] = [
    (
        "pickle-bin",
        {"adapter_config.json": _config_bytes(), "adapter_model.bin": b"\x80\x04pickle"},
        400,
        "pickle",
    ),
    ("pickle-bin-beside-safetensors", _with(**{"adapter_model.bin": b"\x80\x04"}), 400, "pickle"),
    ("malformed-json", _with(**{"adapter_config.json": b"{'r': 8,"}), 400, "not valid JSON"),
    ("json-not-object", _with(**{"adapter_config.json": b"[1, 2]"}), 400, "JSON object"),
    (
        "rank-missing",
        _with(**{"adapter_config.json": json.dumps({"target_modules": ["q_proj"]}).encode()}),
        400,
        "'r'",
    ),
    ("not-lora", _with(**{"adapter_config.json": _config_bytes(peft_type="IA3")}), 400, "peft_type"),
    ("dora", _with(**{"adapter_config.json": _config_bytes(use_dora=True)}), 400, "DoRA"),
    (
        "modules-to-save",
        _with(**{"adapter_config.json": _config_bytes(modules_to_save=["lm_head"])}),
        400,
        "modules_to_save",
    ),
    ("config-rank-mismatch", _with(**{"adapter_config.json": _config_bytes(r=4)}), 400, "do not fit rank 4"),
    (
        "untargeted-module",
        _with(**{"adapter_config.json": _config_bytes(targets=["q_proj"])}),
        400,
        "not among target_modules",
    ),
    ("rank-too-high", adapter_files(config=adapter_config(r=32)), 400, "exceeds the maximum LoRA rank 16"),
    (
        "unknown-base-model",
        adapter_files(config=adapter_config(base="meta/llama-9000")),
        400,
        "not registered",
    ),
    ("no-base-model", adapter_files(config=adapter_config(base=None)), 400, "base_model_name_or_path"),
    (
        "truncated-safetensors",
        _with(**{"adapter_model.safetensors": _truncated(adapter_files()["adapter_model.safetensors"])}),
        400,
        "safetensors",
    ),
    ("garbage-safetensors", _with(**{"adapter_model.safetensors": b"\x00" * 64}), 400, "safetensors"),
    ("empty-safetensors", _with(**{"adapter_model.safetensors": b""}), 400, "safetensors"),
    ("only-config", {"adapter_config.json": _config_bytes()}, 400, "adapter_model.safetensors"),
    ("stray-file", {"notes.txt": b"hi"}, 400, "unexpected file"),
    (
        "path-escaping-tar",
        {"a.tar.gz": tar_gz({f"../../{k}": v for k, v in adapter_files().items()})},
        400,
        "escapes",
    ),
    (
        "absolute-path-tar",
        {"a.tar.gz": tar_gz({f"/tmp/{k}": v for k, v in adapter_files().items()})},
        400,
        "escapes",
    ),
    (
        "path-escaping-zip",
        {"a.zip": zip_bytes({f"x/../../{k}": v for k, v in adapter_files().items()})},
        400,
        "escapes",
    ),
    ("symlink-tar", {"a.tar.gz": tar_gz(adapter_files(), links={"evil": "/etc/passwd"})}, 400, "link"),
    (
        "pickle-in-archive",
        {"a.tar.gz": tar_gz(adapter_files() | {"adapter_model.bin": b"\x80"})},
        400,
        "pickle",
    ),
    (
        "two-adapters-in-archive",
        {"a.zip": zip_bytes({f"{d}/{k}": v for d in "ab" for k, v in adapter_files().items()})},
        400,
        "exactly one",
    ),
    ("not-an-archive", {"a.tar.gz": b"definitely not gzip"}, 400, "tar"),
    ("not-a-zip", {"a.zip": b"PK nope"}, 400, "zip"),
]


@pytest.mark.usefixtures("world")
class TestUploadRefused:
    @pytest.mark.parametrize(
        ("files", "status", "mentions"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
    )
    async def test_refused_and_nothing_left(
        self,
        admin: httpx.AsyncClient,
        assert_nothing_left,
        files: dict[str, bytes],
        status: int,
        mentions: str,  # type: ignore[no-untyped-def]
    ) -> None:
        error = assert_envelope(await upload(admin, files), status)
        assert mentions in str(error["message"]), error
        await assert_nothing_left()

    async def test_the_name_of_a_base_model_is_not_an_adapter_name(
        self, admin: httpx.AsyncClient, assert_nothing_left
    ) -> None:  # type: ignore[no-untyped-def]
        # It would shadow the base model for that tenant: `model: tiny-llama` would run the adapter.
        error = assert_envelope(await upload(admin, adapter_files(), name="tiny-llama"), 409, "conflict")
        assert "base model" in str(error["message"]) and error["param"] == "name"
        await assert_nothing_left()

    async def test_wrong_tensor_shape_for_base_model(
        self, admin: httpx.AsyncClient, assert_nothing_left
    ) -> None:  # type: ignore[no-untyped-def]
        wrong = {"q_proj": [128, 64], "v_proj": [64, 32]}  # lora_A of q_proj for a 128-wide model
        files = adapter_files(tensors=adapter_tensors(shapes=wrong))
        error = assert_envelope(await upload(admin, files), 400)
        assert "64->64" in str(error["message"])
        await assert_nothing_left()

    async def test_module_the_base_model_lacks(self, admin: httpx.AsyncClient, assert_nothing_left) -> None:  # type: ignore[no-untyped-def]
        tensors = {
            "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight": np.zeros((8, 64), np.float32),
            "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight": np.zeros(
                (128, 8), np.float32
            ),
        }
        config = adapter_config(targets=["qkv_proj"])
        error = assert_envelope(await upload(admin, adapter_files(config=config, tensors=tensors)), 400)
        assert "does not exist in the base model" in str(error["message"])
        await assert_nothing_left()

    async def test_layer_beyond_the_base_model(self, admin: httpx.AsyncClient, assert_nothing_left) -> None:  # type: ignore[no-untyped-def]
        files = adapter_files(tensors=adapter_tensors(layers=3))
        assert "layer 2" in str(assert_envelope(await upload(admin, files), 400)["message"])
        await assert_nothing_left()

    async def test_lora_b_missing(self, admin: httpx.AsyncClient, assert_nothing_left) -> None:  # type: ignore[no-untyped-def]
        tensors = {
            k: v
            for k, v in adapter_tensors().items()
            if not k.endswith("layers.1.self_attn.v_proj.lora_B.weight")
        }
        assert "no lora_B" in str(
            assert_envelope(await upload(admin, adapter_files(tensors=tensors)), 400)["message"]
        )
        await assert_nothing_left()

    async def test_integer_weights(self, admin: httpx.AsyncClient, assert_nothing_left) -> None:  # type: ignore[no-untyped-def]
        tensors = {k: v.astype(np.int32) for k, v in adapter_tensors().items()}
        assert "dtype" in str(
            assert_envelope(await upload(admin, adapter_files(tensors=tensors)), 400)["message"]
        )
        await assert_nothing_left()

    async def test_oversized_files_are_413(
        self, admin: httpx.AsyncClient, settings: Settings, assert_nothing_left
    ) -> None:  # type: ignore[no-untyped-def]
        # Size is checked while the bytes are staged, before anything looks at the tensors.
        big = adapter_tensors(r=64) | {"pad": np.zeros(40_000, np.float32)}
        files = adapter_files(config=adapter_config(r=64), tensors=big)
        assert len(files["adapter_model.safetensors"]) > settings.MAX_ADAPTER_BYTES
        assert_envelope(await upload(admin, files), 413, "payload_too_large")
        await assert_nothing_left()

    async def test_oversized_request_refused_by_content_length(
        self, admin: httpx.AsyncClient, assert_nothing_left
    ) -> None:  # type: ignore[no-untyped-def]
        blob = b"\0" * (3 << 20)
        assert_envelope(await upload(admin, {"adapter_model.safetensors": blob}), 413, "payload_too_large")
        await assert_nothing_left()

    async def test_oversized_streamed_body_without_length_is_413(
        self, admin: httpx.AsyncClient, assert_nothing_left
    ) -> None:  # type: ignore[no-untyped-def]
        boundary = "b0undary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="adapter_model.safetensors"\r\n\r\n'
        ).encode()

        async def body():  # type: ignore[no-untyped-def]
            yield head
            for _ in range(40):  # 40 x 64 KiB: well past the 256 KiB + 1 MiB form limit
                yield b"\0" * 65536

        resp = await admin.post(
            URL, content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
        )
        assert "content-length" not in resp.request.headers
        assert_envelope(resp, 413, "payload_too_large")
        await assert_nothing_left()

    async def test_zip_bomb_counts_inflated_bytes(
        self, admin: httpx.AsyncClient, assert_nothing_left
    ) -> None:  # type: ignore[no-untyped-def]
        files = adapter_files() | {
            "adapter_model.safetensors": b"\0" * (4 << 20)
        }  # 4 MiB of zeros zips to ~4 KiB
        archive = zip_bytes(files)
        assert len(archive) < 64 * 1024
        assert_envelope(await upload(admin, {"a.zip": archive}), 413, "payload_too_large")
        await assert_nothing_left()

    @pytest.mark.parametrize(
        ("targets", "rank_pattern", "folder", "param"),
        [
            (r".*(x+x+)+y", None, "x" * 3000, "target_modules"),  # catastrophic backtracking
            ("(q_proj", None, "x", "adapter_config.json"),  # not a regex: refused as the config is read
            (["q_proj"], {"(a|aa)+$": 4}, "a" * 3000 + "b", "rank_pattern"),
        ],
    )
    async def test_hostile_config_patterns_are_400_in_bounded_time(
        self,
        admin: httpx.AsyncClient,
        assert_nothing_left,  # type: ignore[no-untyped-def]
        targets: object,
        rank_pattern: dict[str, int] | None,
        folder: str,
        param: str,
    ) -> None:
        # Patterns are matched against the module paths the tensor names carry: make those long.
        tensors = {
            k.replace(".q_proj.", f".{folder}.q_proj."): v
            for k, v in adapter_tensors(r=8, modules=["q_proj"]).items()
        }
        config = adapter_config(targets=targets)  # type: ignore[arg-type]
        if rank_pattern is not None:
            config["rank_pattern"] = rank_pattern
        t = time.monotonic()
        resp = await upload(admin, adapter_files(config=config, tensors=tensors))
        assert time.monotonic() - t < 5
        assert assert_envelope(resp, 400)["param"] == param, resp.text
        await assert_nothing_left()

    async def test_archives_that_are_not_adapters_are_400(
        self, admin: httpx.AsyncClient, assert_nothing_left
    ) -> None:  # type: ignore[no-untyped-def]
        files = adapter_files()
        crowded = zip_bytes(files | {f"extra-{i}.txt": b"x" for i in range(100)})
        crowded_tar = tar_gz(files | {f"extra-{i}.txt": b"x" for i in range(100)})
        plain = zip_bytes(files)
        # Flag every member encrypted (general purpose bit 0) in the local and central headers.
        encrypted = bytearray(plain)
        for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = encrypted.find(sig)
            while at != -1:
                encrypted[at + offset] |= 1
                at = encrypted.find(sig, at + 4)
        # A compression method zipfile does not know (99 is AES's marker).
        unknown = bytearray(plain)
        for sig, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
            at = unknown.find(sig)
            while at != -1:
                unknown[at + offset : at + offset + 2] = (99).to_bytes(2, "little")
                at = unknown.find(sig, at + 4)
        for name, archive in (
            ("a.zip", crowded),
            ("a.tar.gz", crowded_tar),
            ("a.zip", bytes(encrypted)),
            ("a.zip", bytes(unknown)),
        ):
            resp = await upload(admin, {name: archive})
            assert assert_envelope(resp, 400)["param"] == "file", resp.text
        await assert_nothing_left()

    @pytest.mark.parametrize("name", ["", "../x", "a b", "-lead", "x" * 129, "a/b"])
    async def test_bad_adapter_name(self, admin: httpx.AsyncClient, assert_nothing_left, name: str) -> None:  # type: ignore[no-untyped-def]
        assert assert_envelope(await upload(admin, adapter_files(), name=name), 400)["param"] == "name"
        await assert_nothing_left()

    async def test_missing_fields(self, admin: httpx.AsyncClient, assert_nothing_left) -> None:  # type: ignore[no-untyped-def]
        assert_envelope(await admin.post(URL, files=multipart(adapter_files())), 400)  # no name
        assert_envelope(
            await admin.post(URL, data={"name": "x"}, files={"other": ("f", b"1")}), 400
        )  # no file
        await assert_nothing_left()

    async def test_not_multipart(self, admin: httpx.AsyncClient, assert_nothing_left) -> None:  # type: ignore[no-untyped-def]
        assert_envelope(await admin.post(URL, json={"name": "x"}), 400)
        await assert_nothing_left()

    async def test_malformed_multipart(self, admin: httpx.AsyncClient, assert_nothing_left) -> None:  # type: ignore[no-untyped-def]
        resp = await admin.post(
            URL, content=b"garbage", headers={"content-type": "multipart/form-data; boundary=zz"}
        )
        assert_envelope(resp, 400)
        await assert_nothing_left()

    async def test_unknown_tenant_is_404(self, admin: httpx.AsyncClient, assert_nothing_left) -> None:  # type: ignore[no-untyped-def]
        resp = await upload(admin, adapter_files(), url="/admin/v1/tenants/nobody/adapters")
        assert_envelope(resp, 404, "not_found")
        await assert_nothing_left()

    async def test_unknown_base_model_override_is_404(
        self, admin: httpx.AsyncClient, assert_nothing_left
    ) -> None:  # type: ignore[no-untyped-def]
        assert_envelope(await upload(admin, adapter_files(), base_model="nope"), 404)
        await assert_nothing_left()

    async def test_failure_after_publish_removes_the_new_folder(
        self,
        admin: httpx.AsyncClient,
        engine: AsyncEngine,
        assert_nothing_left,  # type: ignore[no-untyped-def]
    ) -> None:
        # Fault injection: the insert fails after the files were published (as a concurrent tenant
        # delete or a lost DB connection would make it). A trigger makes that failure deterministic.
        async with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                await conn.execute(
                    text(
                        "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                        "RAISE EXCEPTION 'injected failure'; END $$ LANGUAGE plpgsql"
                    )
                )
                await conn.execute(
                    text(
                        "CREATE TRIGGER refuse_adapters BEFORE INSERT ON adapters "
                        "FOR EACH ROW EXECUTE FUNCTION refuse()"
                    )
                )
            else:
                await conn.execute(
                    text(
                        "CREATE TRIGGER refuse_adapters BEFORE INSERT ON adapters "
                        "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
                    )
                )
        try:
            resp = await upload(admin, adapter_files())
            assert_envelope(resp, 500)
            await assert_nothing_left()
        finally:
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "DROP TRIGGER refuse_adapters"
                        + (" ON adapters" if engine.dialect.name == "postgresql" else "")
                    )
                )


async def test_upload_without_admin_key(client: httpx.AsyncClient, settings: Settings) -> None:
    resp = await client.post(URL, data={"name": "x"}, files=multipart(adapter_files()))
    assert_envelope(resp, 401, "invalid_api_key")
    assert stored_files(settings) == []


@pytest.mark.usefixtures("world")
async def test_concurrent_uploads_of_one_name_get_distinct_versions(admin: httpx.AsyncClient) -> None:
    import asyncio

    responses = await asyncio.gather(*(upload(admin, adapter_files(seed=i)) for i in range(6)))
    assert [r.status_code for r in responses] == [201] * 6, [r.text for r in responses]
    assert sorted(r.json()["version"] for r in responses) == [1, 2, 3, 4, 5, 6]


@pytest.mark.usefixtures("world")
class TestAdapterUpdate:
    async def test_pin_and_disable(self, admin: httpx.AsyncClient, client: httpx.AsyncClient) -> None:
        body = (await upload(admin, adapter_files())).json()
        assert body["pinned"] is False
        resp = await admin.patch(f"/admin/v1/adapters/{body['id']}", json={"pinned": True})
        assert resp.status_code == 200 and resp.json()["pinned"] is True
        key = (await registry.api_key(admin))["key"]
        listed = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert "support" in {m["id"] for m in listed.json()["data"]}
        resp = await admin.patch(f"/admin/v1/adapters/{body['id']}", json={"state": "disabled"})
        assert resp.json()["state"] == "disabled"
        listed = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert "support" not in {m["id"] for m in listed.json()["data"]}

    @pytest.mark.parametrize(
        "patch", [{"pinned": "yes"}, {"state": "deleted"}, {"state": "gone"}, {"rank": 4}]
    )
    async def test_bad_update_is_400(self, admin: httpx.AsyncClient, patch: dict[str, object]) -> None:
        body = (await upload(admin, adapter_files())).json()
        assert_envelope(await admin.patch(f"/admin/v1/adapters/{body['id']}", json=patch), 400)
        assert (await admin.get(f"/admin/v1/adapters/{body['id']}")).json() == body

    async def test_unknown_adapter_is_404(self, admin: httpx.AsyncClient) -> None:
        resp = await admin.patch(
            "/admin/v1/adapters/00000000-0000-0000-0000-000000000000", json={"pinned": True}
        )
        assert_envelope(resp, 404, "not_found")
