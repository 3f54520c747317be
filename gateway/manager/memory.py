"""Memory: which model may load, which idle one is unloaded to make room, and which never fits.

One planner decides, one load at a time (as Ollama's scheduler does): a load asks for its
footprint; if the loaded models and the loads in progress leave room in the budget, it gets a
reservation at once. If not, idle backends are unloaded, least recently used first; if the
rest are busy, the least recently used of them is drained (it finishes what it has, takes
nothing new, then stops) and the load waits. A model larger than the whole budget is refused at
once, without starting anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from gateway.errors import OpenAIError
from gateway.manager.budget import Machine, MachineBudget
from gateway.manager.footprint import Footprint
from gateway.manager.instance import BackendInstance, State
from gateway.units import format_size

log = logging.getLogger("hearth.manager")


class Reservation:
    """Memory held for a load in progress, until the loaded backend accounts for itself."""

    def __init__(self, planner: MemoryPlanner, footprint: Footprint) -> None:
        self.planner = planner
        self.bytes = footprint.bytes if footprint.source != "remote" else 0

    def release(self) -> None:
        self.planner._reservations.discard(self)
        self.planner.notify()


class MemoryPlanner:
    """Decides loads against the machine's memory budget and the optional model count limit."""

    def __init__(
        self,
        budget: MachineBudget,
        holders: Callable[[], list[BackendInstance]],
        evict: Callable[[BackendInstance, str], Awaitable[None]],
        drain: Callable[[BackendInstance, str], None],
        max_loaded: int | None = None,
        machine: Machine | None = None,
    ) -> None:
        self.budget = budget
        self.max_loaded = max_loaded
        self._holders = holders
        self._evict = evict
        self._drain = drain
        self._machine = machine
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._reservations: set[Reservation] = set()

    def notify(self) -> None:
        """Something that holds memory or a slot changed: waiting loads look again."""
        self._changed.set()

    def used(self) -> int:
        """Bytes held by loaded backends (stopping ones too) and loads in progress."""
        return sum(h.memory for h in self._holders()) + sum(r.bytes for r in self._reservations)

    def _regrow(self) -> None:
        """Take a larger budget if the machine has more available now than at start."""
        if self._machine is None:
            return
        held = sum(h.rss_anonymous for h in self._holders() if h.local)
        grown = self._machine.regrown(self.budget, held)
        if grown is not None:
            log.info("more memory is available than at start: %s", grown.describe())
            self.budget = grown

    def refusal(self, model: str, footprint: Footprint) -> OpenAIError | None:
        """The error for a model that can never fit this machine's budget, or None."""
        if footprint.bytes <= self.budget.memory_bytes or footprint.source == "remote":
            return None
        loaded = ", ".join(
            f"{h.config.name} ({format_size(h.memory)})" for h in self._holders() if h.local
        )
        return OpenAIError(
            507,
            f"model '{model}' needs about {footprint.describe()}, more than this machine's "
            f"budget for models of {format_size(self.budget.memory_bytes)} "
            f"({self.budget.memory_from}); loaded now: {loaded or 'nothing'}. Use a smaller "
            "model or quantization, a shorter context_size, or raise HEARTH_MEMORY if the "
            "machine has more to give.",
            param="model",
            code="model_too_large",
            retry=False,  # it will not fit on a retry either
        )

    def reserve_now(self, footprint: Footprint) -> Reservation | str:
        """Room now, unloading and draining nothing (one more replica beside its model's
        others): the reservation, or why there is none."""
        need = 0 if footprint.source == "remote" else footprint.bytes
        used, over_count, short, live_short = self._fit(need, self._holders())
        if over_count:
            return f"{self.max_loaded} backends are loaded (HEARTH_MAX_LOADED_MODELS)"
        if short or live_short:
            return (
                f"it needs {footprint.describe()} and {format_size(used)} of the "
                f"{format_size(self.budget.memory_bytes)} memory budget is in use"
            )
        return self._hold(footprint)

    def _fit(self, need: int, holders: list[BackendInstance]) -> tuple[int, bool, bool, bool]:
        """Memory in use (holders and loads in progress), and what a load of `need` bytes
        would be short of: the model count, the budget, the machine's free memory now."""
        used = sum(h.memory for h in holders) + sum(r.bytes for r in self._reservations)
        count = len(holders) + len(self._reservations)
        over_count = self.max_loaded is not None and count >= self.max_loaded
        short = need > 0 and used + need > self.budget.memory_bytes
        live_short = not short and self._short_now(need)
        return used, over_count, short, live_short

    def _hold(self, footprint: Footprint) -> Reservation:
        reservation = Reservation(self, footprint)
        self._reservations.add(reservation)
        return reservation

    async def reserve(self, model: str, footprint: Footprint, timeout: float) -> Reservation:
        """Room for `model`: at once, after unloading idle backends, or after busy ones drain."""
        need = 0 if footprint.source == "remote" else footprint.bytes
        if need + self.used() > self.budget.memory_bytes:
            self._regrow()
        refused = self.refusal(model, footprint)
        if refused is not None:
            raise refused
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._lock:
            while True:
                self._changed.clear()
                holders = self._holders()  # stopping ones count until their process is gone
                used, over_count, short, live_short = self._fit(need, holders)
                if not short and not over_count and not live_short:
                    return self._hold(footprint)
                why = "the model count limit" if over_count and not short else "memory"
                # Only what frees memory here helps a shortage of memory: local backends.
                memory_short = short or live_short
                # A model's other replicas are never unloaded for one more of its own.
                candidates = [
                    h
                    for h in holders
                    if h.alive and (h.local or not memory_short) and h.config.name != model
                ]
                idle = [h for h in candidates if h.slots.idle and h.state == State.READY]
                if idle:
                    victim = min(idle, key=lambda h: h.last_used)
                    await self._evict(victim, f"to make room for {model} ({why})")
                    continue
                if not short and not over_count:
                    # Only the machine's live free memory is short, and nothing is idle: the
                    # budget says it fits, so load (other programs may give memory back).
                    log.warning("loading %s although the machine's free memory is low", model)
                    return self._hold(footprint)
                if not any(h.state == State.DRAINING for h in candidates):
                    busy = [h for h in candidates if h.state == State.READY]
                    if busy:
                        victim = min(busy, key=lambda h: h.last_used)
                        self._drain(victim, f"to make room for {model} ({why})")
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if why == "memory":
                        detail = (
                            f"needs {format_size(need)} of memory and waited {timeout:g} s for "
                            f"busy models to finish ({format_size(used)} of "
                            f"{format_size(self.budget.memory_bytes)} in use)"
                        )
                    else:
                        detail = (
                            f"waited {timeout:g} s for one of the {self.max_loaded} loaded "
                            f"models to finish (HEARTH_MAX_LOADED_MODELS={self.max_loaded})"
                        )
                    raise OpenAIError(
                        503,
                        f"model '{model}' {detail}; retry shortly",
                        code="insufficient_memory",
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    def _short_now(self, need: int) -> bool:
        """The machine itself has less free memory than `need` (other programs grew)."""
        if self._machine is None or need == 0:
            return False
        available, _ = self._machine.available_memory()
        return bool(available) and available < need

    def over_budget(self) -> int:
        """Bytes by which loaded backends exceed the budget (they grew past their estimates)."""
        return max(0, self.used() - self.budget.memory_bytes)
