"""Touching the models dir without following a symbolic link or replacing what exists.

Every folder on the way to a file is opened with O_NOFOLLOW from the folder above it (the models
dir itself is the user's choice and may be a link), so a link planted anywhere below it stops the
walk instead of leading elsewhere; files are put in place under names that must not exist yet.
The manifest an install leaves in its folder is what makes the folder, and its files, ours.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import msgspec

from gateway.config import BACKENDS_FILE_NAMES
from gateway.gallery.index import check_relative
from gateway.safe_yaml import YAMLLoadError, load_yaml

#: In each installed model's folder: the entry and the files its install wrote.
MANIFEST = ".hearth-manifest.json"
_MANIFEST_BYTES = 4 * 1024 * 1024
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: link(2) failing with these means the filesystem has no hard links (FAT, some network mounts).
_NO_LINKS = {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
_CHUNK = 1 << 20


class UnsafePath(Exception):
    """A path through a symbolic link, or through something that is not a folder."""


class Folder:
    """A folder of the models dir, open, and reached without following a link."""

    def __init__(self, descriptor: int, relative: str) -> None:
        self.fd = descriptor
        #: Its path from the models dir ("" for the models dir), for messages.
        self.relative = relative

    @classmethod
    def root(cls, models_dir: Path) -> Folder:
        """The models dir itself (OSError if it cannot be opened)."""
        return cls(os.open(models_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), "")

    def __enter__(self) -> Folder:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def path_of(self, name: str) -> str:
        return f"{self.relative}/{name}" if self.relative else name

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def stat(self, name: str) -> os.stat_result | None:
        """`name`'s own status (a link is a link), or None if there is nothing by that name."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def child(self, name: str, *, create: bool = False) -> Folder | None:
        """The folder `name` in this one: None if absent (made, with `create`). UnsafePath: it
        is a link or not a folder."""
        try:
            return Folder(os.open(name, _FOLDER_FLAGS, dir_fd=self.fd), self.path_of(name))
        except FileNotFoundError:
            if not create:
                return None
        except OSError:  # ELOOP: a link; ENOTDIR: a file
            raise UnsafePath(f"{self.path_of(name)} is a symbolic link or not a folder") from None
        with contextlib.suppress(FileExistsError):  # made meanwhile: opened (and checked) below
            os.mkdir(name, 0o755, dir_fd=self.fd)
        return self.child(name)

    def walk(self, parts: list[str], *, created: list[str] | None = None) -> Folder | None:
        """The folder at `parts` below this one, as a new Folder (even for no parts): None if
        one on the way is absent, unless `created` is given: then absent ones are made, and
        their paths added to it."""
        current = Folder(os.dup(self.fd), self.relative)
        for part in parts:
            try:
                existed = created is None or current.stat(part) is not None
                following = current.child(part, create=created is not None)
            finally:
                current.close()
            if following is None:
                return None
            if not existed and created is not None:
                created.append(following.relative)
            current = following
        return current

    def file_at(self, path: str) -> tuple[Folder, str] | None:
        """The folder holding the regular file at `path` below this one (every step reached
        without links), as a new Folder for the caller to close, and the file's name; None if
        there is no such file."""
        *parents, base = path.split("/")
        parent = self.walk(parents)
        if parent is None:
            return None
        state = parent.stat(base)
        if state is None or not stat.S_ISREG(state.st_mode):
            parent.close()
            return None
        return parent, base

    def read(self, name: str, limit: int) -> bytes:
        """A regular file's bytes, at most `limit` of them (OSError: a link, or not a file)."""
        descriptor = os.open(name, _FILE_FLAGS, dir_fd=self.fd)
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise OSError(errno.EINVAL, f"{self.path_of(name)} is not a regular file")
            return handle.read(limit)

    def sha256(self, name: str) -> str:
        """A regular file's sha256 (OSError: a link, or not a file)."""
        digest = hashlib.sha256()
        descriptor = os.open(name, _FILE_FLAGS, dir_fd=self.fd)
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise OSError(errno.EINVAL, f"{self.path_of(name)} is not a regular file")
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def place(self, source: Path, name: str) -> None:
        """Move the file `source` here as `name`, which must not exist (FileExistsError): a
        hard link, which never replaces anything, then the source's removal."""
        try:
            os.link(source, name, dst_dir_fd=self.fd)
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            # No hard links here: claim the name with O_EXCL, then rename onto our own claim.
            claim = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                            dir_fd=self.fd)  # fmt: skip
            os.close(claim)
            os.rename(source, name, dst_dir_fd=self.fd)
        else:
            os.unlink(source)

    def unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)

    def rmdir(self, name: str) -> bool:
        """Remove the folder `name` if it is empty; whether it was."""
        try:
            os.rmdir(name, dir_fd=self.fd)
        except OSError:
            return False
        return True


# The manifest ------------------------------------------------------------------------------------


class ManifestFile(msgspec.Struct, forbid_unknown_fields=True):
    #: Relative to the model's folder.
    path: str
    sha256: str
    size: int


class Manifest(msgspec.Struct, forbid_unknown_fields=True):
    """What an install wrote: the entry's name and its files."""

    entry: str
    files: list[ManifestFile]

    def identity(self) -> set[tuple[str, str]]:
        return {(f.path, f.sha256) for f in self.files}

    def encode(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=2) + b"\n"


def read_manifest(folder: Folder, entry: str) -> Manifest | None:
    """The manifest an install of `entry` left in `folder`; None when there is none of ours (no
    file, a link, unreadable, another entry's, or naming a path outside the folder)."""
    try:
        manifest = msgspec.json.decode(folder.read(MANIFEST, _MANIFEST_BYTES), type=Manifest)
    except (OSError, msgspec.DecodeError):
        return None
    if manifest.entry != entry:
        return None
    try:
        for file in manifest.files:
            check_relative(file.path, "path")
    except ValueError:
        return None
    return manifest


# Model YAML files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFile:
    """A model YAML of the models dir, read leniently: the name and model path it gives, if any."""

    filename: str
    name: str | None
    model: str | None


def model_files(models_dir: Path) -> list[ModelFile]:
    """Every YAML file of the models dir but backends.yaml, even ones the gateway refuses."""
    found = []
    for path in sorted(models_dir.iterdir()):
        if path.suffix.lower() not in (".yaml", ".yml") or path.name.lower() in BACKENDS_FILE_NAMES:
            continue
        data = None
        with contextlib.suppress(YAMLLoadError):
            data = load_yaml(path)
        name = data.get("name") if isinstance(data, dict) else None
        model = data.get("model") if isinstance(data, dict) else None
        found.append(
            ModelFile(
                path.name,
                name if isinstance(name, str) else None,
                model if isinstance(model, str) else None,
            )
        )
    return found
