"""`hearth backup`: stream the chosen files of the models dir into a tar, hashing each on the
way, then append the manifest; the archive is a temporary file until it is whole."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from gateway.backup.collect import Candidate, Selection, collect
from gateway.backup.format import (
    CHUNK,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_MEMBER,
    MEMBER_PREFIX,
    BackupError,
    BackupFile,
    BackupManifest,
    LeftOut,
    compresses,
    hearth_version,
)


@dataclass
class BackupResult:
    """What `write_backup` wrote, and what it left out."""

    archive: Path
    manifest: BackupManifest
    selection: Selection
    #: The archive's size on disk.
    archive_bytes: int


class _HashingReader:
    """A file read through once: hashed and counted on the way into the archive."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.handle.read(size)
        self.digest.update(chunk)
        self.count += len(chunk)
        return chunk


def write_backup(
    models_dir: Path, archive: Path, *, model_files: bool = False, replace: bool = False
) -> BackupResult:
    """Write the models dir's files (its model files too with `model_files`) into `archive`:
    a temporary file beside it, renamed onto it once complete. BackupError: it cannot be."""
    if not models_dir.is_dir():
        raise BackupError(f"there is no models dir at {models_dir}")
    root = models_dir.resolve()
    target = archive.parent.resolve() / archive.name
    if target.is_relative_to(root):
        raise BackupError(
            f"{archive} is inside the models dir {models_dir}, which it backs up: write it "
            "somewhere else"
        )
    if target.is_dir():
        raise BackupError(f"{archive} is a folder")
    if target.exists() and not replace:
        raise BackupError(f"{archive} exists; give --force to replace it")
    try:
        selection = collect(models_dir, model_files=model_files)
    except OSError as exc:
        raise BackupError(f"cannot read the models dir {models_dir}: {exc}") from None
    try:
        descriptor, temporary = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".part", dir=target.parent
        )
    except OSError as exc:
        raise BackupError(f"cannot write {archive}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(descriptor, "w+b") as raw:
            manifest = _write_tar(
                raw, models_dir, selection, model_files=model_files, compress=compresses(target)
            )
            raw.flush()
            os.fsync(raw.fileno())
            size = raw.tell()
        os.replace(temporary, target)  # mkstemp made it 0600: a backup stays private
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise BackupError(f"cannot write {archive}: {exc}") from None
        raise
    return BackupResult(archive, manifest, selection, size)


def _write_tar(
    raw: BinaryIO, models_dir: Path, selection: Selection, *, model_files: bool, compress: bool
) -> BackupManifest:
    files: list[BackupFile] = []
    # Weights do not compress, so a plain tar is the default; gzip only when the name asks.
    mode: Literal["w:gz", "w"] = "w:gz" if compress else "w"
    with tarfile.open(fileobj=raw, mode=mode, format=tarfile.PAX_FORMAT) as tar:
        # addfile copies in pieces of this size (16 KiB by default); typeshed lacks it.
        tar.copybufsize = CHUNK  # type: ignore[attr-defined]
        for candidate in selection.files:
            files.append(_add_file(tar, models_dir, candidate))
        manifest = BackupManifest(
            format=FORMAT,
            version=FORMAT_VERSION,
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            hearth_version=hearth_version(),
            models_dir=str(models_dir.resolve()),
            model_files=model_files,
            files=files,
            left_out=[LeftOut(path=c.path, size=c.size) for c in selection.left_out],
        )
        data = manifest.encode()
        info = tarfile.TarInfo(MANIFEST_MEMBER)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = int(datetime.datetime.now().timestamp())
        tar.addfile(info, io.BytesIO(data))
    return manifest


def _add_file(tar: tarfile.TarFile, models_dir: Path, candidate: Candidate) -> BackupFile:
    """Stream one file into the archive, hashing it on the way."""
    try:
        descriptor = os.open(
            models_dir / candidate.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        )
    except OSError as exc:
        raise BackupError(f"cannot read {candidate.path}: {exc.strerror or exc}") from None
    with os.fdopen(descriptor, "rb") as handle:
        state = os.fstat(descriptor)
        if not stat.S_ISREG(state.st_mode):
            raise BackupError(f"{candidate.path} stopped being a regular file during the backup")
        info = tarfile.TarInfo(MEMBER_PREFIX + candidate.path)
        info.size = state.st_size
        info.mtime = state.st_mtime_ns / 1e9  # pax keeps fractions
        info.mode = stat.S_IMODE(state.st_mode)
        reader = _HashingReader(handle)
        try:
            tar.addfile(info, reader)  # reads exactly info.size bytes, or fails
        except OSError:
            if reader.count < info.size:  # it shrank while being read
                raise BackupError(
                    f"{candidate.path} changed while it was being backed up: run the backup "
                    "again when nothing writes to it"
                ) from None
            raise
    return BackupFile(
        path=candidate.path,
        kind=candidate.kind,
        size=reader.count,
        sha256=reader.digest.hexdigest(),
        mtime_ns=state.st_mtime_ns,
        mode=stat.S_IMODE(state.st_mode),
    )
