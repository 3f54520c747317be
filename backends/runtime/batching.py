"""Dynamic batching of Embed calls: concurrent callers share one engine call.

Calls wait in a queue. Whenever the engine is free, the oldest call and every queued call
compatible with it (the same `dimensions` and `max_input_tokens`) go together, up to the
backend's `embed_batch_inputs` inputs, as one EmbedRequest; each caller gets its own vectors
and its own inputs' token count back. A call that finds the engine idle waits for nothing (or
for the model YAML's `batch_window_ms`, to gather near-simultaneous arrivals); while the engine
works, new calls gather and go together next, so batches grow with the load by themselves.

A merged call that fails is run again one call at a time, so an error (an input too long, a
token array the model cannot read) reaches only the caller at fault. A caller that leaves is
dropped from the queue; a batch already computing is told to stop only once all its callers
have left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from protos.hearth.backend.v1 import backend_pb2 as pb

log = logging.getLogger("hearth.backend.batching")

#: Concurrent calls an embedding model asks the gateway for (LoadResponse.concurrent_calls):
#: enough for batches that keep the engine busy, few enough that what waits stays small.
CONCURRENT_CALLS = 16

#: Runs one EmbedRequest on the engine; the event is set when nobody wants the answer any more.
EngineCall = Callable[[pb.EmbedRequest, threading.Event], Awaitable[pb.EmbedResponse]]


@dataclass(eq=False)
class _Group:
    """Calls computing together, and the event that stops their engine call."""

    members: list[_Waiting]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Waiting:
    """One caller's request and where its answer goes."""

    request: pb.EmbedRequest
    answer: asyncio.Future[pb.EmbedResponse]
    started: Callable[[], Awaitable[None]] | None = None
    gone: bool = False
    group: _Group | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.request.dimensions, self.request.max_input_tokens)


class EmbedBatcher:
    """Gathers concurrent Embed calls into engine calls of up to `max_inputs` inputs."""

    def __init__(self, run: EngineCall, max_inputs: int, window_seconds: float = 0.0) -> None:
        self._run = run
        self.max_inputs = max_inputs
        self.window_seconds = window_seconds
        self._queue: list[_Waiting] = []
        self._arrived = asyncio.Event()
        # Runs while calls are queued, and ends when none is left.
        self._dispatcher: asyncio.Task[None] | None = None
        #: Engine calls that served more than one caller (observable by tests and logs).
        self.merged_calls = 0

    async def embed(
        self,
        request: pb.EmbedRequest,
        started: Callable[[], Awaitable[None]] | None = None,
    ) -> pb.EmbedResponse:
        """This caller's answer, computed alone or with whoever else is waiting. `started` is
        awaited when the call's batch goes to the engine."""
        waiting = _Waiting(request, asyncio.get_running_loop().create_future(), started)
        self._queue.append(waiting)
        self._arrived.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch(), name="embed-batcher")
        try:
            return await asyncio.shield(waiting.answer)
        except asyncio.CancelledError:
            self._leave(waiting)
            raise

    def _leave(self, waiting: _Waiting) -> None:
        """The caller left: not computed if it has not started, stopped if nobody else waits."""
        waiting.gone = True
        if waiting in self._queue:
            self._queue.remove(waiting)
        group = waiting.group
        if group is not None and all(member.gone for member in group.members):
            group.cancelled.set()

    async def _dispatch(self) -> None:
        await self._gather()
        while self._queue:
            batch = self._take()
            try:
                await self._serve(batch)
            except Exception as exc:  # a bug here must not leave callers waiting forever
                log.error("embedding batch failed", exc_info=exc)
                for waiting in batch:
                    if not waiting.gone and not waiting.answer.done():
                        waiting.answer.set_exception(exc)

    async def _gather(self) -> None:
        """The engine was idle: give near-simultaneous callers the window to join."""
        if self.window_seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_seconds
        while self._queued_inputs() < self.max_inputs:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    def _queued_inputs(self) -> int:
        return sum(len(w.request.inputs) for w in self._queue)

    def _take(self) -> list[_Waiting]:
        """The oldest call, and the compatible ones behind it that fit beside it."""
        if not self._queue:
            return []
        key = self._queue[0].key
        batch: list[_Waiting] = []
        inputs = 0
        for waiting in self._queue:
            size = len(waiting.request.inputs)
            if waiting.key != key or (batch and inputs + size > self.max_inputs):
                continue
            batch.append(waiting)
            inputs += size
        for waiting in batch:
            self._queue.remove(waiting)
        return batch

    async def _serve(self, batch: list[_Waiting]) -> None:
        for waiting in batch:
            if waiting.started is not None:
                await waiting.started()
                waiting.started = None
        if len(batch) == 1:
            await self._alone(batch[0])
            return
        group = _Group(batch)
        for waiting in batch:
            waiting.group = group
        merged = pb.EmbedRequest(
            inputs=[item for w in batch for item in w.request.inputs],
            dimensions=batch[0].request.dimensions,
            max_input_tokens=batch[0].request.max_input_tokens,
        )
        try:
            response = await self._run(merged, group.cancelled)
        except Exception as exc:
            if group.cancelled.is_set():
                return  # every caller has left: nobody to tell
            log.info(
                "a batch of %d calls failed (%s); running each alone",
                len(batch),
                type(exc).__name__,
            )
            await self._each_alone(batch)
            return
        total = len(merged.inputs)
        if len(response.embeddings) != total or len(response.input_tokens) != total:
            log.error(
                "the backend answered a batch of %d inputs with %d vectors and %d token "
                "counts; embeddings are no longer batched",
                total,
                len(response.embeddings),
                len(response.input_tokens),
            )
            self.max_inputs = 0
            await self._each_alone(batch)
            return
        self.merged_calls += 1
        log.debug("embedded %d inputs of %d calls in one engine call", total, len(batch))
        start = 0
        for waiting in batch:
            end = start + len(waiting.request.inputs)
            tokens = list(response.input_tokens[start:end])
            own = pb.EmbedResponse(
                embeddings=response.embeddings[start:end],
                prompt_tokens=sum(tokens),
                input_tokens=tokens,
            )
            start = end
            if not waiting.answer.done():
                waiting.answer.set_result(own)

    async def _each_alone(self, batch: list[_Waiting]) -> None:
        for waiting in batch:
            if not waiting.gone:
                await self._alone(waiting)

    async def _alone(self, waiting: _Waiting) -> None:
        group = waiting.group = _Group([waiting])
        try:
            response = await self._run(waiting.request, group.cancelled)
        except Exception as exc:
            if not waiting.gone and not waiting.answer.done():
                waiting.answer.set_exception(exc)
        else:
            if not waiting.answer.done():
                waiting.answer.set_result(response)
