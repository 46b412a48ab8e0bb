"""Content-addressed artifacts of promotion steps: <root>/<kind>/<key>/, where key is the sha256 of
everything the step's output depends on (its inputs' digests and parameters). A step whose key exists is
not run again (a retried or resumed job reuses it); one that runs writes into a temporary folder that is
renamed into place only once complete, so no half-written artifact is ever found under its key."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Artifact:
    kind: str  # "merged", "awq", "gguf"
    key: str
    path: Path
    size_bytes: int
    sha256: str  # of the manifest: every file's name, size and sha256

    def describe(self, root: Path) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": f"{self.kind}-{self.key[:12]}",
            "key": self.key,
            "path": str(self.path.relative_to(root)),
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
        }


def key_of(**inputs: Any) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> dict[str, Any]:
    files = [
        {"name": str(p.relative_to(folder)), "size_bytes": p.stat().st_size, "sha256": _file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    ]
    manifest = {"files": files, "size_bytes": sum(int(str(f["size_bytes"])) for f in files)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _artifact(kind: str, key: str, folder: Path) -> Artifact:
    raw = (folder / MANIFEST).read_bytes()
    manifest = json.loads(raw)
    return Artifact(kind, key, folder, int(manifest["size_bytes"]), hashlib.sha256(raw).hexdigest())


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get(self, kind: str, key: str) -> Artifact | None:
        """The complete artifact under this key, if there is one."""
        folder = self.path(kind, key)
        if not (folder / MANIFEST).is_file():
            return None
        return _artifact(kind, key, folder)

    def staging(self, job_id: str) -> Path:
        """A fresh folder to build into (on the same filesystem, so the final rename is atomic)."""
        folder = self.root / ".staging" / f"{job_id}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        return folder

    def commit(self, kind: str, key: str, staged: Path) -> Artifact:
        """Seals a staged folder and moves it under its key; if another run got there first, theirs wins
        and this copy is deleted (both are the same content)."""
        _write_manifest(staged)
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, final)
        except OSError:
            if self.get(kind, key) is None:
                raise
            shutil.rmtree(staged, ignore_errors=True)
        return _artifact(kind, key, final)

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def sweep_staging(self, job_id: str) -> int:
        """Removes what an earlier run of this job left half-built (called when a worker claims the job:
        only the lease holder runs it, so nothing else writes there)."""
        staging = self.root / ".staging"
        if not staging.is_dir():
            return 0
        gone = 0
        for folder in staging.glob(f"{job_id}-*"):
            shutil.rmtree(folder, ignore_errors=True)
            gone += 1
        return gone
