"""BackendManager: composes the registry, admission, processes and supervision.

One backend process per loaded model. The first request for a model starts and loads it;
concurrent first requests share that one start. A process that dies is noticed, and the next
request starts a fresh one. Stopping the gateway stops every backend it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from gateway.client import BackendClient
from gateway.config import BUILTIN_BACKENDS, CustomBackend, ModelConfig
from gateway.errors import OpenAIError
from gateway.manager.admission import Lease
from gateway.manager.instance import BackendInstance, State
from gateway.manager.process import Launcher, load_request_for
from gateway.manager.registry import ModelRegistry
from gateway.manager.supervisor import Supervisor
from gateway.settings import Settings
from protos.hearth.backend.v1.contract import Capability, Reason

log = logging.getLogger("hearth.manager")

T = TypeVar("T")
_CHANNEL_CLOSE_GRACE_SECONDS = 30.0

_CAPABILITY_WORDS = {
    Capability.TEXT: "text generation (chat and completions)",
    Capability.EMBEDDINGS: "embeddings",
    Capability.TRANSCRIPTION: "audio transcription",
    Capability.IMAGES: "image generation",
}


class BackendManager:
    """Owns every backend of the gateway: which run, and which requests they serve."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.models_dir)
        self.launcher = Launcher(settings)
        self.supervisor = Supervisor(on_exit=self._exited, tick=self._tick)
        self._instances: dict[str, BackendInstance] = {}
        self._starting: dict[str, asyncio.Task[BackendInstance]] = {}
        self._closing = False

    # Lifecycle of the manager -----------------------------------------------------------------

    async def start(self) -> None:
        self.launcher.open()
        self.registry.catalog()
        self.supervisor.start()

    async def close(self) -> None:
        """Stop every backend (SIGTERM, then SIGKILL after a grace period)."""
        self._closing = True
        self.supervisor.close()
        for task in list(self._starting.values()):
            task.cancel()
        instances = list(self._instances.values())
        self._instances.clear()
        await asyncio.gather(*(self.launcher.stop(i) for i in instances), return_exceptions=True)
        await self.launcher.close()

    # Serving requests -------------------------------------------------------------------------

    @property
    def runtime_dir(self) -> Path:
        return self.launcher.runtime_dir

    @property
    def ready(self) -> bool:
        """Started and not shutting down."""
        return self.launcher.is_open and not self._closing

    def loaded(self) -> dict[str, BackendInstance]:
        return {name: i for name, i in self._instances.items() if i.alive}

    async def acquire(self, config: ModelConfig, capability: Capability) -> Lease:
        """A slot on a live, loaded backend for `config`'s model that serves `capability`."""
        name = config.name
        instance = await self._ensure(config)
        if capability not in instance.capabilities:
            raise OpenAIError(
                400,
                f"model '{name}' does not support {_CAPABILITY_WORDS[capability]}",
                param="model",
                code="model_not_supported",
            )
        await instance.slots.take(name)
        return Lease(instance)

    async def open(
        self,
        config: ModelConfig,
        capability: Capability,
        start: Callable[[BackendClient], Awaitable[T]],
    ) -> tuple[Lease, T]:
        """Acquire and make the first call; if the backend turns out dead, retry once on a new one.

        The caller (which resolved `config` from the registry once) releases the lease when its
        work, a whole stream say, is done.
        """
        for attempt in range(2):
            lease = await self.acquire(config, capability)
            try:
                return lease, await start(lease.client)
            except OpenAIError as exc:
                lease.release()
                if await self._lost(lease.instance, exc) and attempt == 0:
                    log.warning("backend for %s was lost; starting it again", config.name)
                    continue
                raise
            except BaseException:
                lease.release()
                raise
        raise AssertionError("unreachable")

    async def call(
        self,
        config: ModelConfig,
        capability: Capability,
        start: Callable[[BackendClient], Awaitable[T]],
    ) -> T:
        """A whole unary request: acquire, call (retried once on a dead backend), release."""
        lease, result = await self.open(config, capability, start)
        lease.release()
        return result

    def preload(self, name: str) -> None:
        """Start and load `name` in the background; a failure is logged, not raised."""

        async def load() -> None:
            try:
                await self._ensure(self.registry.get(name))
                log.info("preloaded %s", name)
            except OpenAIError as exc:
                log.error("could not preload %s: %s", name, exc.message)

        self.supervisor.spawn(load())

    async def _lost(self, instance: BackendInstance, error: OpenAIError) -> bool:
        """Whether `error` means the backend is gone (or lost its model); if so, forget it."""
        if error.code not in {"backend_unavailable", Reason.MODEL_NOT_LOADED}:
            return False
        # A local process that has exited is gone; a remote one that fails so cannot be
        # trusted either: the next start health-checks and loads it again.
        if instance.process is not None and not await instance.exited(timeout=2.0):
            return False
        if not instance.dead:
            self._forget(instance)
        return True

    async def _ensure(self, config: ModelConfig) -> BackendInstance:
        if self._closing:
            raise OpenAIError(503, "the server is shutting down", code="shutting_down")
        instance = self._instances.get(config.name)
        if instance is not None and instance.alive:
            return instance
        if instance is not None:
            self._forget(instance)
        task = self._starting.get(config.name)
        if task is None:
            task = asyncio.create_task(self._start(config))
            self._starting[config.name] = task
            task.add_done_callback(lambda _: self._starting.pop(config.name, None))
        # shield: one impatient client leaving must not abort the start the others wait on.
        return await asyncio.shield(task)

    # Starting a backend -----------------------------------------------------------------------

    def _custom(self, config: ModelConfig) -> CustomBackend | None:
        if config.backend in BUILTIN_BACKENDS:
            return None
        custom = self.registry.catalog().backends.get(config.backend)
        if custom is None:
            raise OpenAIError(
                500, f"model '{config.name}' names unknown backend '{config.backend}'"
            )
        return custom

    async def _start(self, config: ModelConfig) -> BackendInstance:
        instance = await self.launcher.spawn(config, self._custom(config))
        pump = None
        if instance.process is not None:
            pump = asyncio.create_task(self.launcher.pump_output(instance))
        try:
            await self.launcher.wait_healthy(instance)
            request = load_request_for(config, self.settings.models_dir)
            started = time.monotonic()
            await self.launcher.load(instance, request)
            log.info("loaded %s in %.2f s", config.name, time.monotonic() - started)
        except BaseException:
            await self.launcher.stop(instance)
            if pump is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pump, 1.0)
            raise
        instance.state = State.READY
        instance.loaded_at = time.time()
        instance.last_used = time.monotonic()
        self._instances[config.name] = instance
        self.supervisor.watch(instance)
        return instance

    def _exited(self, instance: BackendInstance, code: int) -> None:
        """A process ended: if nobody asked for it, say so; the next request starts a new one."""
        if instance.process is not None:
            self.launcher.processes.discard(instance.process)
        if not self._closing and not instance.dead:
            log.warning(
                "backend for %s exited unexpectedly (code %s); the next request starts a new one"
                "\n%s",
                instance.config.name,
                code,
                instance.recent_output(),
            )
        self._forget(instance)

    def _forget(self, instance: BackendInstance) -> None:
        instance.dead = True
        instance.state = State.STOPPED
        if self._instances.get(instance.config.name) is instance:
            del self._instances[instance.config.name]
        # Calls still in flight fail on their own (UNAVAILABLE) and are answered as such;
        # closing the channel at once would cancel them instead.
        self.supervisor.spawn(instance.client.channel.close(grace=_CHANNEL_CLOSE_GRACE_SECONDS))

    # Stopping ---------------------------------------------------------------------------------

    async def unload(self, name: str) -> bool:
        """Stop the backend serving `name`; False if none was running."""
        instance = self._instances.get(name)
        if instance is None:
            return False
        await self._stop(instance)
        return True

    async def _stop(self, instance: BackendInstance) -> None:
        if self._instances.get(instance.config.name) is instance:
            del self._instances[instance.config.name]
        await self.launcher.stop(instance)

    async def _tick(self) -> None:
        """End backends idle for longer than their model's keep_alive."""
        now = time.monotonic()
        for instance in list(self._instances.values()):
            keep_alive = instance.config.keep_alive_seconds()
            if (
                keep_alive is not None
                and instance.slots.idle
                and now - instance.last_used > keep_alive
            ):
                log.info("unloading %s after %.0f s idle", instance.config.name, keep_alive)
                await self._stop(instance)
