"""What a model's files say about its size, read from their headers without loading them.

GGUF: the metadata (architecture, layers, heads, vocabulary) and where the tensor data starts.
safetensors: every tensor's dtype and shape. Both are read through mmap, so a multi-GB file
costs only the pages of its header.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_GGUF_MAGIC = b"GGUF"
# GGUF value types: (struct format, size) for the fixed-size ones.
_GGUF_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_NESTING = 4


class ModelFileError(ValueError):
    """A file that is not what its name says (a truncated or foreign file)."""


@dataclass
class GGUFHeader:
    """A GGUF file's metadata (arrays as their length) and the bytes of its tensor data."""

    metadata: dict[str, Any] = field(default_factory=dict)
    tensor_count: int = 0
    tensor_bytes: int = 0
    #: The metadata keys whose values are arrays (given as their length).
    arrays: set[str] = field(default_factory=set)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        """An architecture key such as `block_count` (read as `<arch>.block_count`)."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


class _Reader:
    def __init__(self, data: Any) -> None:
        self.data = data
        self.at = 0

    def take(self, fmt: str, size: int) -> Any:
        if self.at + size > len(self.data):
            raise ModelFileError("the GGUF header ends early")
        value = struct.unpack_from(fmt, self.data, self.at)[0]
        self.at += size
        return value

    def string(self) -> str:
        length = self.take("<Q", 8)
        if self.at + length > len(self.data):
            raise ModelFileError("the GGUF header ends early")
        raw = bytes(self.data[self.at : self.at + length])
        self.at += length
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.take("<Q", 8)
        self.at += length
        if self.at > len(self.data):
            raise ModelFileError("the GGUF header ends early")

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in _GGUF_SCALARS:
            return self.take(*_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return self.string()
        if kind == _GGUF_ARRAY:
            if depth >= _GGUF_MAX_NESTING:
                raise ModelFileError("the GGUF header nests arrays too deep")
            item_kind, count = self.take("<I", 4), self.take("<Q", 8)
            if item_kind in _GGUF_SCALARS:
                self.at += _GGUF_SCALARS[item_kind][1] * count
                if self.at > len(self.data):
                    raise ModelFileError("the GGUF header ends early")
            elif item_kind == _GGUF_STRING:
                for _ in range(count):
                    self.skip_string()
            else:
                for _ in range(count):
                    self.value(item_kind, depth + 1)
            return count  # an array is known by its length here (the vocabulary's size)
        raise ModelFileError(f"unknown GGUF value type {kind}")


def read_gguf(path: Path) -> GGUFHeader:
    """The header of a GGUF file (versions 2 and 3)."""
    with path.open("rb") as handle:
        size = path.stat().st_size
        if size < 24:
            raise ModelFileError(f"{path.name} is too short to be GGUF")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != _GGUF_MAGIC:
                raise ModelFileError(f"{path.name} is not a GGUF file")
            reader = _Reader(data)
            reader.at = 4
            version = reader.take("<I", 4)
            if version < 2:
                raise ModelFileError(f"{path.name}: GGUF version {version} is not supported")
            header = GGUFHeader(tensor_count=reader.take("<Q", 8))
            kv_count = reader.take("<Q", 8)
            for _ in range(kv_count):
                key = reader.string()
                kind = reader.take("<I", 4)
                header.metadata[key] = reader.value(kind)
                if kind == _GGUF_ARRAY:
                    header.arrays.add(key)
            for _ in range(header.tensor_count):
                reader.skip_string()
                dims = reader.take("<I", 4)
                reader.at += 8 * dims + 4 + 8  # shape, type, offset
            alignment = header.metadata.get("general.alignment", 32)
            if not isinstance(alignment, int) or not 1 <= alignment <= 1 << 20:
                raise ModelFileError(f"{path.name}: general.alignment {alignment!r} is not valid")
            start = -(-reader.at // alignment) * alignment
            header.tensor_bytes = max(0, size - start)
    return header


_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip


@dataclass
class SafetensorsSummary:
    """Parameters and bytes of every `*.safetensors` file under a folder."""

    parameters: int = 0
    bytes: int = 0


def read_safetensors(folder: Path, inside: Path | None = None) -> SafetensorsSummary:
    """Count the parameters of every safetensors file in `folder` (recursively); with `inside`,
    of those whose real path is under it (a link out of it is passed over)."""
    summary = SafetensorsSummary()
    files = [folder] if folder.is_file() else sorted(folder.rglob("*.safetensors"))
    if inside is not None:
        root = inside.resolve()
        files = [f for f in files if f.resolve().is_relative_to(root)]
    for path in files:
        with path.open("rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ModelFileError(f"{path.name} is too short to be safetensors")
            length = struct.unpack("<Q", raw)[0]
            if length > 100 * 1024 * 1024:
                raise ModelFileError(f"{path.name} has an implausible header")
            try:
                header = json.loads(handle.read(length))
            except ValueError:
                raise ModelFileError(f"{path.name} has no JSON header") from None
        if not isinstance(header, dict):
            raise ModelFileError(f"{path.name}: the header is not a JSON object")
        for name, tensor in header.items():
            if name == "__metadata__" or not isinstance(tensor, dict):
                continue
            shape = tensor.get("shape")
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
            ):
                raise ModelFileError(f"{path.name}: tensor {name!r} has no valid shape")
            count = 1
            for dim in shape:
                count *= dim
            summary.parameters += count
            summary.bytes += count * _SAFETENSORS_DTYPE_BYTES.get(str(tensor.get("dtype")), 4)
    return summary


def folder_bytes(path: Path, suffixes: tuple[str, ...] = ()) -> int:
    """Bytes of a file, or of the files under a folder (only those with `suffixes`, if given)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for item in path.rglob("*"):
        if item.is_file() and (not suffixes or item.name.endswith(suffixes)):
            total += item.stat().st_size
    return total
