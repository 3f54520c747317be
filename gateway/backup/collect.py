"""What a backup holds: the models dir walked without following a link, each file given a kind.

yaml: a model YAML or backends.yaml at the top. manifest: an install folder's manifest. state:
what the gateway keeps in `.hearth/` (measured footprints, tuning records). adapter: a LoRA
adapter a model YAML names in `lora[].path` (a file, or every file of a PEFT folder), or a file an
install manifest marks as one. model: everything else (weights, tokenizers), backed up only when
asked: the gallery gives those back, the rest is what a user cannot download again.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.backup.format import KIND_ORDER, Kind, check_path
from gateway.config import BACKENDS_FILE_NAMES, resolve_model_path
from gateway.gallery.disk import MANIFEST
from gateway.safe_yaml import YAMLLoadError, load_yaml

#: Where the gateway keeps its state in the models dir.
STATE_FOLDER = ".hearth"
_YAML_SUFFIXES = (".yaml", ".yml")
#: Names of files something is still writing: a temporary file, a partial download.
_UNFINISHED_SUFFIXES = (".tmp", ".part")
_MANIFEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Candidate:
    """A file of the models dir, with its kind and its size when it was found."""

    path: str
    kind: Kind
    size: int


@dataclass
class Selection:
    """The files a backup takes, the model files it leaves out, and what it cannot take."""

    files: list[Candidate] = field(default_factory=list)
    left_out: list[Candidate] = field(default_factory=list)
    #: (path, why) for links, sockets, unfinished and unreadable files.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Adapters a YAML names that are not in the models dir.
    warnings: list[str] = field(default_factory=list)


def collect(models_dir: Path, *, model_files: bool) -> Selection:
    """Every file of the models dir a backup takes (model files only with `model_files`)."""
    selection = Selection()
    adapter_files, adapter_folders = _adapters(models_dir, selection.warnings)
    found: list[tuple[str, os.stat_result]] = []
    _walk(models_dir, "", found, selection.skipped)
    for path, state in found:
        kind = _kind(path, adapter_files, adapter_folders)
        candidate = Candidate(path, kind, state.st_size)
        if kind == "model" and not model_files:
            selection.left_out.append(candidate)
        else:
            selection.files.append(candidate)
    selection.files.sort(key=lambda c: (KIND_ORDER.index(c.kind), c.path))
    return selection


def is_yaml(path: str) -> bool:
    """Whether `path` is a YAML file at the top of the models dir."""
    return "/" not in path and path.lower().endswith(_YAML_SUFFIXES)


def _kind(path: str, adapter_files: set[str], adapter_folders: set[str]) -> Kind:
    parts = path.split("/")
    if parts[0] == STATE_FOLDER:
        return "state"
    if len(parts) == 2 and parts[1] == MANIFEST:
        return "manifest"
    if is_yaml(path):
        return "yaml"
    if path in adapter_files or any(path.startswith(f"{folder}/") for folder in adapter_folders):
        return "adapter"
    return "model"


def _walk(
    models_dir: Path,
    relative: str,
    found: list[tuple[str, os.stat_result]],
    skipped: list[tuple[str, str]],
) -> None:
    try:
        with os.scandir(models_dir / relative) as scan:
            entries = sorted(scan, key=lambda e: e.name)
    except OSError as exc:
        skipped.append((relative or ".", f"cannot be read: {exc.strerror or exc}"))
        return
    for entry in entries:
        path = f"{relative}/{entry.name}" if relative else entry.name
        if not relative and entry.name.startswith(".hearth-"):
            continue  # an install's (or a restore's) staging folder: it comes and goes
        try:
            state = entry.stat(follow_symlinks=False)
        except OSError as exc:
            skipped.append((path, f"cannot be read: {exc.strerror or exc}"))
            continue
        if stat.S_ISLNK(state.st_mode):
            skipped.append((path, "a symbolic link (a backup holds only files)"))
        elif stat.S_ISDIR(state.st_mode):
            _walk(models_dir, path, found, skipped)
        elif not stat.S_ISREG(state.st_mode):
            skipped.append((path, "not a regular file"))
        elif entry.name.endswith(_UNFINISHED_SUFFIXES):
            skipped.append((path, "a temporary file something is still writing"))
        else:
            try:
                check_path(path)
            except ValueError as exc:
                skipped.append((path, str(exc)))
                continue
            found.append((path, state))


def _adapters(models_dir: Path, warnings: list[str]) -> tuple[set[str], set[str]]:
    """The adapter files and adapter folders (paths from the models dir) that model YAMLs name
    in `lora[].path`, or install manifests mark as adapters."""
    root = models_dir.resolve()
    files: set[str] = set()
    folders: set[str] = set()

    def add(target: Path) -> None:
        relative = target.relative_to(root).as_posix()
        (folders if target.is_dir() else files).add(relative)

    for path in sorted(models_dir.iterdir()):
        if not is_yaml(path.name) or path.name.lower() in BACKENDS_FILE_NAMES:
            continue
        if path.is_symlink() or not path.is_file():
            continue
        try:
            data = load_yaml(path)
        except YAMLLoadError:
            continue  # the gateway reports it; the file itself is backed up all the same
        if not isinstance(data, dict):
            continue
        for named in _lora_paths(data.get("lora")):
            try:
                target = resolve_model_path(models_dir, named)
            except ValueError as exc:
                warnings.append(f"{path.name}: the adapter {named!r} is not backed up: {exc}")
                continue
            if not target.exists():
                warnings.append(f"{path.name}: the adapter {named} is not in the models dir")
                continue
            add(target)
    for folder in sorted(models_dir.iterdir()):
        if folder.name.startswith(".") or folder.is_symlink() or not folder.is_dir():
            continue
        for named in _manifest_adapters(folder / MANIFEST):
            with contextlib.suppress(ValueError):
                target = resolve_model_path(folder, named)
                if target.exists() and target.is_relative_to(root):
                    add(target)
    return files, folders


def _lora_paths(value: Any) -> list[str]:
    """The paths in a YAML's `lora`: a list of `{path, scale}` (read leniently: a bare path,
    one mapping, or a list of either)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        path = value.get("path")
        return [path] if isinstance(path, str) else []
    if isinstance(value, list):
        return [path for item in value for path in _lora_paths(item)]
    return []


def _manifest_adapters(manifest: Path) -> list[str]:
    """Paths (from its folder) that an install manifest marks as adapters: a file listed with
    `"kind": "adapter"`, or named in a top-level `"adapters"` list."""
    try:
        if manifest.is_symlink():
            return []
        with manifest.open("rb") as handle:
            data = json.loads(handle.read(_MANIFEST_BYTES))
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict):
        return []
    marked = [
        item.get("path")
        for item in data.get("files") or []
        if isinstance(item, dict) and item.get("kind") == "adapter"
    ]
    marked += _lora_paths(data.get("adapters"))
    return [path for path in marked if isinstance(path, str)]
