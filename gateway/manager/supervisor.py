"""Watching backends: each process's exit, and a periodic look at all of them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from gateway.manager.instance import BackendInstance

log = logging.getLogger("hearth.manager")

#: Seconds between two looks at every backend (idle expiry, memory).
TICK_SECONDS = 1.0


class Supervisor:
    """Runs the manager's background work and tells it when a process has exited."""

    def __init__(
        self,
        on_exit: Callable[[BackendInstance, int], None],
        tick: Callable[[], Awaitable[None]],
        interval: float = TICK_SECONDS,
    ) -> None:
        self._on_exit = on_exit
        self._tick = tick
        self._interval = interval
        self._ticker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._run())

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `work` in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def watch(self, instance: BackendInstance) -> None:
        """Call on_exit once `instance`'s process has exited."""
        if instance.process is not None:
            self.spawn(self._wait_for_exit(instance))

    async def _wait_for_exit(self, instance: BackendInstance) -> None:
        assert instance.process is not None
        code = await instance.process.wait()
        self._on_exit(instance, code)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug of ours must not end supervision
                log.exception("supervisor tick failed")
