"""Writing tuned values into a model's YAML: only the tuned top-level keys change.

The file is edited as text, not re-dumped: every other line, comment and blank line stays as
the user wrote it. A tuned key's line is replaced (a comment the user had on it moves to a line
of its own above it); a key the file lacks is added at its end. The result must load with the
gateway's own loader, with the new values and every other setting unchanged, before it replaces
the file (a temp file in the same folder, then a rename).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import msgspec

from gateway.config import ConfigError, ModelConfig, load_model_file

#: The keys tune may write, in the order it adds missing ones.
TUNED_KEYS = ("threads", "batch_size", "parallel", "context_size")
#: What marks the comment tune writes beside a key (replaced, not kept, on the next write).
MARK = "# hearth tune"


class WriteError(Exception):
    """The YAML could not be changed safely; nothing was written."""


@dataclass(frozen=True)
class Change:
    key: str
    old: int | None
    new: int
    line: str


def _key_line(key: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(key)}[ \t]*:(?:[ \t]|$)")


def _split_comment(value: str) -> tuple[str, str]:
    """A plain scalar and its trailing comment (` # ...`), as YAML reads a line's end."""
    match = re.search(r"(^|[ \t])#", value)
    if match is None:
        return value.strip(), ""
    return value[: match.start()].strip(), value[match.start() :].strip()


def edit_text(text: str, values: dict[str, int], comments: dict[str, str]) -> tuple[str, list[str]]:
    """`text` with each key of `values` set (and its comment beside it); the new lines."""
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines()
    written = []
    for key in TUNED_KEYS:
        if key not in values:
            continue
        note = comments.get(key, "")
        line = f"{key}: {values[key]}  {MARK} {note}".rstrip()
        written.append(line)
        pattern = _key_line(key)
        found = [i for i, text_line in enumerate(lines) if pattern.match(text_line)]
        if len(found) > 1:
            raise WriteError(f"the file sets {key} more than once")
        if not found:
            lines.append(line)
            continue
        index = found[0]
        value, comment = _split_comment(lines[index].split(":", 1)[1])
        end = index + 1
        if not value:  # the value is on the lines below (indented)
            while end < len(lines) and lines[end][:1] in (" ", "\t") and lines[end].strip():
                end += 1
        replacement = [line]
        if comment and not comment.startswith(MARK):
            replacement.insert(0, comment)  # the user's own note stays, on its own line
        lines[index:end] = replacement
    return newline.join(lines) + newline, written


def write_settings(
    path: Path, models_dir: Path, values: dict[str, int], comments: dict[str, str]
) -> list[Change]:
    """Set `values` (tuned keys only) in the model YAML at `path`; what changed."""
    unknown = set(values) - set(TUNED_KEYS)
    if unknown:
        raise WriteError(f"not a tuned key: {', '.join(sorted(unknown))}")
    if path.is_symlink():
        raise WriteError(f"{path} is a symbolic link; edit the file it points to yourself")
    try:
        original = load_model_file(path, models_dir)
        text = path.read_text(encoding="utf-8")
        mode = stat.S_IMODE(path.stat().st_mode)
    except (OSError, UnicodeDecodeError, ConfigError) as exc:
        raise WriteError(f"cannot read {path}: {exc}") from None
    edited, lines = edit_text(text, values, comments)
    # Not *.yaml: a gateway reading the models dir meanwhile never sees the half-made file.
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as handle:
            handle.write(edited)
        _check(Path(temporary), models_dir, original, values, lines)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return [
        Change(key, getattr(original, key), values[key], line)
        for key, line in zip([k for k in TUNED_KEYS if k in values], lines, strict=True)
    ]


def _check(
    candidate: Path,
    models_dir: Path,
    original: ModelConfig,
    values: dict[str, int],
    lines: list[str],
) -> None:
    """The edited file loads, with `values` set and every other setting as it was."""
    manual = "add these lines to it yourself:\n  " + "\n  ".join(lines)
    try:
        edited = load_model_file(candidate, models_dir)
    except ConfigError as exc:
        detail = str(exc).replace(str(candidate), "the edited file")
        raise WriteError(f"the edited file would not load ({detail}); {manual}") from None
    if any(getattr(edited, key) != value for key, value in values.items()):
        raise WriteError(f"the file's layout kept the values from being set; {manual}")
    restored = msgspec.structs.replace(
        edited, source=original.source, **{key: getattr(original, key) for key in values}
    )
    if restored != original:
        raise WriteError(f"editing the file as text would change other settings; {manual}")
