"""Serving the app with uvicorn: connection timeouts and a graceful stop.

uvicorn times out idle keep-alive connections, but not a client that connects and sends nothing,
or drips its request headers a byte at a time: each would hold a connection (and a file
descriptor) forever. `HeaderTimeoutProtocol` closes a connection whose request headers are not
complete `read_timeout` seconds after it opened (or after the request began). The body's pace is
RequestLifetime's to bound (gateway/lifetime.py).

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

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

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
    uvicorn.Server(config).run()
