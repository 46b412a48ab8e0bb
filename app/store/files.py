"""Content-addressed adapter files: staged in a private temp folder, validated, then renamed into place."""

from __future__ import annotations

import hashlib
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from app.errors import InvalidRequest, PayloadTooLarge

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_CHUNK = 1 << 20


class InvalidUpload(InvalidRequest):
    code = "invalid_upload"


@dataclass
class StagedAdapter:
    """Two files in a temp folder of the store, with their combined content digest."""

    folder: Path
    sha256: str
    size_bytes: int

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_NAME

    @property
    def weights_path(self) -> Path:
        return self.folder / WEIGHTS_NAME


class _Budget:
    def __init__(self, limit: int) -> None:
        self.left = limit
        self.limit = limit

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise PayloadTooLarge(f"adapter files exceed the {self.limit} byte limit")


# An adapter is two files; an archive holding more than this many members is not one.
MAX_ARCHIVE_MEMBERS = 64
_TOO_MANY_MEMBERS = f"archive holds more than {MAX_ARCHIVE_MEMBERS} members; an adapter is two files"


def _refuse_pickle(name: str) -> None:
    if name.lower().endswith(_PICKLE_SUFFIXES):
        raise InvalidUpload(
            f"{name!r} is a pickle checkpoint, which can run code when loaded; upload "
            f"{WEIGHTS_NAME} instead (peft: save_pretrained(..., safe_serialization=True))",
            param="file",
        )


def _copy(src: IO[bytes], dst: Path, budget: _Budget) -> str:
    digest = hashlib.sha256()
    with open(dst, "xb") as out:
        while chunk := src.read(_CHUNK):
            budget.take(len(chunk))
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _safe_member_path(name: str) -> str:
    """Normalised relative path of an archive member; refuses anything that would leave the folder."""
    if "\\" in name or "\x00" in name:
        raise InvalidUpload(f"archive member {name!r} has an invalid path", param="file")
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm == ".." or norm.startswith("../") or posixpath.isabs(norm):
        raise InvalidUpload(f"archive member {name!r} escapes the adapter folder", param="file")
    return norm


def _pick(names: list[str]) -> tuple[str, str]:
    """Finds the one folder in an archive that holds both adapter files."""
    configs = [n for n in names if posixpath.basename(n) == CONFIG_NAME]
    if len(configs) != 1:
        raise InvalidUpload(
            f"archive must hold exactly one {CONFIG_NAME} (found {len(configs)})", param="file"
        )
    weights = posixpath.join(posixpath.dirname(configs[0]), WEIGHTS_NAME)
    if weights not in names:
        raise InvalidUpload(f"archive has no {WEIGHTS_NAME} beside {configs[0]}", param="file")
    return configs[0], weights


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / ".tmp"

    def path_of(self, storage_path: str) -> Path:
        return self.root / storage_path

    @staticmethod
    def storage_path_for(sha256: str) -> str:
        return f"{sha256[:2]}/{sha256}"

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private folder inside the store (same filesystem, so the final rename is atomic)."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        folder = self._tmp / uuid.uuid4().hex
        folder.mkdir(mode=0o700)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def stage_files(
        self, folder: Path, files: list[tuple[str, BinaryIO]], *, max_bytes: int
    ) -> StagedAdapter:
        """Stages either the two adapter files or one archive holding them."""
        budget = _Budget(max_bytes)
        names = [posixpath.basename(n or "") for n, _ in files]
        for name in names:
            _refuse_pickle(name)
        archives = [i for i, n in enumerate(names) if n.lower().endswith(_ARCHIVE_SUFFIXES)]
        if archives:
            if len(files) != 1:
                raise InvalidUpload(
                    "upload either one archive or the two adapter files, not both", param="file"
                )
            return self._stage_archive(folder, names[0], files[0][1], budget)
        unknown = sorted(set(names) - {CONFIG_NAME, WEIGHTS_NAME})
        if unknown:
            raise InvalidUpload(
                f"unexpected file(s) {unknown}: upload {CONFIG_NAME} and {WEIGHTS_NAME}, or a .tar.gz/.zip of them",
                param="file",
            )
        if sorted(names) != sorted([CONFIG_NAME, WEIGHTS_NAME]):
            raise InvalidUpload(
                f"upload must contain {CONFIG_NAME} and {WEIGHTS_NAME} once each", param="file"
            )
        digests = {
            name: _copy(fobj, folder / name, budget) for name, (_, fobj) in zip(names, files, strict=True)
        }
        return self._finish(folder, digests, budget)

    def _stage_archive(self, folder: Path, name: str, fobj: BinaryIO, budget: _Budget) -> StagedAdapter:
        if name.lower().endswith(".zip"):
            return self._stage_zip(folder, fobj, budget)
        try:
            with tarfile.open(fileobj=fobj, mode="r:*") as tar:
                regular: dict[str, tarfile.TarInfo] = {}
                for count, m in enumerate(tar, 1):  # read one header at a time: the cap comes first
                    if count > MAX_ARCHIVE_MEMBERS:
                        raise InvalidUpload(_TOO_MANY_MEMBERS, param="file")
                    path = _safe_member_path(m.name)
                    if m.issym() or m.islnk():
                        raise InvalidUpload(
                            f"archive member {m.name!r} is a link; links are not accepted", param="file"
                        )
                    if not (m.isfile() or m.isdir()):
                        raise InvalidUpload(f"archive member {m.name!r} is not a regular file", param="file")
                    _refuse_pickle(path)
                    if m.isfile():
                        regular[path] = m
                config, weights = _pick(list(regular))
                digests = {}
                for src, dst in ((config, CONFIG_NAME), (weights, WEIGHTS_NAME)):
                    extracted = tar.extractfile(regular[src])
                    assert extracted is not None  # regular files always extract
                    digests[dst] = _copy(extracted, folder / dst, budget)
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
            raise InvalidUpload(f"{name!r} is not a readable tar archive: {exc}", param="file") from exc
        return self._finish(folder, digests, budget)

    def _stage_zip(self, folder: Path, fobj: BinaryIO, budget: _Budget) -> StagedAdapter:
        try:
            with zipfile.ZipFile(fobj) as zf:
                regular: dict[str, zipfile.ZipInfo] = {}
                if len(zf.infolist()) > MAX_ARCHIVE_MEMBERS:
                    raise InvalidUpload(_TOO_MANY_MEMBERS, param="file")
                for info in zf.infolist():
                    path = _safe_member_path(info.filename)
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise InvalidUpload(
                            f"archive member {info.filename!r} is a link; links are not accepted",
                            param="file",
                        )
                    _refuse_pickle(path)
                    if not info.is_dir():
                        regular[path] = info
                config, weights = _pick(list(regular))
                digests = {}
                for src, dst in ((config, CONFIG_NAME), (weights, WEIGHTS_NAME)):
                    # The budget counts bytes actually inflated, so a zip bomb's false sizes do not matter.
                    with zf.open(regular[src]) as extracted:
                        digests[dst] = _copy(extracted, folder / dst, budget)
        except (
            zipfile.BadZipFile,
            zipfile.LargeZipFile,
            EOFError,
            OSError,
            zlib.error,
            lzma.LZMAError,
        ) as exc:
            raise InvalidUpload(f"upload is not a readable zip archive: {exc}", param="file") from exc
        except (RuntimeError, NotImplementedError) as exc:
            # zipfile's words for an encrypted member and for a compression method it does not know.
            raise InvalidUpload(
                f"zip archive cannot be read: {exc} (use an unencrypted zip, stored or deflated)",
                param="file",
            ) from exc
        return self._finish(folder, digests, budget)

    @staticmethod
    def _finish(folder: Path, digests: dict[str, str], budget: _Budget) -> StagedAdapter:
        # One digest for the pair, so identical adapters share one folder whatever their file names were.
        manifest = "".join(f"{name}\0{digests[name]}\n" for name in (CONFIG_NAME, WEIGHTS_NAME))
        return StagedAdapter(
            folder=folder,
            sha256=hashlib.sha256(manifest.encode()).hexdigest(),
            size_bytes=budget.limit - budget.left,
        )

    def publish(self, staged: StagedAdapter) -> tuple[str, bool]:
        """Moves staged files to their content address; returns (storage path, whether this call created it)."""
        storage_path = self.storage_path_for(staged.sha256)
        final = self.root / storage_path
        if final.is_dir():
            return storage_path, False
        final.parent.mkdir(parents=True, exist_ok=True)
        for f in (staged.config_path, staged.weights_path):
            f.chmod(0o644)
        staged.folder.chmod(0o755)  # backends (another user in k8s) read it
        try:
            os.rename(staged.folder, final)
        except OSError:
            if final.is_dir():  # a concurrent upload of the same content won the race
                return storage_path, False
            raise
        return storage_path, True

    def remove(self, storage_path: str) -> None:
        shutil.rmtree(self.root / storage_path, ignore_errors=True)
