"""BackendManager: spawn, health-wait, load, supervise, restart and stop backend processes.

One backend process per loaded model. The first request for a model starts and loads it;
concurrent first requests share that one start. A process that dies is noticed, and the next
request starts a fresh one. Stopping the gateway stops every backend it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from backends.runtime.backend import Capability
from gateway.client import CHANNEL_OPTIONS, BackendClient
from gateway.config import (
    BUILTIN_BACKENDS,
    Catalog,
    CustomBackend,
    ModelConfig,
    load_catalog,
    resolve_model_path,
)
from gateway.errors import OpenAIError, model_not_found
from gateway.settings import Settings
from protos.hearth.backend.v1 import backend_pb2 as pb

log = logging.getLogger("hearth.manager")

T = TypeVar("T")
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_STDERR_LINES = 40
#: Seconds a backend gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT_SECONDS = 8.0
_REAP_INTERVAL_SECONDS = 1.0
_CHANNEL_CLOSE_GRACE_SECONDS = 30.0


class ModelRegistry:
    """The models dir, read again whenever its YAML files change."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._catalog = Catalog()

    def _current_signature(self) -> tuple[tuple[str, int, int], ...]:
        if not self.models_dir.is_dir():
            return ()
        entries = []
        for path in self.models_dir.iterdir():
            if path.suffix in {".yaml", ".yml"}:
                with contextlib.suppress(OSError):
                    stat = path.stat()
                    entries.append((path.name, stat.st_mtime_ns, stat.st_size))
        return tuple(sorted(entries))

    def catalog(self) -> Catalog:
        signature = self._current_signature()
        if signature != self._signature:
            self._catalog = load_catalog(self.models_dir)
            self._signature = signature
        return self._catalog

    def get(self, name: str) -> ModelConfig:
        config = self.catalog().models.get(name)
        if config is None:
            raise model_not_found(name)
        return config


class _Slots:
    """At most `limit` requests at once; at most `queue` more waiting, the rest get 429."""

    def __init__(self, limit: int, queue: int) -> None:
        self._semaphore = asyncio.Semaphore(limit)
        self._queue = queue
        self.waiting = 0
        self.busy = 0

    async def take(self, model: str) -> None:
        if self._semaphore.locked() and self.waiting >= self._queue:
            raise OpenAIError(
                429,
                f"model '{model}' is busy: too many requests are waiting; retry shortly",
                code="model_busy",
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


@dataclass(eq=False)
class BackendInstance:
    """One running backend with its model loaded."""

    config: ModelConfig
    address: str
    client: BackendClient
    process: asyncio.subprocess.Process | None
    slots: _Slots
    capabilities: frozenset[Capability] = frozenset()
    output: deque[str] = field(default_factory=lambda: deque(maxlen=_STDERR_LINES))
    last_used: float = field(default_factory=time.monotonic)
    dead: bool = False

    @property
    def alive(self) -> bool:
        if self.dead:
            return False
        return self.process is None or self.process.returncode is None

    async def exited(self, timeout: float) -> bool:
        """Whether the process has ended, waiting up to `timeout` seconds to find out."""
        if self.process is None:
            return self.dead
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), timeout)
        return self.process.returncode is not None

    def recent_output(self, lines: int = 12) -> str:
        return "\n".join(list(self.output)[-lines:])


class Lease:
    """A request's hold on a backend: one concurrency slot, released exactly once."""

    def __init__(self, instance: BackendInstance) -> None:
        self.instance = instance
        self.client = instance.client
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.instance.last_used = time.monotonic()
            self.instance.slots.give()


_CAPABILITY_WORDS = {
    Capability.TEXT: "text generation (chat and completions)",
    Capability.EMBEDDINGS: "embeddings",
    Capability.TRANSCRIPTION: "audio transcription",
    Capability.IMAGES: "image generation",
}


def load_request_for(config: ModelConfig, models_dir: Path) -> pb.LoadRequest:
    """What the backend needs to load `config`'s model."""
    options = struct_pb2.Struct()
    options.update(config.options)
    request = pb.LoadRequest(
        model_name=config.name,
        model_path=str(resolve_model_path(models_dir, config.model)) if config.model else "",
        context_size=config.context_size or 0,
        threads=config.threads or 0,
        batch_size=config.batch_size or 0,
        chat_template=config.chat_template or "",
        embeddings=config.embeddings,
        options=options,
    )
    if config.mmap is not None:
        request.mmap = config.mmap
    if config.seed is not None:
        request.seed = config.seed
    return request


class BackendManager:
    """Owns every backend process of the gateway."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.models_dir)
        self._instances: dict[str, BackendInstance] = {}
        self._starting: dict[str, asyncio.Task[BackendInstance]] = {}
        self._processes: set[asyncio.subprocess.Process] = set()
        self._runtime_dir: Path | None = None
        self._owns_runtime_dir = False
        self._socket_counter = 0
        self._reaper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False

    # Lifecycle of the manager -----------------------------------------------------------------

    async def start(self) -> None:
        if self.settings.runtime_dir is not None:
            self._runtime_dir = self.settings.runtime_dir
            self._runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._runtime_dir.chmod(0o700)
        else:
            base = os.environ.get("XDG_RUNTIME_DIR")
            if not base or not os.path.isdir(base):
                base = "/tmp"
            self._runtime_dir = Path(tempfile.mkdtemp(prefix="hearth-", dir=base))
            self._owns_runtime_dir = True
        self.registry.catalog()
        self._reaper = asyncio.create_task(self._reap_idle())

    async def close(self) -> None:
        """Stop every backend (SIGTERM, then SIGKILL after a grace period)."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        for task in list(self._starting.values()):
            task.cancel()
        instances = list(self._instances.values())
        self._instances.clear()
        await asyncio.gather(*(self._stop(i) for i in instances), return_exceptions=True)
        # Processes of starts that were cancelled half-way.
        await asyncio.gather(*(_terminate(p) for p in list(self._processes)))
        if self._owns_runtime_dir and self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)

    # Serving requests -------------------------------------------------------------------------

    @property
    def runtime_dir(self) -> Path:
        assert self._runtime_dir is not None, "BackendManager.start() was not called"
        return self._runtime_dir

    @property
    def ready(self) -> bool:
        """Started and not shutting down."""
        return self._runtime_dir is not None and not self._closing

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

        task = asyncio.get_running_loop().create_task(load())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lost(self, instance: BackendInstance, error: OpenAIError) -> bool:
        """Whether `error` means the backend is gone (or lost its model); if so, forget it."""
        if error.code not in {"backend_unavailable", "model_not_loaded"}:
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

    def _next_address(self) -> tuple[str, Path]:
        assert self._runtime_dir is not None, "BackendManager.start() was not called"
        self._socket_counter += 1
        path = self._runtime_dir / f"{self._socket_counter}.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return f"unix://{path}", path

    def _command(self, config: ModelConfig, address: str) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["HEARTH_UNDER_GATEWAY"] = "1"
        env.setdefault("HEARTH_LOG_LEVEL", self.settings.log_level.upper())
        if config.backend in BUILTIN_BACKENDS:
            path = env.get("PYTHONPATH")
            env["PYTHONPATH"] = f"{_PROJECT_ROOT}{os.pathsep}{path}" if path else str(_PROJECT_ROOT)
            return [sys.executable, "-m", f"backends.{config.backend}", "--address", address], env
        custom = self._custom(config)
        assert custom.command is not None
        values = {"address": address, "python": sys.executable}
        argv = [part.format_map(values) for part in custom.command]
        env.update(custom.env)
        return argv, env

    def _custom(self, config: ModelConfig) -> CustomBackend:
        custom = self.registry.catalog().backends.get(config.backend)
        if custom is None:
            raise OpenAIError(
                500, f"model '{config.name}' names unknown backend '{config.backend}'"
            )
        return custom

    async def _start(self, config: ModelConfig) -> BackendInstance:
        remote = None
        if config.backend not in BUILTIN_BACKENDS:
            remote = self._custom(config).address
        if remote is not None:
            address, socket_path, process = remote, None, None
        else:
            address, socket_path = self._next_address()
            argv, env = self._command(config, address)
            log.info("starting %s backend for %s", config.backend, config.name)
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C on the gateway's terminal is ours to handle
                    env=env,
                    cwd=str(self.settings.models_dir)
                    if self.settings.models_dir.is_dir()
                    else None,
                )
            except OSError as exc:
                raise OpenAIError(
                    500,
                    f"cannot start backend '{config.backend}' for model '{config.name}': {exc}",
                    code="backend_start_failed",
                ) from None
            self._processes.add(process)
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        instance = BackendInstance(
            config=config,
            address=address,
            client=BackendClient(channel, config.name, self.settings.request_timeout),
            process=process,
            slots=_Slots(config.max_concurrency, config.max_queue),
        )
        pump = asyncio.create_task(self._pump_output(instance)) if process else None
        try:
            await self._wait_healthy(instance, socket_path)
            request = load_request_for(config, self.settings.models_dir)
            started = time.monotonic()
            try:
                await instance.client.load(request, timeout=self.settings.load_timeout)
            except OpenAIError as exc:
                raise self._start_failure(instance, f"failed to load: {exc.message}") from None
            instance.capabilities = await instance.client.capabilities()
            log.info("loaded %s in %.2f s", config.name, time.monotonic() - started)
        except BaseException:
            await self._stop(instance)
            if pump is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pump, 1.0)
            raise
        self._instances[config.name] = instance
        if process is not None:
            task = asyncio.create_task(self._supervise(instance))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return instance

    async def _wait_healthy(self, instance: BackendInstance, socket_path: Path | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.backend_start_timeout
        while True:
            if instance.process is not None and instance.process.returncode is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(instance.process.wait(), 1.0)
                raise self._start_failure(
                    instance, f"exited with code {instance.process.returncode} while starting"
                )
            listening = socket_path is None or socket_path.exists()
            if listening and await instance.client.healthy(timeout=1.0):
                return
            if loop.time() > deadline:
                raise self._start_failure(
                    instance,
                    f"did not become healthy within {self.settings.backend_start_timeout:g} s",
                )
            await asyncio.sleep(0.02)

    def _start_failure(self, instance: BackendInstance, what: str) -> OpenAIError:
        config = instance.config
        message = f"the {config.backend} backend for model '{config.name}' {what}"
        output = instance.recent_output()
        if output:
            message += f"\nlast backend output:\n{output}"
        return OpenAIError(500, message, code="backend_start_failed")

    async def _pump_output(self, instance: BackendInstance) -> None:
        """Keep the backend's last lines for error messages and pass them to our log."""
        assert instance.process is not None
        assert instance.process.stdout is not None
        logger = logging.getLogger(f"hearth.backend.{instance.config.name}")
        async for raw in instance.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            instance.output.append(line)
            logger.info("%s", line)

    async def _supervise(self, instance: BackendInstance) -> None:
        assert instance.process is not None
        code = await instance.process.wait()
        self._processes.discard(instance.process)
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
        if self._instances.get(instance.config.name) is instance:
            del self._instances[instance.config.name]
        # Calls still in flight fail on their own (UNAVAILABLE) and are answered as such;
        # closing the channel at once would cancel them instead.
        task = asyncio.get_running_loop().create_task(
            instance.client.channel.close(grace=_CHANNEL_CLOSE_GRACE_SECONDS)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # Stopping ---------------------------------------------------------------------------------

    async def unload(self, name: str) -> bool:
        """Stop the backend serving `name`; False if none was running."""
        instance = self._instances.get(name)
        if instance is None:
            return False
        await self._stop(instance)
        return True

    async def _stop(self, instance: BackendInstance) -> None:
        instance.dead = True
        if self._instances.get(instance.config.name) is instance:
            del self._instances[instance.config.name]
        if instance.process is not None:
            await _terminate(instance.process)
            self._processes.discard(instance.process)
        else:
            with contextlib.suppress(OpenAIError):
                await instance.client.unload()
        await instance.client.channel.close()

    async def _reap_idle(self) -> None:
        """End backends idle for longer than their model's keep_alive."""
        while True:
            await asyncio.sleep(_REAP_INTERVAL_SECONDS)
            now = time.monotonic()
            for instance in list(self._instances.values()):
                keep_alive = instance.config.keep_alive_seconds()
                idle = instance.slots.busy == 0 and instance.slots.waiting == 0
                if keep_alive is not None and idle and now - instance.last_used > keep_alive:
                    log.info("unloading %s after %.0f s idle", instance.config.name, keep_alive)
                    await self._stop(instance)


async def _terminate(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
