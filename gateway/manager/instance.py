"""One backend process (or remote address) serving one model, and what is known about it."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections import deque
from dataclasses import dataclass, field

from gateway.client import BackendClient, BackendTLS
from gateway.config import ModelConfig
from gateway.manager.admission import Slots
from gateway.manager.footprint import Footprint
from protos.hearth.backend.v1.contract import Capability

#: Lines of a backend's output kept for error messages.
OUTPUT_LINES = 40


class State(enum.StrEnum):
    """Where a backend is in its life, as GET /backends shows it."""

    STARTING = "starting"  # the process is starting, not yet healthy
    LOADING = "loading"  # healthy, loading its model
    READY = "ready"  # serving
    DRAINING = "draining"  # finishing the requests it has, then it stops
    STOPPED = "stopped"  # gone


@dataclass
class Placed:
    """Where a placer put one replica's backend: its address and how to reach it."""

    address: str
    #: A local process of the gateway's (the local placer's); None elsewhere.
    process: asyncio.subprocess.Process | None = None
    #: The token every call carries, and TLS, for a backend reached over the network.
    token: str | None = None
    tls: BackendTLS | None = None
    #: The machine it runs on, as GET /backends shows it (None: this one).
    node: str | None = None


@dataclass(eq=False)
class BackendInstance:
    """One backend and its model, from spawn to stop."""

    config: ModelConfig
    address: str
    client: BackendClient
    process: asyncio.subprocess.Process | None
    slots: Slots
    state: State = State.STARTING
    #: Which of the model's replicas it is (0 to replicas - 1).
    replica: int = 0
    #: The machine it runs on, where the placer knows (None: this one).
    node: str | None = None
    #: Out of the rotation: it failed its last health check; requests go to other replicas.
    unhealthy: bool = False
    #: Health checks in a row that got no answer in time while it was busy (one is forgiven).
    slow_checks: int = 0
    #: Requests it has served (ended, however they ended).
    served: int = 0
    capabilities: frozenset[Capability] = frozenset()
    output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_LINES))
    #: time.monotonic() of the last request's end (or of the load).
    last_used: float = field(default_factory=time.monotonic)
    #: Wall-clock time the model became ready.
    loaded_at: float | None = None
    dead: bool = False
    #: The gateway ended it (unload, idle, shutdown): its exit is no failure.
    deliberate_stop: bool = False
    #: Its unexpected exit has been counted as a failure.
    exit_noted: bool = False
    #: Idle seconds before it is unloaded (math.inf: never), as the last request left it.
    keep_alive: float = math.inf
    #: Memory planned for it before loading, and its resident memory (now, and the most seen).
    footprint: Footprint = field(default_factory=lambda: Footprint(0, "unknown"))
    #: The settings it was loaded with, where the manager chose one the YAML leaves open
    #: (`parallel`); its measured memory is recorded under these.
    loaded_as: ModelConfig | None = None
    rss: int = 0
    rss_peak: int = 0
    #: The part of `rss` the kernel cannot drop (not pages of mapped files).
    rss_anonymous: int = 0
    #: Threads: the most it was loaded with, what the gateway gives it now, whether it can change.
    threads_loaded: int = 0
    threads: int = 0
    adjustable_threads: bool = False
    #: The thread count the backend last confirmed, and the lock that orders the updates.
    threads_applied: int = 0
    threads_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def alive(self) -> bool:
        if self.dead:
            return False
        return self.process is None or self.process.returncode is None

    @property
    def local(self) -> bool:
        """A process of ours, on this machine (not a remote address)."""
        return self.process is not None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def exited(self, timeout: float) -> bool:
        """Whether the process has ended, waiting up to `timeout` seconds to find out."""
        if self.process is None:
            return self.dead
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), timeout)
        return self.process.returncode is not None

    @property
    def memory(self) -> int:
        """Memory to plan with: the most of its footprint and what it was seen to use."""
        return 0 if not self.local else max(self.footprint.bytes, self.rss_peak)

    @property
    def busy(self) -> bool:
        """Working on a request now."""
        return self.slots.busy > 0

    def expired(self, now: float) -> bool:
        """Idle for longer than its keep_alive."""
        return self.slots.idle and now - self.last_used >= self.keep_alive

    @property
    def key(self) -> tuple[str, int]:
        """The model and replica it serves."""
        return (self.config.name, self.replica)

    def recent_output(self, lines: int = 12) -> str:
        return "\n".join(list(self.output)[-lines:])
