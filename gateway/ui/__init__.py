"""The web UI's files: one page and its scripts and styles, shipped in the package.

Every file under `static/` is read once, at first use, and kept in memory with its ETag; only
those names are served, so no request path reaches the file system. The page talks to the same
API as any client (with the key the person typed, kept in the browser), so it adds no power of
its own. Its Content-Security-Policy allows this server's own scripts and nothing else: model
output shown on the page can never run as script, and no CDN or other site is ever asked.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"

#: Litestar adds `; charset=utf-8` to text types itself.
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'; manifest-src 'self'; require-trusted-types-for 'script'"
)

#: Sent with every file of the UI. `no-cache`: the browser keeps a copy but asks (with its
#: ETag) each time, so an upgraded server's page is never mixed with an old script.
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


@functools.cache
def assets() -> dict[str, Asset]:
    """The UI's files by name (`index.html`, `app.js`, ...)."""
    found = {}
    for path in sorted(STATIC.iterdir()):
        media_type = _TYPES.get(path.suffix)
        if media_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        found[path.name] = Asset(body, media_type, etag)
    return found
