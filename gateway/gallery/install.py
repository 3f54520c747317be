"""Installing a gallery entry: it owns one folder, `<models dir>/<name>/`, and one YAML,
`<models dir>/<name>.yaml`, and it only ever adds.

Before anything is fetched the install is planned, and refused (InstallRefused, nothing touched)
if it would write where it does not own: a YAML another model or the user wrote (any spelling of
`<name>.yaml`/`.yml`, or another file naming the model `<name>`), a `<name>/` folder without our
manifest, a link anywhere on the way, a file in our folder that is not ours. Every file is then
downloaded into a private staging folder, never past the size the index gives it, and checked
against that size and its sha256 (and each part's); only when all are good are they moved into
place, under names that must not exist yet, then the manifest, then the YAML. A failure at that
point takes back what was placed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import yaml

from gateway.config import BACKENDS_FILE_NAMES, BUILTIN_BACKENDS, LORA_BACKENDS, load_catalog
from gateway.gallery.disk import (
    MANIFEST,
    Folder,
    Manifest,
    ManifestFile,
    UnsafePath,
    model_files,
    read_manifest,
)
from gateway.gallery.errors import EntryRejected, InstallCancelled, InstallError, InstallRefused
from gateway.gallery.fetch import Fetcher, Progress, ProgressCallback, Sink
from gateway.gallery.index import (
    GalleryEntry,
    GalleryFile,
    GalleryIndex,
    gallery_path,
    load_gallery,
)
from gateway.manager.footprint import Footprint, FootprintBook, estimate_before_download

_YAML_BYTES = 1024 * 1024


def yaml_text(entry: GalleryEntry) -> bytes:
    """The model YAML an install of `entry` writes, byte for byte."""
    return yaml.safe_dump(entry.yaml(), sort_keys=False).encode()


def _identity(entry: GalleryEntry) -> set[tuple[str, str]]:
    return {(f.filename, f.sha256) for f in entry.files}


@dataclass
class _Plan:
    """What an install will do, decided before anything is fetched."""

    entry: GalleryEntry
    #: Files to download, and of those, ours whose content is wrong (deleted first).
    fetch: list[GalleryFile] = field(default_factory=list)
    replace: set[str] = field(default_factory=set)
    write_manifest: bool = False
    write_yaml: bool = False

    @property
    def nothing_to_do(self) -> bool:
        return not (self.fetch or self.write_manifest or self.write_yaml)


def check_install(entry: GalleryEntry, models_dir: Path) -> None:
    """Refuse (InstallRefused) an install that would write where it may not; quick: files
    already there are not hashed."""
    _plan(entry, models_dir, hash_files=False)


def _inside(model: str | None, folder: str) -> bool:
    """Whether a model path (relative to the models dir) is `folder` or lies inside it."""
    if not model:
        return False
    parts = [p for p in os.path.normpath(model).split("/") if p]
    return bool(parts) and parts[0] == folder


def _plan(entry: GalleryEntry, models_dir: Path, *, hash_files: bool) -> _Plan:
    name = entry.name
    if entry.base is not None:
        _check_base(entry, models_dir)
    elif entry.config.get("backend") not in BUILTIN_BACKENDS:  # an entry built by hand
        raise InstallRefused(f"{name}: a gallery entry may only use a built-in backend")
    plan = _Plan(entry)
    yaml_name = f"{name}.yaml"
    if yaml_name.lower() in BACKENDS_FILE_NAMES:  # decoding refuses the name too
        raise InstallRefused(f"{name}: its YAML would be {yaml_name}, which defines backends")
    try:
        root = Folder.root(models_dir)
    except FileNotFoundError:  # a new models dir: everything is to do
        plan.fetch, plan.write_manifest, plan.write_yaml = list(entry.files), True, True
        return plan
    except OSError as exc:
        raise InstallError(f"cannot open the models dir {models_dir}: {exc}") from None
    with root:
        spellings = (f"{name.lower()}.yaml", f"{name.lower()}.yml")
        for existing in root.names():
            if existing != yaml_name and existing.lower() in spellings:
                raise InstallRefused(
                    f"{name}: {existing} is already in the models dir; an install writes "
                    f"{yaml_name}, and two files for one model is one too many"
                )
        referenced = None
        for other in model_files(models_dir):
            if other.name == name and other.filename != yaml_name:
                raise InstallRefused(f"{name}: {other.filename} already names a model {name!r}")
            if other.name != name and _inside(other.model, name):
                referenced = other
        # Another model's YAML names a file in the folder: refused where this install would
        # make the folder, or take over one that is not ours (its files would become what that
        # model loads). Our own install's folder may be used by other YAML (a second model
        # with other settings on the same weights): checking or repairing it changes nothing.
        refusal = None
        if referenced is not None:
            refusal = InstallRefused(
                f"{name}: {referenced.filename} names {referenced.model!r}, inside the folder "
                "this install would write"
            )
        try:
            folder = root.child(name)
        except UnsafePath as exc:
            raise InstallRefused(f"{name}: {exc}") from None
        yaml_state = root.stat(yaml_name)
        if yaml_state is not None and not stat.S_ISREG(yaml_state.st_mode):
            raise InstallRefused(f"{name}: {yaml_name} is a symbolic link or not a file")
        if folder is None:
            if refusal is not None:
                raise refusal
            if yaml_state is not None and _is_flat_install(root, entry, hash_files=hash_files):
                return plan  # it serves as it is: nothing to add
            if yaml_state is not None:
                raise InstallRefused(_not_ours(name, f"{yaml_name} exists, but no {name}/"))
            plan.fetch, plan.write_manifest, plan.write_yaml = list(entry.files), True, True
            return plan
        with folder:
            manifest = read_manifest(folder, name)
            if manifest is None and refusal is not None:
                raise refusal
            if manifest is None:
                # An install from before manifests: adopted only if it is complete and its
                # YAML is, byte for byte, what this entry writes.
                if yaml_state is None or _read(root, yaml_name) != yaml_text(entry):
                    raise InstallRefused(_not_ours(name, f"{name}/ has no manifest of ours"))
                plan.write_manifest = True
            elif manifest.identity() != _identity(entry):
                raise InstallRefused(
                    f"{name} was installed from another version of this entry (its files "
                    f"differ); remove it first (`hearth models remove {name}`)"
                )
            plan.write_yaml = yaml_state is None
            for file in entry.files:
                _plan_file(plan, folder, file, ours=manifest is not None, hash_files=hash_files)
    return plan


def _check_base(entry: GalleryEntry, models_dir: Path) -> None:
    """An adapter installs onto a model already in the models dir that takes adapters."""
    base = load_catalog(models_dir).models.get(entry.base or "")
    if base is None:
        raise InstallRefused(
            f"{entry.name} is a LoRA adapter for {entry.base}, which is not installed: install "
            f"it first (hearth models install {entry.base})"
        )
    is_file = entry.model is not None and entry.model in {f.filename for f in entry.files}
    if base.backend in {"llama", "transformers"} and is_file != (base.backend == "llama"):
        raise InstallRefused(
            f"{entry.name} is a LoRA {'file' if is_file else 'folder'}, but {entry.base} is a "
            f"{base.backend} model, which takes "
            f"{'GGUF LoRA files' if base.backend == 'llama' else 'PEFT adapter folders'}"
        )
    if base.backend not in LORA_BACKENDS or base.base is not None:
        raise InstallRefused(
            f"{entry.name} is a LoRA adapter for {entry.base}, but the installed {entry.base} "
            f"is a {base.backend} model{' variant' if base.base else ''}, which takes no adapters"
        )


def _plan_file(
    plan: _Plan, folder: Folder, file: GalleryFile, *, ours: bool, hash_files: bool
) -> None:
    *parents, base = file.filename.split("/")
    where = f"{plan.entry.name}/{file.filename}"
    try:
        parent = folder.walk(parents)
    except UnsafePath as exc:
        raise InstallRefused(f"{plan.entry.name}: {exc}") from None
    if parent is None:
        state = None
    else:
        with parent:
            state = parent.stat(base)
            if state is not None and not stat.S_ISREG(state.st_mode):
                raise InstallRefused(f"{where} is a symbolic link or not a regular file")
            if state is not None and hash_files and parent.sha256(base) != file.sha256:
                if not ours:
                    raise InstallRefused(_not_ours(plan.entry.name, f"{where} is not its file"))
                plan.replace.add(file.filename)
                state = None
    if state is None:
        if not ours:
            raise InstallRefused(_not_ours(plan.entry.name, f"{where} is missing"))
        plan.fetch.append(file)


def _not_ours(name: str, why: str) -> str:
    return (
        f"{name}: {why}: no install of this entry wrote it, and an install never changes what "
        f"it did not write. Move it away (or `hearth models remove {name}`, if that model can "
        "go), then install again"
    )


def _read(folder: Folder, name: str) -> bytes | None:
    try:
        return folder.read(name, _YAML_BYTES)
    except OSError:
        return None


def _is_flat_install(root: Folder, entry: GalleryEntry, *, hash_files: bool) -> bool:
    """An install by a Hearth from before model folders: the YAML it wrote, byte for byte, and
    every file whole at the models dir's top level. Left as it is (its removal goes by the rules
    for a YAML without a manifest)."""
    if entry.model is None or entry.base is not None:
        return False
    flat = {**entry.yaml(), "model": entry.model}
    if _read(root, f"{entry.name}.yaml") != yaml.safe_dump(flat, sort_keys=False).encode():
        return False
    try:
        return _files_present(root, entry, hash_files=hash_files)
    except (OSError, UnsafePath):
        return False


def _files_present(folder: Folder, entry: GalleryEntry, *, hash_files: bool) -> bool:
    """Every file of `entry` in `folder`, a regular file reached without links (and whole)."""
    for file in entry.files:
        found = folder.file_at(file.filename)
        if found is None:
            return False
        parent, base = found
        with parent:
            if hash_files and parent.sha256(base) != file.sha256:
                return False
    return True


def _layout(entry: GalleryEntry, models_dir: Path) -> str | None:
    """How `entry` is installed: "folder" (its YAML, our manifest for these files, every file
    there), "flat" (by a Hearth from before model folders), or None. Hashes are not checked."""
    try:
        with Folder.root(models_dir) as root:
            yaml_state = root.stat(f"{entry.name}.yaml")
            if yaml_state is None or not stat.S_ISREG(yaml_state.st_mode):
                return None
            folder = root.child(entry.name)
            if folder is None:
                return "flat" if _is_flat_install(root, entry, hash_files=False) else None
            with folder:
                manifest = read_manifest(folder, entry.name)
                if manifest is None or manifest.identity() != _identity(entry):
                    return None
                return "folder" if _files_present(folder, entry, hash_files=False) else None
    except (OSError, UnsafePath):
        return None


def is_installed(entry: GalleryEntry, models_dir: Path) -> bool:
    """Its YAML and every file in place (`install` checks their hashes)."""
    return _layout(entry, models_dir) is not None


def entry_footprint(entry: GalleryEntry, models_dir: Path, book: FootprintBook) -> Footprint | None:
    """What `entry` needs in memory: from its files once installed, else from the sizes the
    index gives (None where it gives none)."""
    if entry.base is not None:
        return None  # an adapter: its base's memory, plus its own few megabytes
    layout = _layout(entry, models_dir)
    if layout is not None:
        config = entry.model_config()
        if layout == "flat":
            config = msgspec.structs.replace(config, model=entry.model)
        try:
            return book.footprint(config)
        except (ValueError, OSError):
            return None
    size = entry.download_bytes()
    if size is None:
        return None
    return estimate_before_download(str(entry.config.get("backend")), entry.config, size)


def install_entry(
    entry: GalleryEntry,
    models_dir: Path,
    *,
    report: ProgressCallback | None = None,
    cancelled: threading.Event | None = None,
) -> Path:
    """Install `entry` into `models_dir` (a quick no-op when it is installed and whole); return
    its YAML's path. InstallRefused: it may not; InstallError: it failed, nothing left behind."""
    plan = _plan(entry, models_dir, hash_files=True)
    config_path = models_dir / f"{entry.name}.yaml"
    progress = Progress(files_total=len(entry.files))
    report = report or (lambda _: None)
    cancelled = cancelled or threading.Event()
    progress.files_done = len(entry.files) - len(plan.fetch)
    if plan.nothing_to_do:
        report(progress)
        return config_path
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".hearth-install-{entry.name}-", dir=models_dir))
    try:
        fetcher = Fetcher(staging, progress, report, cancelled)
        for file in plan.fetch:
            progress.file, progress.done, progress.total = file.filename, 0, None
            _download(fetcher, file, staging / "files" / file.filename)
            progress.files_done += 1
            report(progress)
        if cancelled.is_set():
            raise InstallCancelled("the install was cancelled")
        _commit(plan, staging, models_dir)
        return config_path
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download(fetcher: Fetcher, file: GalleryFile, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w+b") as handle:
        sink = Sink(handle, filename=file.filename, size=file.size)  # stops at more than `size`
        sources = file.sources()
        for part in sources:
            sink.start_part()
            fetcher.fetch(part.uri, sink)
            if len(sources) > 1 and sink.part.hexdigest() != part.sha256:
                raise InstallError(
                    f"{file.filename}: part {part.uri} has sha256 "
                    f"{sink.part.hexdigest()}, expected {part.sha256}"
                )
        if file.size is not None and sink.written != file.size:
            raise InstallError(
                f"{file.filename}: {sink.written} bytes arrived, but the gallery gives its size "
                f"as {file.size}"
            )
        handle.flush()
        os.fsync(handle.fileno())
    if sink.whole.hexdigest() != file.sha256:
        raise InstallError(
            f"{file.filename} has sha256 {sink.whole.hexdigest()}, "
            f"expected {file.sha256}: the download is not the file the gallery names"
        )
    out.chmod(0o644)


def _commit(plan: _Plan, staging: Path, models_dir: Path) -> None:
    """Put the checked files in place, then the manifest, then the YAML; each under a name that
    must not exist. On any failure, what this did is taken back."""
    name = plan.entry.name
    placed: list[str] = []  # paths from the models dir, in the order they were placed
    created: list[str] = []
    with Folder.root(models_dir) as root:
        try:
            for file in plan.fetch:
                *parents, base = f"{name}/{file.filename}".split("/")
                parent = root.walk(parents, created=created)
                assert parent is not None  # made if absent
                with parent:
                    if file.filename in plan.replace:  # ours, with the wrong content
                        with contextlib.suppress(FileNotFoundError):
                            parent.unlink(base)
                    parent.place(staging / "files" / file.filename, base)
                    placed.append(parent.path_of(base))
            if plan.write_manifest:
                folder = root.walk([name], created=created)
                assert folder is not None
                with folder:
                    _place_manifest(plan.entry, folder, staging / "manifest.json")
                placed.append(f"{name}/{MANIFEST}")
            if plan.write_yaml:
                text = staging / "model.yaml"
                text.write_bytes(yaml_text(plan.entry))
                text.chmod(0o644)
                root.place(text, f"{name}.yaml")
        except BaseException as exc:
            _take_back(root, placed, created)
            if isinstance(exc, FileExistsError):
                raise InstallRefused(
                    f"{name}: {exc.filename or 'one of its files'} appeared while it was being "
                    "installed; nothing was changed"
                ) from None
            if isinstance(exc, UnsafePath):
                raise InstallRefused(f"{name}: {exc}") from None
            if isinstance(exc, OSError):
                raise InstallError(f"{name}: cannot write its files: {exc}") from None
            raise


def _place_manifest(entry: GalleryEntry, folder: Folder, scratch: Path) -> None:
    """The manifest of the files now in place, with their sizes on disk."""
    files = []
    for file in entry.files:
        *parents, base = file.filename.split("/")
        parent = folder.walk(parents)
        assert parent is not None  # every file was placed or found
        with parent:
            state = parent.stat(base)
        assert state is not None
        files.append(ManifestFile(path=file.filename, sha256=file.sha256, size=state.st_size))
    scratch.write_bytes(Manifest(entry=entry.name, files=files).encode())
    scratch.chmod(0o644)
    folder.place(scratch, MANIFEST)


def _take_back(root: Folder, placed: list[str], created: list[str]) -> None:
    """Undo a commit that failed halfway: what it placed, then the folders it made."""
    for path in reversed(placed):
        *parents, base = path.split("/")
        try:
            parent = root.walk(parents)
            if parent is not None:
                with parent:
                    parent.unlink(base)
        except (OSError, UnsafePath):
            continue
    for path in reversed(created):
        *parents, base = path.split("/")
        try:
            parent = root.walk(parents)
            if parent is not None:
                with parent:
                    parent.rmdir(base)
        except (OSError, UnsafePath):
            continue


def install_named(names: list[str], models_dir: Path, index: GalleryIndex | None = None) -> None:
    """Install gallery entries by name (for scripts and tests); raises InstallError."""
    index = index or load_gallery(gallery_path())
    for name in names:
        install_entry(find_entry(index, name), models_dir)


def find_entry(index: GalleryIndex, name: str) -> GalleryEntry:
    """The entry `name`; EntryRejected if the index has it but it was left out as invalid,
    InstallError if the index has no such entry."""
    entry = index.get(name)
    if entry is not None:
        return entry
    if name in index.rejected:
        raise EntryRejected(f"the gallery entry {name!r} is invalid: {index.rejected[name]}")
    raise InstallError(f"the gallery has no model named {name!r}")
