"""Registers the chart's base models and vLLM backends with the gateway's admin API; run by the chart's
post-install/post-upgrade hook Job (templates/registration-job.yaml). Idempotent: each base model is
created when missing (base models have no PATCH: one registered with another path is an error), each
backend is created when missing and patched to the chart's sizes and API key otherwise (a backend
registered with another URL or base model is an error: delete it first). Backends removed from the values
are left alone (deleting one drops the adapters loaded there): delete them through the admin API.

Standard library only, so that any Python image runs it. Environment:
  GATEWAY_URL             the gateway's base URL
  GATEWAY_ADMIN_API_KEY   the admin key
  LGW_REGISTRATION_FILE   a JSON file: {"base_models": [BaseModelCreate...], "backends": [BackendCreate...
                          with "api_key_env": ENV_NAME instead of "api_key"]} (or LGW_REGISTRATION: the JSON)
  LGW_WAIT_S              how long to wait for the gateway (and to retry while it answers 5xx), default 600
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

PATCHED = ("gpu_slots", "max_lora_rank", "capacity", "max_num_seqs")


class Failed(Exception):
    pass


class Admin:
    def __init__(self, url: str, key: str, wait_s: float) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.deadline = time.monotonic() + wait_s

    def _once(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.key}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw) if raw else None
            except ValueError:
                return e.code, {"error": {"message": raw[:500].decode("utf-8", "replace")}}

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One admin call, retried while the gateway cannot be reached or answers 5xx (its database may
        still be starting), until the deadline."""
        while True:
            try:
                status, answer = self._once(method, path, body)
                if status < 500:
                    return status, answer
                problem = f"{status} {message(answer)}"
            except (urllib.error.URLError, OSError) as e:
                problem = str(e)
            if time.monotonic() > self.deadline:
                raise Failed(f"{method} {path}: {problem}")
            print(f"waiting for the gateway ({method} {path}: {problem})", flush=True)  # noqa: T201
            time.sleep(3)

    def wait_alive(self) -> None:
        status, answer = self.call("GET", "/healthz")
        if status != 200:
            raise Failed(f"/healthz answered {status} {message(answer)}")


def message(answer: Any) -> str:
    try:
        return str(answer["error"]["message"])
    except (KeyError, TypeError):
        return json.dumps(answer)[:500]


def quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def register_base_model(admin: Admin, model: dict[str, Any]) -> str:
    name = model["name"]
    status, found = admin.call("GET", f"/admin/v1/base-models/{quoted(name)}")
    if status == 200:
        if found.get("name") != name:
            raise Failed(f"base model {name!r}: the gateway resolves it to {found.get('name')!r}")
        if found.get("path") != model["path"]:
            raise Failed(
                f"base model {name!r} is registered with path {found.get('path')!r}, the values say "
                f"{model['path']!r}: base models cannot be changed; delete it (DELETE /admin/v1/base-models/"
                f"{name}, once no backend or adapter uses it) or give the new one another name"
            )
        return "unchanged"
    if status != 404:
        raise Failed(f"reading base model {name!r}: {status} {message(found)}")
    status, answer = admin.call("POST", "/admin/v1/base-models", model)
    if status != 201:
        raise Failed(f"creating base model {name!r}: {status} {message(answer)}")
    return "created"


def register_backend(admin: Admin, backend: dict[str, Any]) -> str:
    name = backend["name"]
    key_env = backend.pop("api_key_env", None)
    if key_env:
        key = os.environ.get(key_env, "")
        if not key:
            raise Failed(f"backend {name!r}: ${key_env} (its API key) is empty")
        backend["api_key"] = key
    for _ in range(3):  # a create that races another run's: read it again and patch
        status, found = admin.call("GET", f"/admin/v1/backends/{quoted(name)}")
        if status == 404:
            status, answer = admin.call("POST", "/admin/v1/backends", backend)
            if status == 201:
                return "created"
            if status == 409:
                continue
            raise Failed(f"creating backend {name!r}: {status} {message(answer)}")
        if status != 200:
            raise Failed(f"reading backend {name!r}: {status} {message(found)}")
        for field in ("url", "base_model"):
            if found.get(field) != backend[field].rstrip("/"):
                raise Failed(
                    f"backend {name!r} is registered with {field} {found.get(field)!r}, the values say "
                    f"{backend[field]!r}: that cannot be patched; delete the backend (DELETE "
                    f"/admin/v1/backends/{name}) and run the upgrade again"
                )
        patch = {field: backend.get(field) for field in PATCHED}
        if patch["capacity"] is None:
            patch["capacity"] = patch["gpu_slots"]
        if "api_key" in backend:
            patch["api_key"] = backend["api_key"]
        status, answer = admin.call("PATCH", f"/admin/v1/backends/{quoted(name)}", patch)
        if status != 200:
            raise Failed(f"patching backend {name!r}: {status} {message(answer)}")
        return "patched"
    raise Failed(f"backend {name!r} kept appearing and vanishing")


def main() -> int:
    if os.environ.get("LGW_REGISTRATION_FILE"):
        with open(os.environ["LGW_REGISTRATION_FILE"], encoding="utf-8") as f:
            spec = json.load(f)
    else:
        spec = json.loads(os.environ["LGW_REGISTRATION"])
    admin = Admin(
        os.environ["GATEWAY_URL"], os.environ["GATEWAY_ADMIN_API_KEY"], float(os.environ.get("LGW_WAIT_S", "600"))
    )
    try:
        admin.wait_alive()
        for model in spec.get("base_models", []):
            print(f"base model {model['name']}: {register_base_model(admin, model)}", flush=True)  # noqa: T201
        for backend in spec.get("backends", []):
            print(f"backend {backend['name']}: {register_backend(admin, dict(backend))}", flush=True)  # noqa: T201
    except Failed as e:
        print(f"registration failed: {e}", file=sys.stderr, flush=True)  # noqa: T201
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
