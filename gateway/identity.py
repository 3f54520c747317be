"""Who is asking, and which request this is: set once per request, read anywhere below it.

Context variables, so that log lines, metrics and error redaction can know the caller and the
request without every function passing them on. Each request gets an id (the client's
`x-request-id` when it is short and plain, else a new one): every log line written while it is
handled carries it (`RequestIdFilter`), and so does its answer's `x-request-id` header (added
by RequestLifetime, and for requests no route matched by the HTTP error handler).
"""

from __future__ import annotations

import logging
import re
import secrets
from contextvars import ContextVar
from dataclasses import dataclass

from litestar.types import Scope

REQUEST_ID_KEY = "hearth.request_id"
REQUEST_ID_HEADER = "x-request-id"
#: A client's own request id is kept only if it is this plain: it goes into logs and headers.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Caller:
    """The key a request came with (or none), and what it may do."""

    #: The key's name (never the key itself): "local" when the server has no keys, "anonymous"
    #: for a request without a valid key on an open route.
    name: str
    #: May manage the server (gallery, unload, /backends, /metrics) and sees everything.
    admin: bool = False
    #: May call the inference API.
    inference: bool = False
    #: May scrape /metrics.
    metrics: bool = False
    #: The models an inference key is limited to; None: every model.
    models: frozenset[str] | None = None

    def may_use(self, model: str) -> bool:
        return self.admin or self.models is None or model in self.models


#: When the server has no keys (loopback use): whoever asks may do everything.
LOCAL = Caller("local", admin=True, inference=True, metrics=True)
ANONYMOUS = Caller("anonymous")

#: Set by the app's guard for each request; anything outside one (or before its guard) is
#: nobody in particular, so redaction and model limits fail closed.
caller: ContextVar[Caller] = ContextVar("hearth_caller", default=ANONYMOUS)
request_id: ContextVar[str] = ContextVar("hearth_request_id", default="-")


def request_id_header(scope: Scope) -> tuple[bytes, bytes]:
    """The `x-request-id` header of the request of `scope`'s answer."""
    return (REQUEST_ID_HEADER.encode(), request_id_of(scope).encode())


def request_id_of(scope: Scope) -> str:
    """The id of the request of `scope`: the client's `x-request-id` if it is short and plain,
    else a new one. The same for the whole request."""
    known = scope.get(REQUEST_ID_KEY)
    if isinstance(known, str):
        return known
    given = next(
        (value for name, value in scope.get("headers", ()) if name == REQUEST_ID_HEADER.encode()),
        b"",
    ).decode("latin-1")
    request_id = given if _CLIENT_REQUEST_ID.fullmatch(given) else f"req_{secrets.token_hex(12)}"
    scope[REQUEST_ID_KEY] = request_id  # type: ignore[literal-required]
    return request_id


class RequestIdFilter(logging.Filter):
    """Gives each log record `request_id`, the id of the request being handled ("-" outside
    one), and `request_tag`, " [<id>]" or nothing, for the log format to show."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id_now = request_id.get()
        record.request_id = request_id_now
        # What the log format shows after the logger's name: nothing outside a request.
        record.request_tag = f" [{request_id_now}]" if request_id_now != "-" else ""
        return True
