"""`hearth restore`: check a backup whole, then put its files back in the models dir.

Nothing is placed before everything is verified. First the archive's structure: its manifest is
there and well-formed, every member is a regular file under a safe path that the manifest lists
with the same size, and every file the manifest lists is a member. Then the plan: where each file
goes (through no link, into no folder that is a file) and what is there now (the same content:
left alone; a newer file with other content: kept, unless forced). Then one pass over the data:
every member is hashed, and the ones to write are copied into a staging folder inside the models
dir; a member that does not match its sha256 stops the restore, and the staging folder goes.
Only then are the staged files renamed into place, YAML last, each whole and with its archived
mtime (the footprint book's fingerprints compare mtimes).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec

from gateway.backup.format import (
    CHUNK,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_LIMIT,
    MANIFEST_MEMBER,
    MEMBER_PREFIX,
    BackupError,
    BackupFile,
    BackupManifest,
    DamagedBackup,
    check_path,
    describe_size,
)
from gateway.config import resolve_model_path
from gateway.gallery.disk import MANIFEST, Folder, UnsafePath, model_files

#: What a damaged archive (or a file that is no archive) raises while it is read.
_DAMAGE = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)
#: YAML last: a model's YAML names its files, so they should be in place when it appears.
_PLACE_ORDER = ("model", "adapter", "manifest", "state", "yaml")
_DAMAGED = "the archive is damaged or was altered"

Action = Literal["new", "replace", "unchanged", "kept"]


@dataclass
class _Step:
    """One file of the backup and what the restore does with it."""

    file: BackupFile
    action: Action
    #: The file in its place when planned, (size, mtime_ns, inode): to notice a change since.
    seen: tuple[int, int, int] | None = None
    #: Its copy in the staging folder, once verified.
    staged: Path | None = None

    @property
    def writes(self) -> bool:
        return self.action in ("new", "replace")


@dataclass
class RestoreResult:
    """What a restore did (or, dry, would do)."""

    manifest: BackupManifest
    restored: list[BackupFile] = field(default_factory=list)
    unchanged: list[BackupFile] = field(default_factory=list)
    #: Files of the models dir left as they are, and why.
    kept: list[tuple[BackupFile, str]] = field(default_factory=list)
    #: Models whose `model:` path is not in the models dir afterwards, and whether an install
    #: manifest of theirs lets `hearth models install` fetch the files again.
    missing_models: list[tuple[str, bool]] = field(default_factory=list)


def restore_backup(
    archive: Path, models_dir: Path, *, force: bool = False, dry_run: bool = False
) -> RestoreResult:
    """Verify `archive` and restore it into `models_dir` (only verify and plan, with
    `dry_run`). DamagedBackup: not a whole, unaltered backup (nothing written); BackupError: it
    cannot be restored here (nothing written), or placing files failed partway (each file
    placed is whole; the message says how far it got)."""
    with _open(archive) as tar:
        members = tar.getmembers()  # every header: a plain tar's data is seeked over
        manifest = _read_manifest(tar, members)
        present = _check_members(members, manifest)
        steps = _plan(models_dir, manifest, force=force)
        writes = [step for step in steps.values() if step.writes]
        _check_space(models_dir, sum(step.file.size for step in writes))
        result = RestoreResult(manifest)
        with _staging(models_dir, bool(writes) and not dry_run) as staging:
            for index, (path, member) in enumerate(present.items()):
                step = steps[path]
                if staging is not None and step.writes:
                    step.staged = staging / str(index)
                _verify(tar, member, step)
            if staging is None:
                result.restored = [step.file for step in writes]
            else:
                _place(models_dir, writes, result)
    for step in steps.values():
        if step.action == "unchanged":
            result.unchanged.append(step.file)
        elif step.action == "kept":
            result.kept.append((step.file, "newer than the backup (use --force)"))
    if not dry_run:
        result.missing_models = _missing_models(models_dir)
    return result


# Reading the archive ---------------------------------------------------------------------------


@contextlib.contextmanager
def _open(archive: Path) -> Iterator[tarfile.TarFile]:
    if not archive.exists():
        raise BackupError(f"{archive} does not exist")
    if archive.is_dir():
        raise BackupError(f"{archive} is a folder, not a backup")
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115  # closed below
    except _DAMAGE:
        raise DamagedBackup("it is not a Hearth backup: not a tar archive") from None
    except OSError as exc:
        raise BackupError(f"cannot read {archive}: {exc.strerror or exc}") from None
    with tar:
        try:
            yield tar
        except _DAMAGE as exc:
            raise DamagedBackup(f"it is cut short or damaged ({exc})") from None
        except OSError as exc:
            if exc.filename is None and exc.errno is None:  # bz2's "Invalid data stream"
                raise DamagedBackup(f"it is cut short or damaged ({exc})") from None
            raise


def _read_manifest(tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> BackupManifest:
    found = [m for m in members if m.name == MANIFEST_MEMBER]
    if not found:
        raise DamagedBackup(
            f"it has no {MANIFEST_MEMBER}: it is not a Hearth backup, or it was cut short"
        )
    if len(found) > 1:
        raise DamagedBackup(f"it holds {MANIFEST_MEMBER} twice: {_DAMAGED}")
    member = found[0]
    if not member.isreg() or member.size > MANIFEST_LIMIT:
        raise DamagedBackup(f"its {MANIFEST_MEMBER} is not a manifest: {_DAMAGED}")
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    data = source.read()
    if len(data) != member.size:
        raise DamagedBackup(f"its {MANIFEST_MEMBER} is cut short: {_DAMAGED}")
    try:
        head = msgspec.json.decode(data)
    except msgspec.DecodeError:
        raise DamagedBackup(f"its {MANIFEST_MEMBER} is not JSON: {_DAMAGED}") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise DamagedBackup(f"its {MANIFEST_MEMBER} is not a Hearth backup manifest")
    version = head.get("version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise BackupError(
            f"it was made by a newer Hearth ({head.get('hearth_version')}, backup format "
            f"{version}); this one reads format {FORMAT_VERSION}: upgrade Hearth to restore it"
        )
    try:
        return msgspec.json.decode(data, type=BackupManifest)
    except msgspec.ValidationError as exc:
        raise DamagedBackup(f"its {MANIFEST_MEMBER} is invalid ({exc}): {_DAMAGED}") from None


def _check_members(
    members: list[tarfile.TarInfo], manifest: BackupManifest
) -> dict[str, tarfile.TarInfo]:
    """The members by path, in archive order, once the archive holds exactly the files its
    manifest lists, each a regular file of the listed size under a safe path."""
    listed: dict[str, BackupFile] = {}
    for file in manifest.files:
        try:
            check_path(file.path)
        except ValueError as exc:
            raise DamagedBackup(f"its manifest lists an unsafe path: {exc}") from None
        if file.path in listed:
            raise DamagedBackup(f"its manifest lists {file.path} twice: {_DAMAGED}")
        listed[file.path] = file
    folders = {"/".join(p.split("/")[:i]) for p in listed for i in range(1, p.count("/") + 1)}
    clash = sorted(folders & listed.keys())
    if clash:
        raise DamagedBackup(f"{clash[0]} is both a file and a folder in it: {_DAMAGED}")
    present: dict[str, tarfile.TarInfo] = {}
    for member in members:
        if member.name == MANIFEST_MEMBER:
            continue
        if not member.name.startswith(MEMBER_PREFIX):
            raise DamagedBackup(
                f"it holds {member.name!r}, which is not a file of a models dir: {_DAMAGED}"
            )
        if not (member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and member.sparse is None):
            raise DamagedBackup(
                f"{member.name} is {_member_type(member)}, and a Hearth backup holds only "
                f"regular files: {_DAMAGED}"
            )
        path = member.name.removeprefix(MEMBER_PREFIX)
        expected = listed.get(path)
        if path in present:
            raise DamagedBackup(f"it holds {member.name} twice: {_DAMAGED}")
        if expected is None:
            raise DamagedBackup(f"it holds {member.name}, which its manifest does not list")
        if member.size != expected.size:
            raise DamagedBackup(
                f"{member.name} is {member.size} bytes in it, {expected.size} in its manifest: "
                f"{_DAMAGED}"
            )
        present[path] = member
    missing = [path for path in listed if path not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DamagedBackup(
            f"{MEMBER_PREFIX}{missing[0]}{more}, listed in its manifest, is not in it: "
            "it was cut short or altered"
        )
    return present


def _member_type(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.isdir():
        return "a folder"
    if member.isdev():
        return "a device or pipe"
    return "not a regular file"


# Planning --------------------------------------------------------------------------------------


def _plan(models_dir: Path, manifest: BackupManifest, *, force: bool) -> dict[str, _Step]:
    """What to do with each file, from what is in its place now."""
    if not models_dir.exists():
        return {f.path: _Step(f, "new") for f in manifest.files}
    if not models_dir.is_dir():
        raise BackupError(f"the models dir {models_dir} is not a folder")
    steps: dict[str, _Step] = {}
    try:
        with Folder.root(models_dir) as root:
            for file in manifest.files:
                steps[file.path] = _plan_file(root, models_dir, file, force=force)
    except UnsafePath as exc:
        raise BackupError(f"cannot restore into {models_dir}: {exc}; move it away") from None
    except OSError as exc:
        raise BackupError(f"cannot read the models dir {models_dir}: {exc}") from None
    return steps


def _plan_file(root: Folder, models_dir: Path, file: BackupFile, *, force: bool) -> _Step:
    try:
        resolve_model_path(models_dir, file.path)  # a link in the models dir could lead out
    except ValueError as exc:
        raise BackupError(f"cannot restore {file.path}: {exc}") from None
    *parents, base = file.path.split("/")
    parent = root.walk(parents)
    if parent is None:
        return _Step(file, "new")
    with parent:
        state = parent.stat(base)
        if state is None:
            return _Step(file, "new")
        if not stat.S_ISREG(state.st_mode):
            raise BackupError(
                f"cannot restore {file.path}: a symbolic link or a folder is in its place; "
                "move it away"
            )
        seen = (state.st_size, state.st_mtime_ns, state.st_ino)
        if state.st_size == file.size and parent.sha256(base) == file.sha256:
            return _Step(file, "unchanged", seen)
        if state.st_mtime_ns > file.mtime_ns and not force:
            return _Step(file, "kept", seen)
        return _Step(file, "replace", seen)


def _check_space(models_dir: Path, needed: int) -> None:
    existing = models_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return  # nothing to ask: writing will tell
    if needed > free:
        raise BackupError(
            f"restoring needs {describe_size(needed)} free in {models_dir}, and there are "
            f"{describe_size(free)}"
        )


# Verifying and placing --------------------------------------------------------------------------


@contextlib.contextmanager
def _staging(models_dir: Path, wanted: bool) -> Iterator[Path | None]:
    """A private folder in the models dir (on its filesystem, so a rename places a file), gone
    afterwards; a models dir made for it goes too if the restore fails."""
    if not wanted:
        yield None
        return
    made = []
    folder = models_dir
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".hearth-restore-", dir=models_dir))
    except OSError as exc:
        raise BackupError(f"cannot write to the models dir {models_dir}: {exc}") from None
    done = False
    try:
        yield staging
        done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not done:
            for path in made:  # innermost first
                with contextlib.suppress(OSError):
                    path.rmdir()


def _verify(tar: tarfile.TarFile, member: tarfile.TarInfo, step: _Step) -> None:
    """Hash one member (copying it to its staged path, if it has one); DamagedBackup if it is
    not the file the manifest lists."""
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    digest = hashlib.sha256()
    count = 0
    try:
        with source, step.staged.open("xb") if step.staged else contextlib.nullcontext() as out:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                count += len(chunk)
                if out is not None:
                    out.write(chunk)
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
    except OSError as exc:
        if isinstance(exc, _DAMAGE):
            raise
        raise BackupError(f"cannot restore {step.file.path}: {exc}") from None
    if count != step.file.size or digest.hexdigest() != step.file.sha256:
        raise DamagedBackup(f"{member.name} does not match its sha256 in the manifest: {_DAMAGED}")


def _place(models_dir: Path, writes: list[_Step], result: RestoreResult) -> None:
    """Rename each verified, staged file into its place, YAML last."""
    order = sorted(writes, key=lambda s: (_PLACE_ORDER.index(s.file.kind), s.file.path))
    try:
        root = Folder.root(models_dir)
    except OSError as exc:
        raise BackupError(f"cannot write to the models dir {models_dir}: {exc}") from None
    with root:
        for step in order:
            try:
                why = _place_one(root, step)
            except (OSError, UnsafePath) as exc:
                raise BackupError(
                    f"stopped after restoring {len(result.restored)} of {len(order)} files: "
                    f"{step.file.path}: {exc}. The files restored are whole; run the restore "
                    "again to finish it"
                ) from None
            if why is None:
                result.restored.append(step.file)
            else:
                result.kept.append((step.file, why))


def _place_one(root: Folder, step: _Step) -> str | None:
    """Place one file; None, or why it was left as it is."""
    file, staged = step.file, step.staged
    assert staged is not None
    os.chmod(staged, stat.S_IMODE(file.mode) & 0o777)  # never set-id bits from an archive
    os.utime(staged, ns=(file.mtime_ns, file.mtime_ns))
    *parents, base = file.path.split("/")
    parent = root.walk(parents, created=[])
    assert parent is not None  # made if absent
    with parent:
        state = parent.stat(base)
        if state is None:
            try:
                parent.place(staged, base)  # never replaces: a file that appears meanwhile wins
            except FileExistsError:
                return "it appeared while the backup was being restored"
            return None
        if step.seen is None:
            return "it appeared while the backup was being restored"
        if step.seen != (state.st_size, state.st_mtime_ns, state.st_ino):
            return "it changed while the backup was being restored"
        os.rename(staged, base, dst_dir_fd=parent.fd)  # atomic: the old file or the new one
    return None


def _missing_models(models_dir: Path) -> list[tuple[str, bool]]:
    missing = []
    with contextlib.suppress(OSError):
        for found in model_files(models_dir):
            if not found.name or not found.model:
                continue
            try:
                target = resolve_model_path(models_dir, found.model)
            except ValueError:
                continue
            manifest = models_dir / found.name / MANIFEST
            listed = _listed_files(manifest)
            if _has_files(target) and all((manifest.parent / p).is_file() for p in listed):
                continue
            missing.append((found.name, bool(listed)))
    return missing


def _has_files(target: Path) -> bool:
    """Whether a model path is a file, or a folder with a file besides an install manifest."""
    if target.is_file():
        return True
    return target.is_dir() and any(p.is_file() and p.name != MANIFEST for p in target.rglob("*"))


def _listed_files(manifest: Path) -> list[str]:
    """The paths an install manifest lists (none if it is not one)."""
    try:
        data = msgspec.json.decode(manifest.read_bytes())
    except (OSError, msgspec.DecodeError):
        return []
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        return []
    return [f["path"] for f in files if isinstance(f, dict) and isinstance(f.get("path"), str)]
