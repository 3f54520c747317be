"""A request's lifetime: whatever it holds ends with it, however it ends.

`RequestLifetime` is ASGI middleware around every HTTP request. It runs the request's handler
(and its response, a stream included) as one task, and it owns a `RequestLife` on which the
request registers what it holds: a concurrency slot, a gRPC stream. When the request ends, by
finishing, failing, or because its client left at any moment (queued, while the model loads,
during prompt processing, mid-stream), the handler's task is cancelled if still running and
everything registered is closed, in one place. Routes have no `finally` of their own for this:
a stream that the framework abandons before its first byte still gives back its slot.

It also bounds the client's pace: each part of the body within `read_timeout` seconds and the
whole body at `MIN_BODY_RATE` on average after the first `read_timeout` (else 408), and each part
of the answer taken within `read_timeout` (a client that stops reading a stream would otherwise
hold its slot, and the model, for as long as it stays connected).

Each request gets an id (the client's `x-request-id` when it is short and plain, else a new one):
every log line written while it is handled carries it, and so does its answer's `x-request-id`
header (both in gateway/identity.py).
When it ends, the request is counted by route, model and status in the app's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    Message,
    Receive,
    ReceiveMessage,
    Scope,
    Send,
)

from gateway import identity
from gateway.errors import OpenAIError, send_error
from gateway.metrics import NO_MODEL, Metrics

log = logging.getLogger("hearth.gateway")

SCOPE_KEY = "hearth.life"
#: The status counted for a request whose client left before any answer began (as nginx does).
CLIENT_GONE_STATUS = 499
#: Bytes a second a request body must average, once its first `read_timeout` has passed.
MIN_BODY_RATE = 16 * 1024
#: Seconds a request cancelled by the server's stop gets to unwind before what it holds is closed.
_UNWIND_SECONDS = 5.0

Closer = Callable[[], Awaitable[Any] | None]


class RequestLife:
    """What one HTTP request holds, closed (last registered first) when the request ends."""

    def __init__(self) -> None:
        self._closers: list[Closer] = []
        #: The client disconnected before the answer was complete.
        self.client_gone = False
        self.ended = False
        #: time.monotonic() when the request arrived.
        self.started = time.monotonic()
        #: The catalog name of the model the request is for, once its route has looked it up
        #: (`routes.common.resolve_model`): the request's model label in the metrics.
        self.model = NO_MODEL

    def on_end(self, closer: Closer) -> None:
        """Run `closer` (sync or async) when the request ends; at once if it already has."""
        self._closers.append(closer)
        if self.ended:
            asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                result = closer()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # one closer failing must not keep the others from running
                log.exception("closing a request's resources failed")

    async def end(self) -> None:
        self.ended = True
        # Shielded: a request cancelled while it ends still gives back everything it held.
        await asyncio.shield(self._close())


def life_of(request: Request[Any, Any, Any]) -> RequestLife:
    """The RequestLife of `request`, which RequestLifetime set up."""
    life = request.scope.get(SCOPE_KEY)
    if not isinstance(life, RequestLife):
        raise RuntimeError("RequestLifetime middleware is not installed")
    return life


class RequestLifetime:
    """ASGI middleware: one task per request, cancelled when its client leaves; what the
    request registered on its RequestLife is closed when it ends."""

    def __init__(self, app: ASGIApp, read_timeout: float) -> None:
        self.app = app
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        life = RequestLife()
        scope[SCOPE_KEY] = life  # type: ignore[literal-required]
        # Set before the handler's task is made: it runs in a copy of this context.
        identity.request_id.set(identity.request_id_of(scope))
        status: int | None = None
        gone = asyncio.Event()
        body_read = False
        body_bytes = 0
        body_started: float | None = None
        answered = False
        started = False
        event_stream = False
        watcher: asyncio.Task[None] | None = None
        handler: asyncio.Task[None] | None = None

        async def watch() -> None:
            """Once the body is in, the next message can only be the client leaving."""
            while (await receive())["type"] != "http.disconnect":
                pass
            if not answered:
                life.client_gone = True
                log.debug("client left %s before its answer was complete", scope["path"])
                if handler is not None:
                    handler.cancel()
            gone.set()

        async def receive_body() -> ReceiveMessage:
            nonlocal body_read, body_bytes, body_started, watcher
            if body_read:
                await gone.wait()
                return {"type": "http.disconnect"}
            loop = asyncio.get_running_loop()
            if body_started is None:
                body_started = loop.time()
            # Each part in time, and the whole at a least average rate: a byte a second would
            # otherwise hold the connection for as long as the body is large.
            allowed = body_started + self.read_timeout + body_bytes / MIN_BODY_RATE - loop.time()
            try:
                message = await asyncio.wait_for(receive(), min(self.read_timeout, allowed))
            except TimeoutError:
                raise OpenAIError(
                    408,
                    f"the request body did not arrive in time (each part within "
                    f"{self.read_timeout:g} s, the whole at {MIN_BODY_RATE // 1024} KiB/s)",
                    code="request_timeout",
                ) from None
            if message["type"] == "http.request":
                body_bytes += len(message.get("body", b""))
            if message["type"] == "http.disconnect":
                life.client_gone = True
                body_read = True
                gone.set()
            elif not message.get("more_body", False):
                body_read = True
                watcher = asyncio.get_running_loop().create_task(watch())
            return message

        async def send_answer(message: Message) -> None:
            nonlocal answered, started, event_stream, status
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = dict(message.get("headers", ()))
                event_stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
                if identity.REQUEST_ID_HEADER.encode() not in headers:
                    message["headers"] = [
                        *message.get("headers", ()),
                        identity.request_id_header(scope),
                    ]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            try:
                # asyncio.timeout, not wait_for: this runs for every piece of a stream, and
                # wait_for would make a task of each.
                async with asyncio.timeout(self.read_timeout):
                    await send(message)
            except TimeoutError:
                # The client stopped reading: treat it as gone. (uvicorn then closes the
                # connection, since the answer was not completed.)
                log.warning(
                    "client of %s read nothing for %g s; ending its request",
                    scope["path"],
                    self.read_timeout,
                )
                life.client_gone = True
                assert handler is not None  # we are running in it
                handler.cancel()
                await asyncio.sleep(0)  # the cancellation lands here, as if the client had left

        handler = asyncio.get_running_loop().create_task(
            self.app(scope, receive_body, send_answer)  # type: ignore[arg-type]
        )
        try:
            await asyncio.shield(handler)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                handler.cancel()  # we are cancelled (the server is stopping): so is the request
                # Let it unwind (its gRPC call cancelled, its stream closed) before what it
                # holds is closed under it.
                await asyncio.wait({handler}, timeout=_UNWIND_SECONDS)
                task.uncancel()  # ours to finish: tell the client, rather than cut it off
                if not answered:
                    await _cut_short(send, started, event_stream)
                    status = status or 503
            elif not life.client_gone:
                raise
            # Else the handler was cancelled because its client left: nobody to answer.
        finally:
            if watcher is not None:
                watcher.cancel()
            await life.end()
            metrics = _metrics_of(scope)
            if metrics is not None:
                # No status: the client left before an answer began, or a bug of ours.
                counted = status or (CLIENT_GONE_STATUS if life.client_gone else 500)
                metrics.request_done(scope.get("path_template", ""), life.model, counted)


def _metrics_of(scope: Scope) -> Metrics | None:
    """The app's metrics (its BackendManager's), once its lifespan has made them."""
    manager = getattr(scope["app"].state, "manager", None)
    metrics = getattr(manager, "metrics", None)
    return metrics if isinstance(metrics, Metrics) else None


async def _cut_short(send: Send, started: bool, event_stream: bool) -> None:
    """End an answer the server's stop cut short: a 503 if none had begun; for a stream, one
    SSE error event and [DONE], as for any error mid-stream. Anything else just ends."""
    error = OpenAIError(
        503, "the server is shutting down; try again once it is back", code="shutting_down"
    )
    body = json.dumps(error.body()).encode()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            if not started:
                await send_error(send, error, close=True)
            elif event_stream:
                ending: HTTPResponseBodyEvent = {
                    "type": "http.response.body",
                    "body": b"data: " + body + b"\r\n\r\ndata: [DONE]\r\n\r\n",
                    "more_body": False,
                }
                await send(ending)


def lifetime_middleware(read_timeout: float) -> Callable[[ASGIApp], ASGIApp]:
    """The middleware factory Litestar's `middleware=` takes."""

    def wrap(app: ASGIApp) -> ASGIApp:
        return RequestLifetime(app, read_timeout)

    return wrap
