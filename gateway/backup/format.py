"""The backup archive's format: a tar of the models dir's files under `models/`, then a manifest.

The manifest, `hearth-backup.json`, is the archive's last member: it is written once every file
has been streamed in and hashed, so a file is read once, and an archive cut short has no
manifest and is refused as a whole. It lists each file's path (relative to the models dir),
kind, size, sha256, mtime (nanoseconds) and mode; the tar headers carry the same files, and a
restore refuses an archive where the two disagree in any way.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

import msgspec

from gateway.units import format_size

#: The manifest's name in the archive; every file of the models dir is under MEMBER_PREFIX.
MANIFEST_MEMBER = "hearth-backup.json"
MEMBER_PREFIX = "models/"
FORMAT: Literal["hearth-backup"] = "hearth-backup"
FORMAT_VERSION = 1
#: A manifest is some 250 bytes a file: this is room for a quarter of a million files.
MANIFEST_LIMIT = 64 * 1024 * 1024
#: Archive names that are gzip-compressed (any other name: a plain tar).
GZIP_SUFFIXES = (".tar.gz", ".tgz")
CHUNK = 1 << 20

Kind = Literal["yaml", "adapter", "manifest", "state", "model"]
#: The order of kinds in an archive (the small files first, for a reader of `tar tf`).
KIND_ORDER: tuple[Kind, ...] = ("yaml", "manifest", "state", "adapter", "model")


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why, for the user."""


class DamagedBackup(BackupError):
    """An archive that is not a whole, unaltered Hearth backup."""


class BackupFile(msgspec.Struct, kw_only=True):
    """One file of the backup, as the manifest lists it."""

    #: Relative to the models dir, '/'-separated.
    path: str
    kind: Kind
    size: Annotated[int, msgspec.Meta(ge=0)]
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    mtime_ns: int
    mode: Annotated[int, msgspec.Meta(ge=0, le=0o7777)]


class LeftOut(msgspec.Struct, kw_only=True):
    """A model file the backup does not hold (made without --models)."""

    path: str
    size: int


class BackupManifest(msgspec.Struct, kw_only=True):
    """The archive's table of contents: what a restore verifies every member against."""

    format: Literal["hearth-backup"]
    version: int
    #: When the backup was made, ISO 8601 in UTC.
    created: str
    hearth_version: str
    #: The models dir it was made from (absolute), for the user's information.
    models_dir: str
    #: Whether model files (weights) are in it.
    model_files: bool
    files: list[BackupFile]
    left_out: list[LeftOut] = msgspec.field(default_factory=list)

    def encode(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=1) + b"\n"


def check_path(path: str) -> None:
    """A file path a backup may hold: relative to the models dir, one spelling, no '..', not
    in a staging folder; ValueError otherwise."""
    pure = PurePosixPath(path)
    if (
        not path
        or "\x00" in path
        or "\\" in path
        or pure.is_absolute()
        or str(pure) != path  # one spelling per file: no "a//b", "./a", "a/"
        or any(part in (".", "..") for part in pure.parts)
    ):
        raise ValueError(f"{path!r} is not a plain relative path inside the models dir")
    if pure.parts[0].startswith(".hearth-"):  # install and restore staging folders
        raise ValueError(f"{path!r} is in a staging folder")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{path!r} is not a UTF-8 name") from None


def describe_size(count: int) -> str:
    """A size as a person reads it: bytes, KiB, MiB or GiB."""
    if count < 1024:
        return f"{count} bytes"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return format_size(count)


def hearth_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hearth")
    except PackageNotFoundError:
        return "unknown"


def compresses(archive: Path) -> bool:
    """Whether a backup written to `archive` is gzip-compressed (its name ends .tar.gz/.tgz)."""
    return archive.name.lower().endswith(GZIP_SUFFIXES)
