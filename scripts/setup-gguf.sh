#!/usr/bin/env bash
# Builds the GGUF export step's environment: its own venv with the pins of requirements/gguf.txt plus
# llama-cpp-python built from its sdist, whose vendored llama.cpp converter (convert_hf_to_gguf.py, its
# conversion/ package and its own gguf-py) is unpacked into VENV_DIR/share/llama.cpp. Only
# `python -m app.promotion.ml.gguf` runs in it (with PYTHONPATH at the repository root).
#
# Usage: scripts/setup-gguf.sh [VENV_DIR]   (default: .venv-gguf in the repository root)
# Env:   PYTHON (default python3) is the interpreter the venv is created from. torch==2.13.0+cpu
#        comes from this machine's pip find-links; elsewhere pip takes PyPI's (CUDA) torch 2.13.0, or
#        point it at a CPU build, e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
#        GGUF_BUILD_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/lora-gateway/gguf) keeps the sdist and the
#        wheel built from it, so a venv made again (make clean, a new checkout) skips the compile.
#        GGUF_BUILD_JOBS (default: nproc) is the compile's parallelism.
#
# The build is the smallest that quantizes (llama_model_quantize, what llama-quantize runs) and loads a
# GGUF: libllama and ggml's CPU backend only. llama-cpp-python forces llama.cpp's `common` library on
# (its Python API never uses it) and builds the multimodal mtmd library by default: the sdist's
# CMakeLists.txt is patched to leave common out and LLAVA_BUILD=OFF leaves mtmd out. GGML_NATIVE=OFF
# makes the wheel portable (AVX2/FMA/F16C baseline, not this CPU's every extension).
#
# Idempotent: a stamp in the venv records a hash of the pins file and of this script; when it matches,
# nothing is done. An interrupted run leaves no stamp and simply resumes.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv_dir=${1:-$repo_root/.venv-gguf}
python=${PYTHON:-python3}
jobs=${GGUF_BUILD_JOBS:-$(nproc)}
cache=${GGUF_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-gateway/gguf}

llama_cpp_python_version=0.3.36
llama_cpp_python_sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
cmake_args="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DGGML_CCACHE=OFF -DLLAMA_OPENSSL=OFF"

requirements=$repo_root/requirements/gguf.txt
script=$repo_root/scripts/setup-gguf.sh
stamp=$venv_dir/.lora-gateway-gguf.stamp

want=$(cat "$requirements" "$script" | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
    echo "GGUF venv $venv_dir is up to date"
    exit 0
fi

started=$SECONDS
phase_started=$SECONDS
phase() { echo "setup-gguf: $1 ($((SECONDS - phase_started)) s)"; phase_started=$SECONDS; }

if [[ ! -x $venv_dir/bin/python ]]; then
    echo "creating venv $venv_dir"
    "$python" -m venv "$venv_dir"
fi
rm -f "$stamp"
pip=("$venv_dir/bin/python" -m pip --quiet --disable-pip-version-check)
"${pip[@]}" install -r "$requirements"
phase "requirements installed"

work=$(mktemp -d "${TMPDIR:-/tmp}/setup-gguf.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$cache"

# The sdist: from the cache, else from the registry (pip download), checked against its pinned sha256.
sdist=$cache/llama_cpp_python-$llama_cpp_python_version.tar.gz
if [[ ! -f $sdist ]] || ! sha256sum --check --status <<<"$llama_cpp_python_sha256  $sdist"; then
    "${pip[@]}" download --no-deps --no-binary :all: --no-build-isolation -d "$work/download" \
        "llama-cpp-python==$llama_cpp_python_version"
    got=$(sha256sum "$work/download/llama_cpp_python-$llama_cpp_python_version.tar.gz" | cut -d' ' -f1)
    if [[ $got != "$llama_cpp_python_sha256" ]]; then
        echo "setup-gguf: llama-cpp-python $llama_cpp_python_version sdist has sha256 $got," \
            "expected $llama_cpp_python_sha256" >&2
        exit 1
    fi
    mv "$work/download/llama_cpp_python-$llama_cpp_python_version.tar.gz" "$sdist.partial"
    mv "$sdist.partial" "$sdist"
    phase "sdist downloaded"
fi
tar -xzf "$sdist" -C "$work"
src=$work/llama_cpp_python-$llama_cpp_python_version
llama_cpp=$src/vendor/llama.cpp

# The wheel: from the cache when this very recipe (sdist, CMake arguments, patch, CPU architecture) built it.
common_off='s/set(LLAMA_BUILD_COMMON ON CACHE BOOL "Build llama.cpp common library" FORCE)/set(LLAMA_BUILD_COMMON OFF CACHE BOOL "Build llama.cpp common library" FORCE)/'
recipe=$(printf '%s\n' "$llama_cpp_python_sha256" "$cmake_args" "$common_off" "$(uname -m)" | sha256sum | cut -c1-16)
wheel_dir=$cache/wheels/$recipe
shopt -s nullglob
wheels=("$wheel_dir"/llama_cpp_python-"$llama_cpp_python_version"-*.whl)
shopt -u nullglob
if ((${#wheels[@]} == 0)); then
    # Leave llama.cpp's common library out: llama-cpp-python sets it ON with FORCE, so no -D reaches it.
    cmakelists=$src/CMakeLists.txt
    sed -i "$common_off" "$cmakelists"
    if grep -q 'set(LLAMA_BUILD_COMMON ON' "$cmakelists"; then
        echo "setup-gguf: could not turn llama.cpp's common library off in $cmakelists" >&2
        exit 1
    fi
    echo "setup-gguf: compiling llama-cpp-python $llama_cpp_python_version (libllama + ggml CPU," \
        "$jobs jobs; a few minutes on 2 cores)"
    CMAKE_ARGS=$cmake_args CMAKE_BUILD_PARALLEL_LEVEL=$jobs \
        "${pip[@]}" wheel --no-build-isolation --no-deps -w "$work/wheel" "$src"
    mkdir -p "$wheel_dir"
    for w in "$work"/wheel/*.whl; do
        mv "$w" "$wheel_dir/$(basename "$w").partial"
        mv "$wheel_dir/$(basename "$w").partial" "$wheel_dir/$(basename "$w")"
    done
    wheels=("$wheel_dir"/llama_cpp_python-"$llama_cpp_python_version"-*.whl)
    phase "llama-cpp-python compiled"
fi
"${pip[@]}" install --no-deps --force-reinstall "${wheels[0]}"

# The converter, from the same llama.cpp the bindings were built from.
share=$venv_dir/share/llama.cpp
rm -rf "$share.partial"
mkdir -p "$share.partial"
cp -r "$llama_cpp/convert_hf_to_gguf.py" "$llama_cpp/conversion" "$llama_cpp/gguf-py" "$llama_cpp/LICENSE" \
    "$share.partial/"
rm -rf "$share.partial/gguf-py/tests" "$share.partial/gguf-py/examples"
printf 'llama.cpp vendored in llama-cpp-python %s (sdist sha256 %s)\n' \
    "$llama_cpp_python_version" "$llama_cpp_python_sha256" >"$share.partial/SOURCE"
rm -rf "$share"
mv "$share.partial" "$share"
phase "llama-cpp-python installed, converter in $share"

# The pinned set must hang together (pip check), and the step's imports must load: the bindings (so
# libllama links), and the converter with its own gguf-py.
"$venv_dir/bin/python" -m pip check
"$venv_dir/bin/python" - "$share" <<'EOF'
import sys
from pathlib import Path

share = Path(sys.argv[1]).resolve()
sys.path[:0] = [str(share / "gguf-py"), str(share)]
import gguf  # noqa: E402

assert Path(gguf.__file__).resolve().is_relative_to(share), gguf.__file__
import convert_hf_to_gguf  # noqa: E402, F401
import llama_cpp  # noqa: E402
import sentencepiece  # noqa: E402, F401
import torch  # noqa: E402, F401
import transformers  # noqa: E402, F401

assert hasattr(llama_cpp, "llama_model_quantize")
EOF

printf '%s\n' "$want" >"$stamp"
echo "GGUF venv $venv_dir ready in $((SECONDS - started)) s"
