"""What web pages may do to this server: Host allow-list, Origin check, CORS.

A home server is reachable from every page a household's browsers open. Without these, any page
could POST to it (a `text/plain` body needs no CORS preflight) and, through DNS rebinding (a name
of the attacker's that resolves to this server), read its answers too. So, in every mode, keys or
none:
- the Host header must be a name no web page's author can point at this server (an IP address,
  a one-label name, a name under a private suffix: see HostRule) or one of
  `HEARTH_ALLOWED_HOSTS`; else 400;
- a request that changes something (any method but GET, HEAD, OPTIONS) from a page of another
  origin is refused (403) unless that origin is in `HEARTH_CORS_ORIGINS`;
- CORS is closed unless `HEARTH_CORS_ORIGINS` names the origin (or is `*`): preflights from
  other origins get 403, and their answers carry no Access-Control-Allow-Origin.
The body's Content-Type is checked per route (`BODY_TYPE` in a route's opt; `gateway/app.py`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Message,
    Receive,
    Scope,
    Send,
)

from gateway.errors import OpenAIError, send_error

#: Key of a route's `opt` that names the body it takes (JSON unless it says multipart).
BODY_TYPE = "body_type"
JSON = "application/json"
MULTIPART = "multipart/form-data"

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Headers a browser page may send on an allowed cross-origin request.
_ALLOWED_REQUEST_HEADERS = (
    "authorization, content-type, x-api-key, x-request-id, openai-organization, openai-project"
)
#: Headers a page may read from an answer.
_EXPOSED_HEADERS = b"x-request-id, retry-after, x-should-retry"
_PREFLIGHT_MAX_AGE = b"600"


def _host_name(host: str) -> str:
    """The name or address of a Host header, without its port, lower case ("" for none)."""
    if "@" in host or "/" in host:  # userinfo or a path: no Host header a browser sends
        return ""
    try:
        return urlsplit(f"//{host.strip()}").hostname or ""
    except ValueError:
        return ""


def _host_port(host: str, scheme: str) -> int | None:
    default = 443 if scheme == "https" else 80
    try:
        return urlsplit(f"//{host.strip()}").port or default
    except ValueError:
        return None


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


#: Names under these can only be given by this network's own resolver (mDNS, the router's DNS,
#: names reserved for private use): no web page's author can point one at this server.
PRIVATE_SUFFIXES = (".localhost", ".local", ".lan", ".home.arpa", ".internal")


_HOSTS_REMEMBERED = 256


class HostRule:
    """Which Host headers name this server.

    DNS rebinding needs a name whose DNS the attacker controls, resolving to this server. So
    IP addresses are safe, and so are names no public DNS can give: one-label names ("hearth",
    a Docker service; "homeserver"), and names under PRIVATE_SUFFIXES. Any other name must be
    in HEARTH_ALLOWED_HOSTS.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        entries = {a.strip().lower().rstrip(".") for a in allowed if a.strip()}
        self.any = "*" in entries
        self.names = {n for n in entries if not n.startswith(".")}
        #: ".example.org" allows every name under example.org.
        self.suffixes = (*(n for n in entries if n.startswith(".")), *PRIVATE_SUFFIXES)
        #: Host headers already judged (every request sends one; most send the same few).
        self._seen: dict[str, bool] = {}

    def allows(self, host: str) -> bool:
        if self.any:
            return True
        known = self._seen.get(host)
        if known is None:
            known = self._allows(host)
            if len(self._seen) < _HOSTS_REMEMBERED:  # any client may send any Host: bounded
                self._seen[host] = known
        return known

    def _allows(self, host: str) -> bool:
        name = _host_name(host).rstrip(".")
        if not name:
            return False
        return (
            _is_address(name)
            or "." not in name
            or name in self.names
            or name.endswith(self.suffixes)
        )


class CorsRule:
    """Which other origins' pages may call this server."""

    def __init__(self, origins: Iterable[str]) -> None:
        entries = {o.strip().rstrip("/").lower() for o in origins if o.strip()}
        self.any = "*" in entries
        self.origins = entries - {"*"}

    def allows(self, origin: str) -> bool:
        return self.any or origin.rstrip("/").lower() in self.origins


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether a page of `origin` is this server's own (its Host, port included)."""
    if host is None:
        return False
    try:  # a malformed Origin ("http://[::1") is nobody's own
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    return parts.hostname == _host_name(host) and port == _host_port(host, parts.scheme)


class BrowserGuard:
    """ASGI middleware: the Host, Origin and CORS rules above."""

    def __init__(self, app: ASGIApp, hosts: HostRule, cors: CorsRule) -> None:
        self.app = app
        self.hosts = hosts
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for key, value in scope["headers"]:  # the first of a header given twice, as Litestar reads
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        host = headers.get("host")
        if host is not None and not self.hosts.allows(host):
            name = _host_name(host)
            await send_error(
                send,
                OpenAIError(
                    400,
                    f"This server does not answer to the name '{name}'. If that is its name on "
                    "your network, add it to HEARTH_ALLOWED_HOSTS.",
                    code="host_not_allowed",
                ),
            )
            return
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        method = str(scope.get("method", ""))
        allowed = self.cors.allows(origin)
        if method == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(send, origin, allowed, headers)
            return
        if method not in _SAFE_METHODS and not allowed and not _same_origin(origin, host):
            await send_error(
                send,
                OpenAIError(
                    403,
                    f"Requests from pages of {origin} are not allowed; to allow them, add the "
                    "origin to HEARTH_CORS_ORIGINS.",
                    code="origin_not_allowed",
                ),
            )
            return
        if not allowed:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-expose-headers", _EXPOSED_HEADERS),
                    (b"vary", b"Origin"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(
        self, send: Send, origin: str, allowed: bool, headers: dict[str, str]
    ) -> None:
        if not allowed:
            await send_error(
                send,
                OpenAIError(
                    403,
                    f"Pages of {origin} may not call this server (CORS is closed to them; "
                    "HEARTH_CORS_ORIGINS opens it).",
                    code="origin_not_allowed",
                ),
            )
            return
        requested = headers.get("access-control-request-headers", "")
        allow_headers = requested or _ALLOWED_REQUEST_HEADERS
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": 204,
            "headers": [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
                (b"access-control-allow-headers", allow_headers.encode("latin-1")),
                (b"access-control-max-age", _PREFLIGHT_MAX_AGE),
                (b"vary", b"Origin"),
            ],
        }
        await send(start)
        empty: HTTPResponseBodyEvent = {
            "type": "http.response.body",
            "body": b"",
            "more_body": False,
        }
        await send(empty)


def browser_guard(allowed_hosts: Iterable[str], cors_origins: Iterable[str]) -> Any:
    """The middleware factory for Litestar's `middleware=[...]`."""
    hosts, cors = HostRule(allowed_hosts), CorsRule(cors_origins)

    def factory(app: ASGIApp) -> ASGIApp:
        return BrowserGuard(app, hosts, cors)

    return factory


def check_content_type(method: str, headers: Any, expected: str) -> None:
    """A request that carries a body must say it is `expected` (JSON or a multipart form):
    a page may send `text/plain` or a form to any server without asking, but not JSON."""
    if method in _SAFE_METHODS:
        return
    length = headers.get("content-length")
    has_body = headers.get("transfer-encoding") is not None or (
        length is not None and length.strip() not in ("", "0")
    )
    if not has_body:
        return
    given = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if expected == JSON:
        ok = given == JSON or (given.startswith("application/") and given.endswith("+json"))
    else:
        ok = given == expected
    if not ok:
        raise OpenAIError(
            415,
            f"This route takes {expected} bodies; the request says "
            f"{given or 'nothing'} (send Content-Type: {expected}).",
            code="unsupported_media_type",
        )
