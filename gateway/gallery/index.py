"""Gallery index entries and their decoding, entry by entry.

An index is a file anyone can publish (`HEARTH_GALLERY`), so each entry is checked on its own:
one that is invalid, or that would be unsafe to install, is left out with its reason kept, and
the rest of the index stays usable.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any
from urllib.parse import urlparse

import msgspec

from gateway.config import (
    BACKENDS_FILE_NAMES,
    BUILTIN_BACKENDS,
    ConfigError,
    ModelConfig,
    _read_yaml,
    describe_validation_error,
)
from gateway.safe_yaml import GALLERY_INDEX_LIMITS

DEFAULT_INDEX = Path(__file__).resolve().parents[2] / "gallery" / "index.yaml"
SCHEMES = ("file", "http", "https", "hf", "pypi")

_Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
_Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
#: What an adapter entry's `config` may set: what a variant (`base:`) may set itself.
_ADAPTER_CONFIG = frozenset({"description", "system_prompt", "parameters"})
#: Names an entry may not take: its YAML or its folder would be read as something else.
_YAML_SUFFIXES = (".yaml", ".yml")
#: The requirement of a pypi:// URI: a plain name, pinned. pip reads far more than that in one
#: argument (`-r file`, `name @ url`, a local folder), and builds what it finds: runs its code.
_PYPI_REQUIREMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*")
#: Files no model needs, which a backend or Python could run if they sat in its folder.
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll", ".pth", ".sh", ".exe")
#: A config key that would let a backend run the model's own code (transformers honours it).
_REMOTE_CODE_KEY = "trust_remote_code"


def check_relative(path: str, what: str) -> None:
    """A path inside a model's folder: relative, no '..', no hidden or empty parts."""
    parts = PurePosixPath(path).parts
    if (
        not path
        or not parts  # "."
        or "\\" in path
        or PurePosixPath(path).is_absolute()
        or any(p in ("..", ".") or p.startswith(".") for p in parts)
        or str(PurePosixPath(path)) != path  # one spelling per file: no "a//b", "./a", "a/"
    ):
        raise ValueError(f"{what} {path!r} must be a plain relative path inside the model's folder")


def parse_pypi_uri(uri: str) -> tuple[str, str]:
    """pypi://package==version#path/in/wheel as (requirement, path); ValueError if it is not
    exactly that."""
    requirement, _, member = uri.removeprefix("pypi://").partition("#")
    if not uri.startswith("pypi://") or not _PYPI_REQUIREMENT.fullmatch(requirement):
        raise ValueError(
            f"uri {uri!r}: pypi:// URIs read pypi://package==version#path/in/wheel, "
            "a plain package name and a pinned version"
        )
    try:
        check_relative(member, "path")
    except ValueError:
        raise ValueError(
            f"uri {uri!r}: the path in the wheel must be a plain relative path"
        ) from None
    return requirement, member


def _check_uri(uri: str) -> None:
    scheme = urlparse(uri).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"uri {uri!r}: the scheme must be one of {', '.join(SCHEMES)}")
    if scheme == "pypi":
        parse_pypi_uri(uri)


def _check_not_code(filename: str) -> None:
    suffix = next((s for s in CODE_SUFFIXES if filename.lower().endswith(s)), None)
    if suffix is not None:
        raise ValueError(
            f"filename {filename!r}: a {suffix} file is code, which a model needs none of and "
            "a backend or Python could run from the model's folder"
        )


def _check_no_remote_code(config: dict[str, Any]) -> None:
    """No `trust_remote_code`, at any depth: the index may not decide to run a model's code."""
    stack: list[tuple[str, Any]] = [("config", config)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if str(key).strip().lower().replace("-", "_") == _REMOTE_CODE_KEY:
                    raise ValueError(
                        f"{where}.{key}: a gallery entry may not set {_REMOTE_CODE_KEY}, which "
                        "lets a backend run the model's own code; if you trust it, set it in "
                        "your own model YAML"
                    )
                stack.append((f"{where}.{key}", item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))


def _check_name(name: str) -> None:
    lowered = name.lower()
    if f"{lowered}.yaml" in BACKENDS_FILE_NAMES or lowered.endswith(_YAML_SUFFIXES):
        raise ValueError(
            f"the name {name!r} would be read as another kind of file "
            "(backends.yaml, or a YAML file of the models dir)"
        )


class GalleryPart(msgspec.Struct, forbid_unknown_fields=True):
    uri: str
    sha256: _Sha256

    def __post_init__(self) -> None:
        _check_uri(self.uri)


class GalleryFile(msgspec.Struct, forbid_unknown_fields=True):
    #: Where the file goes, relative to the model's own folder.
    filename: str
    sha256: _Sha256
    uri: str | None = None
    parts: list[GalleryPart] | None = None
    #: Bytes, where known: how much a model needs is told before it is downloaded.
    size: Annotated[int, msgspec.Meta(ge=0)] | None = None

    def __post_init__(self) -> None:
        check_relative(self.filename, "filename")
        _check_not_code(self.filename)
        if (self.uri is None) == (not self.parts):
            raise ValueError(f"{self.filename}: give either `uri` or a non-empty `parts`")
        if self.uri is not None:
            _check_uri(self.uri)

    def sources(self) -> list[GalleryPart]:
        return self.parts or [GalleryPart(uri=self.uri or "", sha256=self.sha256)]


class GalleryEntry(msgspec.Struct, forbid_unknown_fields=True):
    """One installable model: its files, each in `<models dir>/<name>/`, and the YAML to write
    as `<models dir>/<name>.yaml`."""

    name: _Name
    files: list[GalleryFile]
    config: dict[str, Any]
    #: The model file or folder inside the model's folder; unset: the folder itself.
    model: str | None = None
    description: str = ""
    license: str = ""
    tags: list[str] = msgspec.field(default_factory=list)
    verified: bool = False
    #: A LoRA adapter: the name of the model it adapts (a gallery name), which must be
    #: installed first. The install writes a variant of it (`base:`) with this entry's file
    #: (GGUF LoRA) or folder (PEFT adapter) as its adapter.
    base: _Name | None = None
    #: The adapter's scale in the variant it writes.
    scale: Annotated[float, msgspec.Meta(ge=-100, le=100)] = 1.0

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.model is not None:
            check_relative(self.model, "model")
        if {"name", "model"} & set(self.config):
            raise ValueError(f"{self.name}: config may not set `name` or `model`")
        _check_no_remote_code(self.config)
        backend = self.config.get("backend")
        if self.base is not None:
            extra = sorted(set(self.config) - _ADAPTER_CONFIG)
            if extra:
                raise ValueError(
                    f"{self.name}: an adapter's config may set only "
                    f"{', '.join(sorted(_ADAPTER_CONFIG))} (its variant runs in its base's "
                    f"process, with the base's settings), not {', '.join(extra)}"
                )
        elif backend not in BUILTIN_BACKENDS:
            raise ValueError(
                f"backend {backend!r} is not built in: a gallery entry may only use "
                f"{', '.join(sorted(BUILTIN_BACKENDS))}"
            )
        if not self.files:
            raise ValueError(f"{self.name}: lists no files")
        names = [f.filename for f in self.files]
        twice = sorted(n for n, count in Counter(names).items() if count > 1)
        if twice:
            raise ValueError(f"files named twice: {', '.join(twice)}")
        folders = {str(parent) for n in names for parent in PurePosixPath(n).parents}
        clash = sorted(set(names) & folders)
        if clash:
            raise ValueError(f"{', '.join(clash)}: both a file and a folder of other files")
        self.model_config()  # the YAML it would write must be valid

    @property
    def model_path(self) -> str:
        """What the written YAML's `model:` says: the model's folder, or `model` inside it."""
        return self.name if self.model is None else f"{self.name}/{self.model}"

    def download_bytes(self) -> int | None:
        """The files' bytes, if the index gives every size."""
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)

    def model_config(self) -> ModelConfig:
        return msgspec.convert(self.yaml(), ModelConfig)

    def yaml(self) -> dict[str, Any]:
        """The model YAML an install writes: an adapter's is a variant of its base."""
        if self.base is not None:
            adapter = {"path": self.model_path, "scale": self.scale}
            return {"name": self.name, "base": self.base, "lora": [adapter], **self.config}
        return {"name": self.name, **self.config, "model": self.model_path}


@dataclass
class GalleryIndex:
    """The usable entries of an index, and why the others were left out."""

    entries: list[GalleryEntry]
    #: Entries left out, by name: why each was (entries without a usable name are in `errors`).
    rejected: dict[str, str] = field(default_factory=dict)
    #: One line per entry left out, naming it by position and name.
    errors: list[str] = field(default_factory=list)

    def get(self, name: str) -> GalleryEntry | None:
        return next((e for e in self.entries if e.name == name), None)


def load_gallery(path: Path = DEFAULT_INDEX) -> GalleryIndex:
    """Decode a gallery index, entry by entry. An invalid entry is left out with its reason; a
    file that is not an index at all is a ConfigError naming the file."""
    data = _read_yaml(path, GALLERY_INDEX_LIMITS)
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ConfigError(f"{path}: expected a mapping with a list of `entries`")
    unknown = sorted(str(key) for key in data if key != "entries")
    if unknown:
        raise ConfigError(f"{path}: unknown field {', '.join(unknown)}")
    decoded: list[tuple[int, str | None, GalleryEntry | None, str]] = []
    for position, item in enumerate(data["entries"]):
        name = item.get("name") if isinstance(item, dict) else None
        name = name if isinstance(name, str) else None
        try:
            decoded.append((position, name, msgspec.convert(item, GalleryEntry), ""))
        except msgspec.ValidationError as exc:
            decoded.append((position, name, None, describe_validation_error(exc)))
    # Two entries with one name: neither is the one the index means.
    counts = Counter(name for _, name, _, _ in decoded if name is not None)
    index = GalleryIndex(entries=[])
    for position, name, entry, why in decoded:
        if name is not None and counts[name] > 1:
            entry, why = None, f"{counts[name]} entries are named {name!r}"
        if entry is not None:
            index.entries.append(entry)
            continue
        if name is not None:
            index.rejected.setdefault(name, why)
        index.errors.append(f"{path}: entries[{position}] ({name or 'no name'}): {why}")
    return index


def gallery_path() -> Path:
    return Path(os.environ.get("HEARTH_GALLERY") or DEFAULT_INDEX)
