"""BackendManager: composes the registry, admission, placement, supervision and the budget.

A loaded model has `replicas` backends (one by default), which its placer puts somewhere: local
processes, static addresses, Ray actors. The first request for a model starts and loads them;
concurrent first requests share those starts, and each request goes to the replica with the
fewest requests in flight. A backend reached over the network is health-checked every
HEARTH_HEALTH_INTERVAL: one that fails leaves the rotation until it passes again (or, lost, is
placed and loaded again). Loads are planned against the machine's memory
budget (idle models are unloaded to make room, least recently used first), the cores are
divided among the models computing at each moment, and an idle model is unloaded after its
keep_alive. A process that dies is noticed, and the next request starts a fresh one. Stopping
the gateway stops every backend it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from gateway.client import BackendClient
from gateway.config import BUILTIN_BACKENDS, CustomBackend, ModelConfig
from gateway.errors import OUTPUT_HEADING, BackendGone, OpenAIError, model_not_found
from gateway.manager.admission import Lease, Slots
from gateway.manager.budget import Machine, MachineBudget, resident_memory
from gateway.manager.cpu import Demand, divide
from gateway.manager.footprint import FootprintBook, sequences
from gateway.manager.instance import BackendInstance, State
from gateway.manager.memory import MemoryPlanner
from gateway.manager.placement import LocalPlacer, Placer, StaticPlacer
from gateway.manager.process import (
    Launcher,
    describe_exit,
    load_request_for,
    token_variables,
)
from gateway.manager.registry import ModelRegistry
from gateway.manager.supervisor import Supervisor
from gateway.metrics import BackendSample, Metrics
from gateway.settings import Settings
from gateway.units import format_size
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Capability, Reason

log = logging.getLogger("hearth.manager")

T = TypeVar("T")
_CHANNEL_CLOSE_GRACE_SECONDS = 30.0
#: How long a backend's cores wait, once it went idle, before the others get them.
_REBALANCE_DELAY_SECONDS = 0.2
#: How long a failed start stays on GET /backends.
_FAILURE_MEMORY_SECONDS = 600.0
#: A model whose backend failed twice in a row without serving a request waits this long
#: before its next start, doubling with each failure up to the cap.
RESTART_BACKOFF_SECONDS = 2.0
RESTART_BACKOFF_MAX_SECONDS = 60.0
#: How many times a request that never reached a backend is sent to its replacement.
_MAX_RESENDS = 3
#: How long a replica that does not fit beside its model's others waits before it is tried again.
_REPLICA_ROOM_RETRY_SECONDS = 30.0

#: A backend: its model's name and which replica it is.
Key = tuple[str, int]

_CAPABILITY_WORDS = {
    Capability.TEXT: "text generation (chat and completions)",
    Capability.EMBEDDINGS: "embeddings",
    Capability.TRANSCRIPTION: "audio transcription",
    Capability.IMAGES: "image generation",
    Capability.SPEECH: "speech (text to speech)",
    Capability.RERANK: "reranking",
}


def _checked(checking: set[BackendInstance], instance: BackendInstance, _: object) -> None:
    checking.discard(instance)


def _describe(config: ModelConfig, replica: int) -> str:
    """A model's name, with its replica's number where it has several: "chat (replica 2/3)"."""
    count = config.replica_count()
    return config.name if count == 1 else f"{config.name} (replica {replica + 1}/{count})"


@dataclass(eq=False)
class _Start:
    """A start in progress, shared by the requests waiting for it."""

    task: asyncio.Task[BackendInstance]
    waiters: int = 0
    waiting_for_memory: bool = False
    instance: BackendInstance | None = None


@dataclass
class _Failure:
    """A model's backend failing (exits, failed starts) since it last served a request."""

    at: float
    message: str
    config: ModelConfig
    #: The backend's last output lines.
    output: str = ""
    #: Failures in a row without a request served in between.
    count: int = 1
    #: time.monotonic() before which no new start is tried.
    retry_at: float = 0.0

    def waiting(self, now: float) -> float:
        """Seconds until the next start may be tried (0: now)."""
        return max(0.0, self.retry_at - now)


class BackendManager:
    """Owns every backend of the gateway: which run, and which requests they serve."""

    def __init__(self, settings: Settings, machine: Machine | None = None) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.models_dir)
        self.launcher = Launcher(settings)
        self.supervisor = Supervisor(on_exit=self._exited, tick=self._tick)
        self.machine = machine or Machine()
        budget = self.machine.budget(settings.cpus, settings.memory)
        self.footprints = FootprintBook(settings.models_dir)
        self.memory = MemoryPlanner(
            budget,
            holders=self._holders,
            evict=self._stop,
            drain=self._drain,
            max_loaded=settings.max_loaded_models,
            machine=None if settings.memory is not None else self.machine,
        )
        self._instances: dict[Key, BackendInstance] = {}
        self._draining: set[BackendInstance] = set()
        #: Taken out of service, their process not yet gone: their memory still counts.
        self._stopping: set[BackendInstance] = set()
        self._starting: dict[Key, _Start] = {}
        #: Models asked to unload while they were starting: unloaded once their requests end.
        self._unload_when_started: set[str] = set()
        self._failures: dict[Key, _Failure] = {}
        self._placers: dict[str, Placer] = {
            "local": LocalPlacer(self.launcher),
            "static": StaticPlacer(settings),
        }
        self._health: asyncio.Task[None] | None = None
        #: A speech model's voices, as its backend instance (the key's) last listed them.
        self._voices: dict[str, tuple[BackendInstance, pb.ListVoicesResponse]] = {}
        self._closing = False
        self.metrics = Metrics()
        self.metrics.watch_backends(self._samples)

    @property
    def budget(self) -> MachineBudget:
        """The machine's cores and memory for models (the memory may grow: see MemoryPlanner)."""
        return self.memory.budget

    # Lifecycle of the manager -----------------------------------------------------------------

    async def start(self) -> None:
        self.launcher.open()
        await self.registry.current()
        self.supervisor.start()
        self._health = asyncio.create_task(self._check_health_forever())

    async def close(self) -> None:
        """Stop every backend (SIGTERM, then SIGKILL after a grace period)."""
        self._closing = True
        self.supervisor.close()
        if self._health is not None:
            self._health.cancel()
        for start in list(self._starting.values()):
            start.task.cancel()
        instances = [*self._instances.values(), *self._draining, *self._stopping]
        self._measure(instances)
        for instance in instances:
            if not instance.dead:
                self._record(instance)  # what it took, for the next run's first load
        self._instances.clear()
        self._draining.clear()
        await asyncio.gather(*(self._release(i) for i in instances), return_exceptions=True)
        for placer in self._placers.values():
            try:
                await placer.close()
            except Exception:  # one placer failing must not leave the others' backends
                log.exception("closing the %s placer failed", placer.kind)
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
        """Each loaded model's first live replica, by name."""
        loaded: dict[str, BackendInstance] = {}
        for (name, _), instance in sorted(self._instances.items(), key=lambda kv: kv[0]):
            if instance.alive:
                loaded.setdefault(name, instance)
        return loaded

    def replicas(self, name: str) -> list[BackendInstance]:
        """A model's live replicas, in replica order."""
        return sorted(
            (i for (n, _), i in self._instances.items() if n == name and i.alive),
            key=lambda i: i.replica,
        )

    async def voices(self, config: ModelConfig) -> pb.ListVoicesResponse:
        """A speech model's voices: asked of its backend once per backend instance (loading
        it if need be), then answered from memory, without waiting for a slot while it
        speaks."""
        instance = self.loaded().get(config.name)
        known = self._voices.get(config.name)
        if instance is not None and known is not None and known[0] is instance:
            return known[1]
        answer = await self.call(config, Capability.SPEECH, lambda client: client.list_voices())
        instance = self.loaded().get(config.name)
        if instance is not None:
            self._voices[config.name] = (instance, answer)
        return answer

    async def acquire(
        self, config: ModelConfig, capability: Capability, keep_alive: float | None = None
    ) -> Lease:
        """A slot on a live, loaded backend for `config`'s model that serves `capability`."""
        name = config.name
        while True:
            instance = await self._ensure(self.host(config))
            if capability not in instance.capabilities:
                raise OpenAIError(
                    400,
                    f"model '{name}' does not support {_CAPABILITY_WORDS[capability]}",
                    param="model",
                    code="model_not_supported",
                )
            queued = time.monotonic()
            await instance.slots.take(name)
            self.metrics.queue_time.labels(name).observe(time.monotonic() - queued)
            if not instance.dead:
                break
            instance.slots.give()  # it was unloaded while this request queued: start anew
        lease = Lease(instance, self._released, keep_alive)
        try:
            await self._rebalance(instance)
        except BaseException:
            lease.release()
            raise
        return lease

    async def open(
        self,
        config: ModelConfig,
        capability: Capability,
        start: Callable[[BackendClient], Awaitable[T]],
        keep_alive: float | None = None,
    ) -> tuple[Lease, T]:
        """Acquire and make the first call; if the backend turns out dead, retry once on a new one.

        The caller (which resolved `config` from the registry once) releases the lease when its
        work, a whole stream say, is done. `keep_alive` is the request's own (seconds, math.inf
        for never), which then applies to the model until another request says otherwise.
        """
        resends = 0
        while True:
            lease = await self.acquire(config, capability, keep_alive)
            try:
                result = await start(lease.client)
            except OpenAIError as exc:
                try:
                    # Before the slot is given back: a request queued behind this one must
                    # find the backend already known dead, and go to its replacement.
                    failure = await self._settle(lease.instance, exc)
                finally:
                    lease.release()
                if failure is None and resends < _MAX_RESENDS:
                    resends += 1
                    log.info(
                        "backend for %s was gone; sending the request to a new one", config.name
                    )
                    continue
                raise (failure or exc) from None
            except BaseException:
                lease.release()
                raise
            # It serves: whatever failed is behind it.
            self._failures.pop(lease.instance.key, None)
            return lease, result

    async def call(
        self,
        config: ModelConfig,
        capability: Capability,
        start: Callable[[BackendClient], Awaitable[T]],
        keep_alive: float | None = None,
    ) -> T:
        """A whole unary request: acquire, call (retried once on a dead backend), release."""
        lease, result = await self.open(config, capability, start, keep_alive)
        lease.release()
        return result

    async def failed(self, lease: Lease, error: OpenAIError) -> OpenAIError:
        """A request's call failed after it began (a stream, mid-answer): settle what that means
        for the backend before its slot is given back, and say what to tell the client."""
        try:
            return await self._settle(lease.instance, error) or error
        finally:
            lease.release()

    def host(self, config: ModelConfig) -> ModelConfig:
        """The model whose process serves `config`: its base, for a variant (`base:`)."""
        if config.base is None:
            return config
        base = self.registry.known.models.get(config.base)
        if base is None:  # removed since the variant was read
            raise model_not_found(config.base)
        return base

    def variants(self, name: str) -> list[str]:
        """The variants (`base: name`) a model's process serves besides it."""
        known = self.registry.known.models.values()
        return sorted(c.name for c in known if c.base == name)

    def preload(self, name: str) -> None:
        """Start and load `name` in the background; a failure is logged, not raised.

        A preloaded model stays loaded (keep_alive -1) unless its YAML sets a keep_alive.
        """

        async def load() -> None:
            try:
                config = self.host(await self.registry.resolve(name))
                instance = await self._ensure(config)
                if config.keep_alive is None:
                    instance.keep_alive = math.inf
                log.info("preloaded %s", name)
            except OpenAIError as exc:
                log.error("could not preload %s: %s", name, exc.message)

        self.supervisor.spawn(load())

    def _released(self, lease: Lease) -> None:
        """A request ended: its keep_alive applies, the cores are divided again."""
        instance = lease.instance
        instance.served += 1
        if lease.keep_alive is not None:
            instance.keep_alive = lease.keep_alive
        else:
            instance.keep_alive = self.default_keep_alive(instance.config)
        self.memory.notify()
        if instance.slots.idle and not instance.dead:
            if instance.state == State.DRAINING:
                self._stop_soon(instance, "drained")
            elif instance.keep_alive == 0:
                self._stop_soon(instance, "keep_alive 0")
        self._rebalance_soon()

    def default_keep_alive(self, config: ModelConfig) -> float:
        """The model YAML's keep_alive, else the gateway's default (seconds; inf: never)."""
        own = config.keep_alive_seconds()
        return own if own is not None else self.settings.default_keep_alive_seconds()

    async def _settle(self, instance: BackendInstance, error: OpenAIError) -> OpenAIError | None:
        """What a failed call means. None: the backend is gone and the request never reached
        it, so its replacement may serve it. Else the error to answer with: the call's own,
        or, when the backend died while the request was on it, `backend_crashed` (the request
        is not sent again: it may be what killed the backend)."""
        reached = isinstance(error, BackendGone) and error.reached
        if not isinstance(error, BackendGone) and error.code != Reason.MODEL_NOT_LOADED:
            return error
        # A local process that has exited is gone; a remote one that fails so cannot be
        # trusted either: the next start health-checks and loads it again.
        if instance.process is not None and not await instance.exited(timeout=2.0):
            return error
        if instance.process is not None:
            self._note_exit(instance, instance.process.returncode)
        if not instance.dead:
            self._forget(instance)
        if not reached:
            return None
        how = describe_exit(instance.process.returncode) if instance.process else "went away"
        return OpenAIError(
            503,
            f"the backend for model '{instance.config.name}' {how} while answering this "
            "request; it was not sent again, in case it was the cause (the next request "
            "starts the model afresh)",
            code="backend_crashed",
            retry=False,  # OpenAI's SDKs would resend it, and it may crash the next one too
        )

    async def _ensure(self, config: ModelConfig) -> BackendInstance:
        """A live, loaded backend for `config`'s model, in rotation: the replica with the fewest
        requests in flight, starting those missing (and waiting for the first, if none is)."""
        if self._closing:
            raise OpenAIError(503, "the server is shutting down", code="shutting_down")
        name, count = config.name, config.replica_count()
        ready: list[BackendInstance] = []
        missing = []
        for replica in range(count):
            instance = self._instances.get((name, replica))
            if instance is not None and not instance.alive:
                self._forget(instance)
                instance = None
            if instance is None:
                missing.append(replica)
            elif not instance.unhealthy:
                ready.append(instance)
        for replica in missing:
            # A start this request waits for logs with its id; one beside a ready replica is
            # nobody's request's.
            self._begin_start(config, replica, background=bool(ready))
        if ready:
            # Fewest in flight; among equals, the one idle longest, so that replicas take
            # turns (and each keeps its caches warm).
            return min(ready, key=lambda i: (i.slots.busy + i.slots.waiting, i.last_used))
        starts = [s for r in range(count) if (s := self._starting.get((name, r))) is not None]
        if not starts:
            self._refuse_unavailable(config)
        return await self._first_started(config, starts)

    def _begin_start(self, config: ModelConfig, replica: int, background: bool = True) -> None:
        """Start replica `replica` of `config`'s model, unless it is starting or waits for its
        next try after failures. `background`: no request waits for it (its log lines carry
        no request's id)."""
        key = (config.name, replica)
        if key in self._starting or self._waiting_after_failure(config, replica):
            return
        context = contextvars.Context() if background else None
        start = _Start(asyncio.create_task(self._start(config, replica), context=context))
        self._starting[key] = start

        def finished(task: asyncio.Task[BackendInstance], mine: _Start = start) -> None:
            if self._starting.get(key) is mine:
                del self._starting[key]
            if not any(k[0] == config.name for k in self._starting):
                # The model's last start ended, however: an unload asked meanwhile is done.
                self._unload_when_started.discard(config.name)
            if not task.cancelled():
                task.exception()  # seen: a replica started for nobody's request may fail

        start.task.add_done_callback(finished)

    async def _first_started(self, config: ModelConfig, starts: list[_Start]) -> BackendInstance:
        """The first of `starts` to succeed; if all fail, the last failure."""
        for start in starts:
            start.waiters += 1
        pending = {start.task for start in starts}
        failure: BaseException | None = None
        try:
            while pending:
                # wait(), unlike awaiting the tasks, never cancels them: one impatient client
                # leaving must not abort the start others wait on.
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.cancelled():
                        failure = failure or OpenAIError(
                            503, f"the start of model '{config.name}' was cancelled"
                        )
                    elif task.exception() is not None:
                        failure = task.exception()
                    else:
                        return task.result()
            assert failure is not None
            raise failure
        finally:
            for start in starts:
                start.waiters -= 1
                if start.waiters == 0 and start.waiting_for_memory and not start.task.done():
                    # Everyone who asked has gone: stop waiting for memory for nobody. A
                    # request that arrives now starts afresh rather than joining a start being
                    # cancelled.
                    for key, known in list(self._starting.items()):
                        if known is start:
                            del self._starting[key]
                    start.task.cancel()

    def _waiting_after_failure(self, config: ModelConfig, replica: int) -> float:
        """Seconds until replica `replica` may be tried again after failing (0: now)."""
        failure = self._failures.get((config.name, replica))
        if failure is None or failure.config != config:
            return 0.0  # never failed, or its YAML changed since: try at once
        return failure.waiting(time.monotonic())

    def _refuse_unavailable(self, config: ModelConfig) -> None:
        """No replica of `config`'s model is in rotation or starting: 503, saying why (a
        failing start waits for its next try; a remote replica fails its health checks)."""
        name = config.name
        unhealthy = [i for i in self.replicas(name) if i.unhealthy]
        waiting = [
            r for r in range(config.replica_count()) if self._waiting_after_failure(config, r)
        ]
        if unhealthy:
            why = unhealthy[0].client.last_health_failure or "no answer"
            count = config.replica_count()
            message = (
                f"no backend of model '{name}' is answering its health checks ({len(unhealthy)} "
                f"of {count} out of rotation; {unhealthy[0].address}: {why}); retry shortly"
            )
            raise OpenAIError(
                503, message, code="backend_unavailable", retry_after=self.settings.health_interval
            )
        replica = min(waiting, key=lambda r: self._waiting_after_failure(config, r), default=0)
        raise self._failing(config, replica) or OpenAIError(
            503, f"model '{name}' has no backend to serve it; retry shortly"
        )

    def _failing(self, config: ModelConfig, replica: int) -> OpenAIError | None:
        """503 with Retry-After while a replica that keeps failing waits for its next start."""
        wait = self._waiting_after_failure(config, replica)
        failure = self._failures.get((config.name, replica))
        if failure is None or not wait:
            return None
        if failure.count:
            how = f"is failing ({failure.count} times in a row, last: {failure.message})"
        else:  # it did not fail: it waits for room
            how = f"cannot start now ({failure.message})"
        message = (
            f"model '{_describe(config, replica)}' {how}; the server tries it again in "
            f"{math.ceil(wait)} s"
        )
        if failure.output:
            message += f"{OUTPUT_HEADING}{failure.output}"
        return OpenAIError(503, message, code="backend_failing", retry_after=wait)

    def _failed(
        self, config: ModelConfig, replica: int, message: str, output: str = "", delay: float = 0
    ) -> None:
        """Note a replica's failure (a start that failed, an exit nobody asked for): the first
        one is retried at once (or after `delay`), each further one in a row waits twice as
        long, up to the cap."""
        key = (config.name, replica)
        prior = self._failures.get(key)
        count = prior.count + 1 if prior is not None and prior.config == config else 1
        if count >= 2:
            delay = min(RESTART_BACKOFF_SECONDS * 2 ** (count - 2), RESTART_BACKOFF_MAX_SECONDS)
            log.warning(
                "%s failed %d times in a row; its next start waits %g s",
                _describe(config, replica),
                count,
                delay,
            )
        self._failures[key] = _Failure(
            at=time.time(),
            message=message.split("\n", 1)[0],
            config=config,
            output=output,
            count=count,
            retry_at=time.monotonic() + delay,
        )

    # Starting a backend -----------------------------------------------------------------------

    async def _custom(self, config: ModelConfig) -> CustomBackend | None:
        if config.backend in BUILTIN_BACKENDS:
            return None
        custom = (await self.registry.current()).backends.get(config.backend)
        if custom is None:
            raise OpenAIError(
                500, f"model '{config.name}' names unknown backend '{config.backend}'"
            )
        return custom

    def thread_ceiling(self, config: ModelConfig, remote: bool = False) -> int:
        """The most threads a model computes with: its YAML `threads`, within the budget (a
        remote backend's cores are its machine's, not ours: it gets the YAML's, or its own
        default)."""
        if remote:
            return config.threads or 0
        return min(config.threads or self.budget.cores, self.budget.cores)

    def _placer(self, config: ModelConfig) -> Placer:
        """Where `config`'s backends run (the Ray placer is made, and Ray imported, at the
        first model placed on it)."""
        kind = config.placement_kind()
        placer = self._placers.get(kind)
        if placer is not None:
            return placer
        assert kind == "ray"
        try:
            from gateway.manager.ray_placer import RayPlacer
        except ImportError as exc:
            raise OpenAIError(
                500,
                f"model '{config.name}' is placed on Ray (placement: ray), but Ray is not "
                f"installed ({exc}): pip install 'hearth[ray]'",
                code="backend_start_failed",
                retry=False,
            ) from None
        placer = self._placers["ray"] = RayPlacer(self.settings)
        return placer

    async def _start(self, config: ModelConfig, replica: int) -> BackendInstance:
        try:
            return await self._plan_and_start(config, replica)
        except OpenAIError as exc:
            key = (config.name, replica)
            if exc.code == "backend_start_failed":
                self.metrics.start_failures.labels(config.name).inc()
                message, _, output = exc.message.partition(OUTPUT_HEADING)
                self._failed(config, replica, message, output)
                # In a crash loop, the requests that waited on this start are told as the
                # next ones will be: failing, and when to try again.
                failing = self._failing(config, replica)
                if failing is not None:
                    raise failing from None
            elif exc.code == "replica_does_not_fit":  # tried again later, not a crash loop
                log.warning("%s", exc.message)
                self._failed(config, replica, exc.message, delay=_REPLICA_ROOM_RETRY_SECONDS)
                self._failures[key].count = 0
            else:  # refused before any process started (memory, say): shown, not backed off
                prior = self._failures.get(key)
                if prior is not None and prior.config == config and prior.count:
                    prior.at, prior.message = time.time(), exc.message  # a crash loop goes on
                else:
                    self._failures[key] = _Failure(time.time(), exc.message, config, count=0)
            raise

    async def _plan_and_start(self, config: ModelConfig, replica: int) -> BackendInstance:
        key = (config.name, replica)
        placer = self._placer(config)
        custom = await self._custom(config)
        remote = not placer.local or (custom is not None and custom.address is not None)
        # Reading a model's header (and hashing its folder's listing) is file work: off the loop.
        footprint = await asyncio.to_thread(self.footprints.footprint, config, remote)
        loading = config
        defaulted = sequences(config) > 1 and config.parallel is None and not remote
        if defaulted and footprint.bytes > self.budget.memory_bytes:
            # The default's extra caches do not fit: one generation at a time, as before.
            loading = msgspec.structs.replace(config, parallel=1)
            footprint = await asyncio.to_thread(self.footprints.footprint, loading, remote)
            log.info(
                "%s: the caches of %d generations at once would not fit the memory budget;"
                " computing one at a time (set parallel: in its YAML to choose)",
                config.name,
                sequences(config),
            )
        # Beside a replica of its own model (loaded, or starting first), one more starts only
        # where it fits now, unloading and draining nothing: it would wait for, or unload, its
        # own siblings, and take turns with them. The first replica plans like any model.
        quick = any(i.replica != replica for i in self.replicas(config.name)) or any(
            k[0] == config.name and k[1] < replica for k in self._starting
        )
        if quick:
            room = self.memory.reserve_now(footprint)
            if isinstance(room, str):
                raise self._no_room(config, replica, room)
            reservation = room
        else:
            start = self._starting.get(key)
            if start is not None:
                start.waiting_for_memory = True
            try:
                reservation = await self.memory.reserve(
                    config.name, footprint, timeout=self.settings.load_timeout
                )
            finally:
                if start is not None:
                    start.waiting_for_memory = False
        start = self._starting.get(key)
        spawned = time.monotonic()
        try:
            # The variables that hold remote backends' tokens stay in the gateway.
            withheld = token_variables(self.registry.known)
            placed = await placer.place(config, replica, custom, withheld)
            instance = self.launcher.instance(config, placed, replica)
            instance.footprint = footprint
            instance.loaded_as = loading
            if start is not None:
                start.instance = instance
            await self._load(instance, loading, remote)
        finally:
            reservation.release()
        self.metrics.load_time.labels(config.name).observe(time.monotonic() - spawned)
        instance.state = State.READY
        instance.loaded_at = time.time()
        instance.last_used = time.monotonic()
        instance.keep_alive = self.default_keep_alive(config)
        self._instances[key] = instance
        # The watch outlives the request that started the model: its log lines are not that
        # request's.
        contextvars.Context().run(self.supervisor.watch, instance)
        if config.name in self._unload_when_started:
            if not any(k[0] == config.name and s is not start for k, s in self._starting.items()):
                self._unload_when_started.discard(config.name)  # the model's last start
            instance.keep_alive = 0  # its waiting requests are served, then it goes
            if start is None or start.waiters == 0:
                self._stop_soon(instance, "on request")
        if instance.local:
            self._measure([instance])
            self._record(instance)
        log.info(
            "%s ready%s: %d thread(s)%s, %s resident (planned %s), %d request(s) at once",
            _describe(config, replica),
            f" on {instance.node}" if instance.node else "",
            instance.threads_loaded,
            "" if instance.adjustable_threads else " fixed",
            format_size(instance.rss),
            footprint.describe(),
            instance.slots.limit,
        )
        return instance

    def _no_room(self, config: ModelConfig, replica: int, why: str) -> OpenAIError:
        return OpenAIError(
            507,
            f"replica {replica + 1} of model '{config.name}' does not fit beside what is "
            f"loaded: {why}; tried again in {_REPLICA_ROOM_RETRY_SECONDS:g} s",
            code="replica_does_not_fit",
        )

    async def _load(self, instance: BackendInstance, config: ModelConfig, remote: bool) -> None:
        pump = None
        if instance.process is not None:
            # The backend's output is nobody's request's (the start is shared, the process
            # outlives it): logged without a request id.
            pump = asyncio.create_task(
                self.launcher.pump_output(instance), context=contextvars.Context()
            )
        try:
            await self.launcher.wait_healthy(instance)
            ceiling = self.thread_ceiling(config, remote)
            # Building it walks the YAML's options (up to the 2 MiB a model file may expand to).
            request = await asyncio.to_thread(
                load_request_for, config, self.settings.models_dir, ceiling
            )
            started = time.monotonic()
            response = await self.launcher.load(instance, request)
            log.info("loaded %s in %.2f s", config.name, time.monotonic() - started)
        except BaseException:
            await self._release(instance)
            if pump is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pump, 1.0)
            raise
        instance.threads_loaded = response.threads or ceiling
        instance.threads = instance.threads_applied = instance.threads_loaded
        instance.adjustable_threads = response.adjustable_threads
        if config.max_concurrency is None and response.concurrent_calls > 1:
            # The backend batches concurrent calls (generations, embeddings): let them reach it
            # together.
            # Nobody holds or waits for a slot before the model is ready.
            instance.slots = Slots(response.concurrent_calls, config.max_queue)

    def _exited(self, instance: BackendInstance, code: int) -> None:
        """A process ended: if nobody asked for it, say so; the next request starts a new one."""
        if instance.process is not None:
            self.launcher.processes.discard(instance.process)
        self._note_exit(instance, code)
        self._forget(instance)

    def _note_exit(self, instance: BackendInstance, code: int | None) -> None:
        """Count an exit nobody asked for as a failure, once, whoever notices it first (the
        exit watcher, or a request that found the backend gone)."""
        if self._closing or instance.deliberate_stop or instance.exit_noted:
            return
        instance.exit_noted = True
        self.metrics.backend_exits.labels(instance.config.name).inc()
        log.warning(
            "backend for %s %s unexpectedly; the next request starts a new one\n%s",
            _describe(instance.config, instance.replica),
            describe_exit(code),
            instance.recent_output(),
        )
        self._failed(
            instance.config,
            instance.replica,
            f"its backend {describe_exit(code)}",
            instance.recent_output(),
        )

    def _samples(self) -> list[BackendSample]:
        """What each backend holds now, for a metrics scrape (the tick measured its memory)."""
        return [
            BackendSample(
                model=i.config.name,
                resident_bytes=i.rss if i.local else None,
                in_flight=i.slots.busy,
                queued=i.slots.waiting,
            )
            for i in self._serving()
            if not i.dead
        ]

    def _forget(self, instance: BackendInstance) -> None:
        """A backend that is gone (its process exited, or a remote one lost its model)."""
        self._retire(instance, None)
        self._stopping.discard(instance)
        # Calls still in flight fail on their own (UNAVAILABLE) and are answered as such;
        # closing the channel at once would cancel them instead.
        self.supervisor.spawn(instance.client.channel.close(grace=_CHANNEL_CLOSE_GRACE_SECONDS))

    def _detach(self, instance: BackendInstance) -> None:
        if self._instances.get(instance.key) is instance:
            del self._instances[instance.key]
        self._draining.discard(instance)
        self.memory.notify()

    # Memory and cores -------------------------------------------------------------------------

    def _holders(self) -> list[BackendInstance]:
        """Backends that hold memory: loaded, draining, and stopping."""
        return [*self._instances.values(), *self._draining, *self._stopping]

    def _serving(self) -> list[BackendInstance]:
        """Backends that may still have requests: loaded, and draining."""
        return [*self._instances.values(), *self._draining]

    def _measure(self, instances: list[BackendInstance]) -> None:
        """Resident memory of each backend's process (and its children), and its peak."""
        local = [i for i in instances if i.pid is not None]
        if not local:
            return
        measured = resident_memory([i.pid for i in local if i.pid is not None])
        for instance in local:
            assert instance.pid is not None
            memory = measured.get(instance.pid)
            if memory is None or not memory.total:
                continue
            instance.rss, instance.rss_anonymous = memory.total, memory.anonymous
            instance.rss_peak = max(instance.rss_peak, instance.rss)

    def _record(self, instance: BackendInstance) -> None:
        """Keep what a backend was seen to use, for the next load of its model."""
        if instance.local and instance.rss_peak and instance.state != State.STARTING:
            self.footprints.record(instance.loaded_as or instance.config, instance.rss_peak)

    def _drain(self, instance: BackendInstance, why: str) -> None:
        """Let `instance` finish what it has, take nothing new, then stop."""
        if instance.state != State.READY:
            return
        log.info("draining %s %s", _describe(instance.config, instance.replica), why)
        instance.state = State.DRAINING
        if self._instances.get(instance.key) is instance:
            del self._instances[instance.key]
        self._draining.add(instance)
        if instance.slots.idle:
            self._stop_soon(instance, "drained")

    async def _rebalance(self, newcomer: BackendInstance | None = None) -> None:
        """Divide the cores among the local backends computing now, and tell those whose share
        changed. A newcomer's request waits until its share is set and every backend giving
        up cores has done so at its next step: a model computing with more threads than it has
        cores for collapses (its threads wait for each other, spinning). Shares that grow are
        sent in the background."""
        if not self.settings.share_cores:
            return
        computing = [i for i in self._serving() if i.local and i.busy and not i.dead]
        demands = [Demand(i.threads_loaded or 1, i.adjustable_threads) for i in computing]
        waits = []
        for instance, share in zip(computing, divide(self.budget.cores, demands), strict=True):
            if not instance.adjustable_threads:
                continue
            instance.threads = share
            if share == instance.threads_applied:
                continue
            if newcomer is not None and (instance is newcomer or share < instance.threads_applied):
                waits.append(self._push_threads(instance))
            else:
                self.supervisor.spawn(self._push_threads(instance))
        if waits:
            # Shielded: a client leaving meanwhile must not leave a share half told.
            await asyncio.shield(asyncio.gather(*waits))

    def _rebalance_soon(self) -> None:
        """Give the cores of a backend that went idle to the others, unless a new request
        arrives first: back-to-back requests (a client embedding batch after batch) should not
        make the other models' thread counts flap."""
        if not any(
            i.busy and i.adjustable_threads and i.threads_applied < i.threads_loaded
            for i in self._serving()
        ):
            return  # nobody computing is short of cores: nothing to give (most requests)

        async def later() -> None:
            await asyncio.sleep(_REBALANCE_DELAY_SECONDS)
            await self._rebalance()

        self.supervisor.spawn(later())

    async def _push_threads(self, instance: BackendInstance) -> None:
        async with instance.threads_lock:  # one update at a time, always the latest share
            wanted = instance.threads
            if wanted == instance.threads_applied or instance.dead:
                return
            try:
                log.debug("%s: %d thread(s)", instance.config.name, wanted)
                instance.threads_applied = await instance.client.set_threads(wanted)
            except OpenAIError as exc:
                log.debug("could not set %s's threads: %s", instance.config.name, exc.message)

    # Stopping ---------------------------------------------------------------------------------

    async def unload(self, name: str, drain: bool = False) -> str:
        """Unload `name` (every replica): at once, or (drain) once its requests in flight have
        ended.

        Returns what became of it: "unloaded", "draining" (its requests end first), or
        "not_loaded".
        """
        variant = self.registry.known.models.get(name)
        if not self.replicas(name) and variant is not None and variant.base is not None:
            name = variant.base  # a variant's process is its base's
        instances = self.replicas(name)
        starting = any(key[0] == name for key in self._starting)
        if starting:
            # Unloaded once loaded and its waiting requests are served.
            self._unload_when_started.add(name)
        if not instances:
            draining = [i for i in self._draining if i.config.name == name and not i.dead]
            return "draining" if draining or starting else "not_loaded"
        busy = [i for i in instances if not i.slots.idle]
        if drain and busy:
            for instance in busy:
                self._drain(instance, "on request")
            for instance in instances:
                if instance not in busy:
                    self._stop_soon(instance, "on request")
            return "draining"
        await asyncio.gather(*(self._stop(i, "on request") for i in instances))
        return "draining" if starting else "unloaded"

    def _retire(self, instance: BackendInstance, why: str | None) -> bool:
        """Take `instance` out of service now (no request can take it after this returns); its
        memory counts until its process is gone. False if it already was."""
        if instance.dead:
            return False
        if why is not None:
            log.info("unloading %s %s", instance.config.name, why)
            instance.deliberate_stop = True
        self._measure([instance])
        self._record(instance)
        self._detach(instance)
        instance.dead = True
        instance.state = State.STOPPED
        self._stopping.add(instance)
        return True

    async def _stop(self, instance: BackendInstance, why: str | None) -> None:
        if not self._retire(instance, why):
            return
        await self._end(instance)

    def _stop_soon(self, instance: BackendInstance, why: str) -> None:
        """Retire at once (so no request can take it), end the process in the background."""
        if self._retire(instance, why):
            self.supervisor.spawn(self._end(instance))

    async def _end(self, instance: BackendInstance) -> None:
        try:
            await self._release(instance)
        finally:
            self._stopping.discard(instance)
            self.memory.notify()

    async def _release(self, instance: BackendInstance) -> None:
        """End a backend where its placer put it (a process, a remote one's model, an actor)."""
        instance.deliberate_stop = True
        instance.dead = True
        instance.state = State.STOPPED
        try:
            await self._placers[instance.config.placement_kind()].release(instance)
        finally:
            await instance.client.channel.close()

    async def _tick(self) -> None:
        """Measure every backend; end those idle past their keep_alive or drained; and if
        backends grew past the budget, unload idle ones, least recently used first."""
        now = time.monotonic()
        for key, failure in list(self._failures.items()):
            if time.time() - failure.at > _FAILURE_MEMORY_SECONDS and not failure.waiting(now):
                del self._failures[key]  # long ago: a new failure starts the count afresh
        self._measure(self._serving())
        # A model is unloaded when all its replicas are idle past their keep_alive.
        awake = {i.config.name for i in self._instances.values() if not i.expired(now)}
        for instance in self._serving():
            if instance.dead:
                continue
            if instance.state == State.DRAINING and instance.slots.idle:
                self._stop_soon(instance, "drained")
            elif instance.expired(now) and instance.config.name not in awake:
                self._stop_soon(instance, f"after {instance.keep_alive:g} s idle")
                # A replica being started again for nobody's request goes with the rest.
                for key, start in list(self._starting.items()):
                    if key[0] == instance.config.name and not start.waiters:
                        start.task.cancel()
        self._keep_replicas()
        excess = self.memory.over_budget()
        while excess:
            idle = [i for i in self._serving() if i.local and i.slots.idle and not i.dead]
            if not idle:
                break
            victim = min(idle, key=lambda i: i.last_used)
            await self._stop(
                victim, f"because loaded models grew {format_size(excess)} past the budget"
            )
            excess = self.memory.over_budget()

    def _keep_replicas(self) -> None:
        """Start again the replicas a loaded model lost (a process that died, a remote backend
        that restarted or moved), each when its backoff allows; drain those its YAML no longer
        asks for."""
        if self._closing:
            return
        loaded = {i.config.name for i in self._instances.values() if not i.dead}
        for name in loaded:
            config = self.registry.known.models.get(name)
            count = config.replica_count() if config is not None else 0
            for replica in range(count):
                if (name, replica) not in self._instances:
                    self._restart_lost(name, replica)
        for (name, replica), instance in list(self._instances.items()):
            config = self.registry.known.models.get(name)
            if config is not None and replica >= config.replica_count():  # its YAML asks fewer
                self._drain(instance, f"(its YAML now asks for {config.replica_count()})")

    def _restart_lost(self, name: str, replica: int) -> None:
        """Start a lost replica again, as its YAML says now: not for a model removed, being
        unloaded, or asking for fewer replicas since."""
        config = self.registry.known.models.get(name)
        if config is None or self._closing or name in self._unload_when_started:
            return
        if replica < config.replica_count():
            self._begin_start(config, replica)

    # Health of backends reached over the network ---------------------------------------------

    async def _check_health_forever(self) -> None:
        """A check of each remote backend every half interval, each given half an interval to
        answer, and none waiting for another: one that stops answering is out of the rotation
        within one interval."""
        half = self.settings.health_interval / 2
        checking: set[BackendInstance] = set()
        while True:
            await asyncio.sleep(half)
            for instance in self._serving():
                remote = instance.process is None and instance.state == State.READY
                if remote and not instance.dead and instance not in checking:
                    checking.add(instance)
                    task = self.supervisor.spawn(self._check(instance, half))
                    task.add_done_callback(functools.partial(_checked, checking, instance))

    async def _check(self, instance: BackendInstance, timeout: float) -> None:
        """One health check of a remote backend: its Status must say it serves our model.
        Failing it takes it out of the rotation until it passes again; one that restarted
        without its model, or that its placer moved, is placed and loaded again."""
        try:
            await self._judge(instance, await instance.client.serves(timeout))
        except Exception:  # a bug of ours must not end the checks
            log.exception("health check of %s failed", instance.address)

    async def _judge(self, instance: BackendInstance, serves: bool | None) -> None:
        if instance.dead or self._closing:
            return
        what = f"{_describe(instance.config, instance.replica)} at {instance.address}"
        slow = serves is None and instance.client.last_health_slow
        if slow and instance.busy and not instance.unhealthy and not instance.slow_checks:
            # A busy backend's one answer too slow is forgiven (its loop was held up); a second
            # in a row, half an interval later, is not. Refused or idle: it counts at once.
            instance.slow_checks = 1
            return
        instance.slow_checks = 0
        if serves:
            if instance.unhealthy:
                instance.unhealthy = False
                log.info("%s passes its health check again: back in rotation", what)
            return
        placer = self._placers[instance.config.placement_kind()]
        if serves is False or await placer.moved(instance):
            if serves is False:
                reason = "answers without its model (it restarted)"
            else:
                reason = f"failed its health check ({instance.client.last_health_failure})"
            log.warning("%s %s; placing and loading it again", what, reason)
            self._failed(instance.config, instance.replica, f"its backend {reason}")
            self._forget(instance)
            self._restart_lost(instance.config.name, instance.replica)
            return
        if not instance.unhealthy:
            instance.unhealthy = True
            log.warning(
                "%s failed its health check (%s): out of rotation until it passes",
                what,
                instance.client.last_health_failure,
            )

    # What GET /backends shows -----------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """Every backend: state, pid, threads, memory, requests, times, last error."""
        now_wall, now = time.time(), time.monotonic()
        rows = [self._row(i, now_wall, now) for i in self._serving()]
        shown = {(row["model"], row["replica"]) for row in rows}
        for key, start in self._starting.items():
            if key in shown or start.task.done():
                continue
            instance = start.instance
            if instance is not None and not instance.dead:
                rows.append(self._row(instance, now_wall, now))
            else:
                # sync: as last read, no file I/O
                config = self.registry.known.models.get(key[0])
                state = "queued for memory" if start.waiting_for_memory else "starting"
                rows.append(self._placeholder(key, config, state))
            shown.add(key)
        for key, failure in list(self._failures.items()):
            if now_wall - failure.at > _FAILURE_MEMORY_SECONDS:
                del self._failures[key]
            elif key not in shown:
                config = self.registry.known.models.get(key[0])
                state = "failing" if failure.waiting(now) else "failed"
                rows.append(self._placeholder(key, config, state))
        for row in rows:
            last = self._failures.get((row["model"], row["replica"]))
            row["last_error"] = last.message if last else None
            row["last_output"] = last.output or None if last else None
            row["failures"] = last.count if last else 0
            wait = last.waiting(now) if last else 0.0
            row["retry_at"] = int(now_wall + wait) if wait else None
        budget = self.budget
        return {
            "object": "list",
            "data": sorted(rows, key=lambda r: (r["model"], r["replica"])),
            "budget": {
                "cores": budget.cores,
                "cores_from": budget.cores_from,
                "memory_bytes": budget.memory_bytes,
                "memory_from": budget.memory_from,
                "memory_used_bytes": self.memory.used(),
                "max_loaded_models": self.settings.max_loaded_models,
            },
        }

    @staticmethod
    def _placeholder(key: Key, config: ModelConfig | None, state: str) -> dict[str, Any]:
        """A replica with no backend to show (yet, or any more)."""
        name, replica = key
        return {
            "model": name,
            "replica": replica,
            "replicas": config.replica_count() if config else 1,
            "placement": config.placement_kind() if config else "local",
            "node": None,
            "address": None,
            "healthy": None,
            "backend": config.backend if config else None,
            "state": state,
            "pid": None,
            "threads": None,
            "threads_max": None,
            "adjustable_threads": False,
            "memory": None,
            "requests": {"in_flight": 0, "queued": 0, "at_once": None, "served": 0},
            "loaded_at": None,
            "last_used_at": None,
            "keep_alive_seconds": None,
            "expires_at": None,
            "variants": [],
        }

    def _row(self, instance: BackendInstance, now_wall: float, now: float) -> dict[str, Any]:
        last_used = now_wall - (now - instance.last_used)
        keep_alive = instance.keep_alive
        expires = None
        if instance.state == State.READY and math.isfinite(keep_alive) and instance.slots.idle:
            expires = last_used + keep_alive
        config = instance.config
        return {
            "model": config.name,
            "replica": instance.replica,
            "replicas": config.replica_count(),
            "placement": config.placement_kind(),
            # Where it runs; a local process's private socket is nobody's business.
            "node": instance.node,
            "address": None if instance.process is not None else instance.address,
            "healthy": not instance.unhealthy,
            "backend": config.backend,
            "state": str(instance.state),
            "pid": instance.pid,
            "threads": instance.threads_applied or None,
            "threads_max": instance.threads_loaded or None,
            "adjustable_threads": instance.adjustable_threads,
            "memory": {
                "rss_bytes": instance.rss if instance.local else None,
                "peak_rss_bytes": instance.rss_peak if instance.local else None,
                "planned_bytes": instance.footprint.bytes,
                "planned_from": instance.footprint.source,
            },
            "requests": {
                "in_flight": instance.slots.busy,
                "queued": instance.slots.waiting,
                "at_once": instance.slots.limit,
                "served": instance.served,
            },
            "loaded_at": int(instance.loaded_at) if instance.loaded_at else None,
            "last_used_at": int(last_used),
            "keep_alive_seconds": keep_alive if math.isfinite(keep_alive) else None,
            "expires_at": int(expires) if expires is not None else None,
            "variants": self.variants(instance.config.name),
        }
