"""Admission: a model's concurrency slots and queue, and a request's lease on a backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.errors import OpenAIError

if TYPE_CHECKING:
    from gateway.manager.instance import BackendInstance


class Slots:
    """At most `limit` requests at once; at most `queue` more waiting, the rest get 429."""

    def __init__(self, limit: int, queue: int) -> None:
        self.limit = limit
        self._semaphore = asyncio.Semaphore(limit)
        self._queue = queue
        self.waiting = 0
        self.busy = 0

    @property
    def idle(self) -> bool:
        return self.busy == 0 and self.waiting == 0

    async def take(self, model: str) -> None:
        if self._semaphore.locked() and self.waiting >= self._queue:
            raise OpenAIError(
                429,
                f"model '{model}' is busy: too many requests are waiting; retry shortly",
                code="model_busy",
                retry_after=1,
            )
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.busy += 1

    def give(self) -> None:
        self.busy -= 1
        self._semaphore.release()


class Lease:
    """A request's hold on a backend: one concurrency slot, released exactly once.

    `on_release` runs once, when the request ends for whatever reason (done, failed, client
    gone), so that what depends on the request's lifetime (keep_alive, CPU shares, memory
    waiters) is settled in one place.
    """

    def __init__(
        self,
        instance: BackendInstance,
        on_release: Callable[[Lease], None] | None = None,
        keep_alive: float | None = None,
    ) -> None:
        self.instance = instance
        self.client = instance.client
        #: The request's own keep_alive in seconds (math.inf: forever), if it sent one.
        self.keep_alive = keep_alive
        self._on_release = on_release
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.instance.last_used = time.monotonic()
        self.instance.slots.give()
        if self._on_release is not None:
            self._on_release(self)
