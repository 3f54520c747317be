"""Sizes as people write them, and as the gateway reports them."""

from __future__ import annotations

import re

MIB = 1024**2
GIB = 1024**3

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str | int) -> int:
    """'8G', '8GiB', '8 GB', '512M', '1073741824' → bytes (K, M, G, T are powers of 1024)."""
    if isinstance(text, bool) or (isinstance(text, int) and text < 0):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match or (match.group(3) and not match.group(2)):
        raise ValueError(f"not a size: {text!r} (use e.g. 8G, 512MiB or a number of bytes)")
    return int(float(match.group(1)) * 1024 ** _SIZE_POWERS[match.group(2).lower()])


def format_size(count: int | float) -> str:
    """Bytes as the GiB or MiB a person reads."""
    if abs(count) >= GIB:
        return f"{count / GIB:.1f} GiB"
    return f"{count / MIB:.0f} MiB"
