"""The compose file's `model-download` one-shot: the base model from the Hugging Face Hub into the
`models` volume, at /models/$MODEL_NAME, once.

Runs in the vLLM image (it has huggingface_hub). Env: MODEL (a Hub repository id), MODEL_REVISION
(branch, tag or commit; default main), MODEL_NAME (the folder and the name it is served and registered
under), HF_TOKEN (for gated models). A folder that holds a finished download of the same repository and
revision is kept as it is (no network); a different or unfinished one is completed or replaced.
Weights are taken in safetensors only (the merge step and the gateway read nothing else).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

MODELS = Path(os.environ.get("MODELS_DIR", "/models"))
MARKER = ".lora-gateway-download.json"
PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def _say(line: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(line + "\n")
    stream.flush()


def main() -> int:
    repo = os.environ["MODEL"]
    revision = os.environ.get("MODEL_REVISION") or "main"
    name = os.environ["MODEL_NAME"]
    if not name or "/" in name or name.startswith("."):
        _say(f"download_model: MODEL_NAME {name!r} must be a plain folder name", err=True)
        return 2
    dest = MODELS / name
    want = {"repo": repo, "revision": revision}
    marker = dest / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == want and (dest / "config.json").is_file():
        _say(f"download_model: {repo}@{revision} already in {dest}")
        return 0
    if marker.is_file():  # another repository or revision under this name: start again
        _say(f"download_model: {dest} holds {marker.read_text().strip()}; replacing it with {want}")
        shutil.rmtree(dest)

    from huggingface_hub import snapshot_download

    _say(f"download_model: {repo}@{revision} -> {dest}")
    snapshot_download(
        repo_id=repo,
        revision=revision,
        local_dir=dest,
        allow_patterns=PATTERNS,
        token=os.environ.get("HF_TOKEN") or None,
    )
    if not (dest / "config.json").is_file() or not any(dest.glob("*.safetensors")):
        _say(f"download_model: {repo} has no config.json or no safetensors weights", err=True)
        return 1
    marker.write_text(json.dumps(want))
    _say(f"download_model: done ({sum(f.stat().st_size for f in dest.rglob('*') if f.is_file()) >> 20} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
