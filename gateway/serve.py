"""Serving the app with uvicorn: connection timeouts and a graceful stop.

uvicorn times out idle keep-alive connections, but not a client that connects and sends nothing,
or drips its request headers a byte at a time: each would hold a connection (and a file
descriptor) forever. `HeaderTimeoutProtocol` closes a connection whose request headers are not
complete `read_timeout` seconds after it opened (or after the request began), and one whose
answer went out before its body was read (nothing would ever read the rest, and no timer would
run). It also tells every request on a connection that the client left, pipelined ones included
(uvicorn tells only the last). The body's pace, and the answer's, are RequestLifetime's to bound
(gateway/lifetime.py).

On SIGTERM or Ctrl-C uvicorn stops accepting, lets the requests in flight finish for
`shutdown_grace` seconds, cancels what is left, and then the app's lifespan stops the backends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.settings import Settings

log = logging.getLogger("hearth.gateway")


def header_timeout_protocol(timeout: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing connections whose headers take over `timeout` s."""

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _linger: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._cycles: list[Any] = []
            self._arm()

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            self._cycles = [c for c in self._cycles if not c.response_complete]
            self._cycles.append(cycle)
            super()._start_asgi_task(cycle, app)

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()
            if cycle is not None and cycle.more_body and not self.transport.is_closing():
                # Answered before its body was read (a 413, a 404): the rest is discarded as it
                # comes, for a while, then the connection is closed. Closing at once would reset
                # it under a client still sending, and lose the answer; waiting with no timer
                # would let a client hold it forever.
                self._linger = self.loop.call_later(timeout, self._too_slow)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            if self._linger is not None:  # the rest arrived: idle from here, as usual
                self._linger.cancel()
                self._linger = None
                self._unset_keepalive_if_required()
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            for cycle in getattr(self, "_cycles", ()):
                if not cycle.response_complete:
                    cycle.disconnected = True
                    cycle.message_event.set()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(timeout, self._too_slow)

        def _disarm(self) -> None:
            for timer in (self._header_timer, self._linger):
                if timer is not None:
                    timer.cancel()
            self._header_timer = self._linger = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                log.debug("closing a connection that sent no complete request in %g s", timeout)
                self.transport.close()

    return HeaderTimeoutProtocol


def serve(app: Any, settings: Settings) -> None:
    """Serve `app` on the settings' host and port until SIGTERM or Ctrl-C."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=header_timeout_protocol(settings.read_timeout),
        lifespan="on",
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_keep_alive=max(1, round(settings.idle_timeout)),
        timeout_graceful_shutdown=round(settings.shutdown_grace),
    )
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info(
        "serving the OpenAI API at http://%s:%d/v1 and the web UI at http://%s:%d/",
        shown, settings.port, shown, settings.port,
    )  # fmt: skip
    uvicorn.Server(config).run()
