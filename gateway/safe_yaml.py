"""Reading YAML the gateway did not write: capped in size, in expansion and in depth.

Every YAML file Hearth parses (model files, backends.yaml, the gallery index) goes through
`load_yaml`. PyYAML itself keeps an alias as a shared reference, so a "billion laughs" (anchors
that each repeat the one before) loads in milliseconds; whatever walks the result later (JSON,
protobuf, hashing) pays for every repeat. So the document's size is measured with its aliases
expanded, on the composed node graph (each node measured once), and a document over the limit is
refused before anything is constructed from it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.units import MIB, format_size


@dataclass(frozen=True)
class YAMLLimits:
    """What one kind of YAML file may be: bytes on disk, size with aliases expanded, nesting."""

    #: The kind of file, as refusals name it ("a model file").
    kind: str
    file_bytes: int
    #: Characters of scalars plus one per node, every alias counted as a copy of its anchor.
    expanded_size: int
    depth: int = 64


#: Model files and backends.yaml: a few KiB in practice; a long chat template fits many times.
MODEL_FILE_LIMITS = YAMLLimits("a model file", file_bytes=1 * MIB, expanded_size=2 * MIB)
#: The gallery index: about 1.4 KiB per entry (gallery/index.yaml), so some 3,000 entries; room
#: for merge keys (`<<: *base`), which expand each entry.
GALLERY_INDEX_LIMITS = YAMLLimits("a gallery index", file_bytes=4 * MIB, expanded_size=16 * MIB)


class YAMLLoadError(Exception):
    """A YAML document that cannot be used: unreadable, not YAML, or over a limit. The message
    names its source."""


class YAMLLimitError(YAMLLoadError):
    """A YAML document refused for going over one of its `YAMLLimits`."""


def load_yaml(
    document: str | Path, *, source: str | None = None, limits: YAMLLimits = MODEL_FILE_LIMITS
) -> Any:
    """Parse one YAML document (text, or the path of a file) with PyYAML's SafeLoader, within
    `limits`; raise YAMLLoadError naming `source` (the path by default)."""
    if isinstance(document, Path):
        source = source or str(document)
        text = _read_capped(document, source, limits)
    else:
        source = source or "<string>"
        text = document
        if len(text) > limits.file_bytes or len(text.encode("utf-8")) > limits.file_bytes:
            raise _over_size(source, limits)
    loader = _LimitedLoader(text, source, limits)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source, limits)
        return loader.construct_document(node)
    # ValueError: e.g. an integer of more digits than Python converts.
    except (yaml.YAMLError, ValueError) as exc:
        raise YAMLLoadError(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def _read_capped(path: Path, source: str, limits: YAMLLimits) -> str:
    try:
        # Non-blocking open: a FIFO named *.yaml must not hang the reader (and every caller
        # waiting on the registry's one reload).
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise YAMLLoadError(f"{source}: cannot read: not a regular file")
            data = handle.read(limits.file_bytes + 1)  # never more than the cap, whatever the file
        if len(data) > limits.file_bytes:
            raise _over_size(source, limits)
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise YAMLLoadError(f"{source}: cannot read: {exc}") from None


def _over_size(source: str, limits: YAMLLimits) -> YAMLLimitError:
    return YAMLLimitError(
        f"{source}: refused: larger than {_size(limits.file_bytes)}, the limit for {limits.kind}"
    )


def _size(count: int) -> str:
    return format_size(count) if count >= MIB else f"{count} bytes"


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting past the limit before Python's stack does."""

    def __init__(self, text: str, source: str, limits: YAMLLimits) -> None:
        super().__init__(text)
        self._source = source
        self._limits = limits
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > self._limits.depth:
                raise _too_deep(self._source, self._limits)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _too_deep(source: str, limits: YAMLLimits) -> YAMLLimitError:
    return YAMLLimitError(
        f"{source}: refused: nested deeper than {limits.depth} levels, the limit for {limits.kind}"
    )


def _check_expansion(root: Node, source: str, limits: YAMLLimits) -> None:
    """Refuse a node graph whose tree, aliases expanded, is too large, too deep, or infinite.

    Each distinct node is walked once: what is below it (size, height) is remembered, so a node
    that 9 aliases name costs one walk, not 9. The walk stops at the depth limit, so its own
    recursion stays within it.
    """
    measured: dict[int, tuple[int, int]] = {}  # id(node) → (expanded size, height)
    open_nodes: set[int] = set()  # on the walk's current path: meeting one again is a cycle

    def too_large() -> YAMLLimitError:
        return YAMLLimitError(
            f"{source}: refused: with its aliases expanded it is larger than "
            f"{_size(limits.expanded_size)}, the limit for {limits.kind}"
        )

    def walk(node: Node, depth: int) -> tuple[int, int]:
        key = id(node)
        known = measured.get(key)
        if known is None:
            if key in open_nodes:
                raise YAMLLimitError(
                    f"{source}: refused: an alias refers to a node that contains it "
                    "(a document that never ends)"
                )
            if depth > limits.depth:
                raise _too_deep(source, limits)
            if isinstance(node, ScalarNode):
                known = (1 + len(node.value), 1)
            else:
                if isinstance(node, SequenceNode):
                    children = list(node.value)
                elif isinstance(node, MappingNode):
                    children = [part for pair in node.value for part in pair]
                else:  # pragma: no cover - PyYAML composes only these three
                    raise YAMLLoadError(f"{source}: not valid YAML: unknown node {node!r}")
                open_nodes.add(key)
                size, height = 1, 0
                for child in children:
                    child_size, child_height = walk(child, depth + 1)
                    size += child_size
                    height = max(height, child_height)
                    if size > limits.expanded_size:
                        raise too_large()
                open_nodes.discard(key)
                known = (size, height + 1)
            measured[key] = known
        if depth + known[1] - 1 > limits.depth:
            raise _too_deep(source, limits)
        return known

    size, _ = walk(root, 1)
    if size > limits.expanded_size:
        raise too_large()
