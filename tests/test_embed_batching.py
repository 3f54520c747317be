"""Dynamic batching of embeddings: concurrent callers share engine calls, and each gets exactly
what it would get alone (its own vectors, its own usage, its own errors)."""

from __future__ import annotations

import asyncio
import threading

from backends.echo.backend import EchoBackend
from backends.runtime.batching import EmbedBatcher
from protos.hearth.backend.v1 import backend_pb2 as pb

CALLERS = 16


def embed_request(*texts: str, max_input_tokens: int = 0) -> pb.EmbedRequest:
    return pb.EmbedRequest(
        inputs=[pb.EmbedInput(text=t) for t in texts], max_input_tokens=max_input_tokens
    )


class RecordingEcho:
    """The echo backend's embed on a worker thread, one call at a time as on an engine thread,
    recording how many inputs each engine call was given."""

    def __init__(self, latency_ms: float = 5) -> None:
        self.backend = EchoBackend()
        self.backend.load(pb.LoadRequest(options={"latency_ms": latency_ms}))
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def embed_alone(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        return self.backend.embed(request, threading.Event())

    async def run(self, request: pb.EmbedRequest, cancelled: threading.Event) -> pb.EmbedResponse:
        def call() -> pb.EmbedResponse:
            with self.lock:
                self.calls.append(len(request.inputs))
                return self.backend.embed(request, cancelled)

        return await asyncio.to_thread(call)


async def test_concurrent_callers_share_engine_calls_and_get_their_own_answers() -> None:
    engine = RecordingEcho()
    batcher = EmbedBatcher(engine.run, max_inputs=64)
    requests = [embed_request(f"text number {i}" + " word" * (i % 3)) for i in range(CALLERS)]
    requests.append(embed_request("two inputs", "in one call"))
    answers = await asyncio.gather(*(batcher.embed(r) for r in requests))
    for request, answer in zip(requests, answers, strict=True):
        alone = engine.embed_alone(request)
        assert [list(e.values) for e in answer.embeddings] == [
            list(e.values) for e in alone.embeddings
        ]
        assert answer.prompt_tokens == alone.prompt_tokens
        assert list(answer.input_tokens) == list(alone.input_tokens)
    # The first caller found the engine idle and went alone; the rest waited for it together.
    assert len(engine.calls) < len(requests) // 2
    assert sum(engine.calls) == sum(len(r.inputs) for r in requests)
    assert batcher.merged_calls >= 1


async def test_batches_hold_at_most_max_inputs_and_only_compatible_calls() -> None:
    engine = RecordingEcho()
    batcher = EmbedBatcher(engine.run, max_inputs=4)
    short = [embed_request(f"a{i}", max_input_tokens=8) for i in range(6)]
    other = [embed_request(f"b{i}") for i in range(3)]
    answers = await asyncio.gather(*(batcher.embed(r) for r in [*short, *other]))
    assert all(len(a.embeddings) == 1 for a in answers)
    assert max(engine.calls) <= 4
    # Calls with another max_input_tokens never share an engine call with these.
    assert sum(engine.calls) == 9
    assert len(engine.calls) >= 3


async def test_an_error_reaches_only_the_caller_at_fault() -> None:
    engine = RecordingEcho()
    batcher = EmbedBatcher(engine.run, max_inputs=64)
    fine = [embed_request(f"fine {i}", max_input_tokens=4) for i in range(5)]
    too_long = embed_request("far too many words for the bound", max_input_tokens=4)
    results = await asyncio.gather(
        *(batcher.embed(r) for r in [*fine[:3], too_long, *fine[3:]]), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1
    assert results[3] is errors[0]
    assert "input[0] is 7 tokens" in str(errors[0])  # its own index, not the merged one
    for request, answer in zip(fine, [*results[:3], *results[4:]], strict=True):
        assert isinstance(answer, pb.EmbedResponse)
        assert list(answer.embeddings) == list(engine.embed_alone(request).embeddings)


async def test_a_caller_that_leaves_before_its_turn_is_not_computed() -> None:
    engine = RecordingEcho(latency_ms=50)
    batcher = EmbedBatcher(engine.run, max_inputs=64)
    first = asyncio.create_task(batcher.embed(embed_request("first")))
    await asyncio.sleep(0.01)  # the first is computing now; the next one waits
    leaving = asyncio.create_task(batcher.embed(embed_request("leaves", "early")))
    await asyncio.sleep(0.01)
    leaving.cancel()
    staying = await batcher.embed(embed_request("stays"))
    await first
    assert leaving.cancelled()
    assert len(staying.embeddings) == 1
    assert engine.calls == [1, 1]  # "leaves", "early" never reached the engine


async def test_a_batch_whose_callers_all_left_is_told_to_stop() -> None:
    seen: list[threading.Event] = []
    release = asyncio.Event()

    async def run(request: pb.EmbedRequest, cancelled: threading.Event) -> pb.EmbedResponse:
        seen.append(cancelled)
        await release.wait()
        return pb.EmbedResponse()

    batcher = EmbedBatcher(run, max_inputs=64)
    callers = [asyncio.create_task(batcher.embed(embed_request(f"t{i}"))) for i in range(3)]
    await asyncio.sleep(0.01)
    callers[0].cancel()
    await asyncio.sleep(0.01)
    assert not seen[0].is_set()
    for caller in callers[1:]:
        caller.cancel()
    await asyncio.sleep(0.01)
    assert seen[0].is_set()  # the first went alone; nobody wants its answer now
    release.set()


async def test_a_window_gathers_callers_that_arrive_close_together() -> None:
    engine = RecordingEcho(latency_ms=0)
    batcher = EmbedBatcher(engine.run, max_inputs=64, window_seconds=0.05)

    async def later(delay: float, text: str) -> pb.EmbedResponse:
        await asyncio.sleep(delay)
        return await batcher.embed(embed_request(text))

    await asyncio.gather(later(0, "a"), later(0.01, "b"), later(0.02, "c"))
    assert engine.calls == [3]
