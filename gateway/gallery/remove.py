"""Removing a model: its YAML and exactly the files its install wrote; nothing else, ever.

With our manifest in `<name>/`, the manifest's files go (but not one another model's YAML also
names), then the manifest, then the folders they leave empty. Without one (a YAML someone wrote
by hand), the YAML goes, and its model path too only if that is one regular file that no other
model names; a folder is kept, and the answer says so. A YAML whose model path is the models dir
itself, or, without a manifest, overlaps another model's, is refused and nothing is deleted.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, load_model_file
from gateway.gallery.disk import MANIFEST, Folder, ModelFile, UnsafePath, model_files, read_manifest
from gateway.gallery.errors import NotInstalledError, RemovalRefused
from gateway.manager.footprint import FootprintBook


@dataclass
class Removal:
    """What a removal deleted and what it kept, as paths from the models dir."""

    name: str
    removed: list[str] = field(default_factory=list)
    #: {"path", "reason"} for each thing of the model's that was left in place.
    kept: list[dict[str, str]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        return {"removed": self.removed, "kept": self.kept}


@dataclass
class RemovalPlan:
    """What removing a model will delete, decided (and refused, if need be) before deleting."""

    name: str
    models_dir: Path
    yaml_filename: str
    #: Files to delete, then folders to remove if empty (deepest first), from the models dir.
    files: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    manifest: str | None = None
    kept: list[dict[str, str]] = field(default_factory=list)

    def carry_out(self) -> Removal:
        """Delete what the plan says (the YAML first: the model is gone before its files)."""
        removal = Removal(self.name, kept=list(self.kept))
        with Folder.root(self.models_dir) as root:
            with contextlib.suppress(FileNotFoundError):
                root.unlink(self.yaml_filename)
                removal.removed.append(self.yaml_filename)
            FootprintBook(self.models_dir).forget(self.name)
            for path in [*self.files, *([self.manifest] if self.manifest else [])]:
                if _delete_file(root, path):
                    removal.removed.append(path)
            for path in self.folders:
                *parents, base = path.split("/")
                with contextlib.suppress(OSError, UnsafePath):
                    parent = root.walk(parents)
                    if parent is not None:
                        with parent:
                            if parent.rmdir(base):
                                removal.removed.append(f"{path}/")
        return removal


def _delete_file(root: Folder, path: str) -> bool:
    """Unlink a regular file reached without links; whether it was."""
    try:
        found = root.file_at(path)
        if found is None:
            return False
        parent, base = found
        with parent:
            parent.unlink(base)
    except (OSError, UnsafePath):
        return False
    return True


def remove_model(name: str, models_dir: Path) -> Removal:
    """Remove the model `name` (see the module). NotInstalledError, RemovalRefused."""
    return plan_removal(name, models_dir).carry_out()


def plan_removal(name: str, models_dir: Path) -> RemovalPlan:
    """What removing `name` deletes; NotInstalledError if no YAML names it, RemovalRefused if
    it could delete what is not the model's."""
    found = model_files(models_dir) if models_dir.is_dir() else []
    mine = [f for f in found if f.name == name]
    if not mine:
        raise NotInstalledError(f"no installed model '{name}'")
    if len(mine) > 1:
        files = ", ".join(f.filename for f in mine)
        raise RemovalRefused(f"{files} all name the model '{name}'; delete the one you mean")
    target = mine[0]
    try:
        config = load_model_file(models_dir / target.filename, models_dir)
    except ConfigError as exc:
        raise RemovalRefused(
            f"{name}: its YAML is not usable, so what it names is unclear: {exc}"
        ) from None
    plan = RemovalPlan(name, models_dir, target.filename)
    root = Path(os.path.realpath(models_dir))
    if config.model is not None and _resolved(root, config.model) == root:
        raise RemovalRefused(
            f"{name}: its model path {config.model!r} is the models dir itself; nothing was "
            "deleted (fix its `model:` or delete the YAML by hand)"
        )
    others = _others(root, [f for f in found if f is not target])
    with Folder.root(models_dir) as folder_root:
        manifest = None
        with contextlib.suppress(UnsafePath):
            folder = folder_root.child(name)
            if folder is not None:
                with folder:
                    manifest = read_manifest(folder, name)
        if manifest is not None:
            for file in manifest.files:
                _plan_file(plan, folder_root, root, f"{name}/{file.path}", others)
            plan.manifest = f"{name}/{MANIFEST}"
            folders = {name}
            for file in manifest.files:
                parts = file.path.split("/")[:-1]
                folders |= {"/".join([name, *parts[: i + 1]]) for i in range(len(parts))}
            plan.folders = sorted(folders, key=lambda f: (-f.count("/"), f))
        elif config.model is not None:
            model = _resolved(root, config.model)
            for other, path in others:
                if path == model or path in model.parents or model in path.parents:
                    raise RemovalRefused(
                        f"{name}: its model path {config.model!r} overlaps that of '{other}', "
                        "and no manifest says which files are its own; nothing was deleted"
                    )
            relative = os.path.normpath(config.model)
            if _configuration(relative):
                raise RemovalRefused(
                    f"{name}: its model path {config.model!r} is the server's configuration, "
                    "not a model file; nothing was deleted"
                )
            _plan_file(plan, folder_root, root, relative, others)
    return plan


def _configuration(path: str) -> bool:
    """Whether a path of the models dir is configuration (a YAML beside the models, or a hidden
    file or folder such as .hearth/) rather than a model's file."""
    parts = path.split("/")
    top_level_yaml = len(parts) == 1 and parts[0].lower().endswith((".yaml", ".yml"))
    return top_level_yaml or any(part.startswith(".") for part in parts)


def _resolved(root: Path, relative: str) -> Path:
    return Path(os.path.realpath(root / relative))


def _others(root: Path, files: list[ModelFile]) -> list[tuple[str, Path]]:
    """The other models' paths. One that names the models dir itself (or lies outside it)
    names no file in particular, and would otherwise make every file look shared."""
    paths = []
    for file in files:
        if file.model is None:
            continue
        path = _resolved(root, file.model)
        if path != root and path.is_relative_to(root):
            paths.append((file.name or file.filename, path))
    return paths


def _plan_file(
    plan: RemovalPlan, folder_root: Folder, root: Path, path: str, others: list[tuple[str, Path]]
) -> None:
    """Delete `path` if it is a regular file reached without links and no other model names
    it; otherwise say why it is kept (nothing to say if it is already gone)."""
    resolved = _resolved(root, path)
    user = next((o for o, p in others if p == resolved or p in resolved.parents), None)
    if user is not None:
        plan.kept.append({"path": path, "reason": f"the model '{user}' uses it too"})
        return
    if resolved != root / path:  # a link on the way (or a path that leaves and comes back)
        if os.path.lexists(root / path):
            plan.kept.append({"path": path, "reason": "a symbolic link is on its way"})
        return
    *parents, base = path.split("/")
    try:
        parent = folder_root.walk(parents)
    except UnsafePath:
        plan.kept.append({"path": path, "reason": "a symbolic link is on its way"})
        return
    if parent is None:
        return
    with parent:
        state = parent.stat(base)
    if state is None:
        return
    if stat.S_ISDIR(state.st_mode):
        plan.kept.append({"path": path, "reason": "a folder without a manifest of ours"})
    elif not stat.S_ISREG(state.st_mode):
        plan.kept.append({"path": path, "reason": "not a regular file"})
    else:
        plan.files.append(path)
