"""Dynamic batching of embeddings: concurrent callers share engine calls, and each gets exactly
what it would get alone (its own vectors, its own usage, its own errors)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from backends.echo.backend import EchoBackend
from backends.runtime.batching import EmbedBatcher
from protos.hearth.backend.v1 import backend_pb2 as pb
from tests.conftest import Gateway, link_tree, write_model

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


async def test_a_call_is_marked_begun_only_when_its_batch_reaches_the_engine() -> None:
    # The gateway sends a call that was never begun to a replacement backend if this one dies:
    # a call still queued here must not say it has begun.
    engine = RecordingEcho(latency_ms=50)
    batcher = EmbedBatcher(engine.run, max_inputs=64)
    begun: list[str] = []

    def mark(name: str) -> Callable[[], Awaitable[None]]:
        async def started() -> None:
            begun.append(name)

        return started

    first = asyncio.create_task(batcher.embed(embed_request("first"), mark("first")))
    await asyncio.sleep(0.02)
    second = asyncio.create_task(batcher.embed(embed_request("second"), mark("second")))
    await asyncio.sleep(0.01)
    assert begun == ["first"]
    await asyncio.gather(first, second)
    assert begun == ["first", "second"]


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
    batcher = EmbedBatcher(engine.run, max_inputs=64, window_seconds=0.3)

    async def later(delay: float, text: str) -> pb.EmbedResponse:
        await asyncio.sleep(delay)
        return await batcher.embed(embed_request(text))

    await asyncio.gather(later(0, "a"), later(0.01, "b"), later(0.02, "c"))
    assert engine.calls == [3]


# Through the gateway, on the real all-MiniLM-L6-v2 ------------------------------------------


@pytest.fixture(scope="module")
def minilm_gateway(
    tmp_path_factory: pytest.TempPathFactory, real_models: Path
) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("batching-models")
    link_tree(real_models / "all-minilm-l6-v2", directory / "all-minilm-l6-v2")
    minilm = "backend: transformers\nmodel: all-minilm-l6-v2\nembeddings: true\nthreads: 2"
    write_model(directory, "minilm", minilm)
    write_model(directory, "minilm-strict", f"{minilm}\noptions: {{truncate: false}}")
    write_model(directory, "minilm-one-by-one", f"{minilm}\nmax_concurrency: 1")
    running = Gateway(directory, env={"HEARTH_LOG_LEVEL": "DEBUG"}).start()
    yield running
    running.cleanup()


TEXTS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors.",
    "Hearth serves a household.",
    "short",
    "Batching gathers concurrent requests into one forward pass, padded to the longest.",
    "What time is it?",
    "Zwei Sprachen in einem Modell.",
    "The weather today is mild and grey.",
    "Remember to buy milk, eggs and bread.",
    "Vectors of similar sentences lie close together.",
    "One",
    "A much longer sentence that has quite a few more tokens than most of the others here.",
    "Notes app indexing a paragraph.",
    "RAG pipelines embed chunks of documents.",
    "Last one.",
]


def _embed(client: httpx.Client, model: str, text: str) -> tuple[np.ndarray, int]:
    response = client.post("/v1/embeddings", json={"model": model, "input": text})
    assert response.status_code == 200, response.text
    body = response.json()
    return np.array(body["data"][0]["embedding"]), body["usage"]["prompt_tokens"]


@pytest.mark.real_model
def test_sixteen_concurrent_callers_get_what_they_get_alone(minilm_gateway: Gateway) -> None:
    with httpx.Client(base_url=minilm_gateway.url, timeout=60) as client:
        alone = [_embed(client, "minilm", text) for text in TEXTS]

    async def together() -> list[tuple[np.ndarray, int]]:
        async with httpx.AsyncClient(base_url=minilm_gateway.url, timeout=60) as client:

            async def one(text: str) -> tuple[np.ndarray, int]:
                response = await client.post(
                    "/v1/embeddings", json={"model": "minilm", "input": text}
                )
                assert response.status_code == 200, response.text
                body = response.json()
                return np.array(body["data"][0]["embedding"]), body["usage"]["prompt_tokens"]

            results = []
            for _ in range(3):  # a few rounds: each must be right, whatever the batches were
                results = await asyncio.gather(*(one(t) for t in TEXTS))
            return results

    batched = asyncio.run(together())
    for text, (vector, tokens), (own, own_tokens) in zip(TEXTS, batched, alone, strict=True):
        assert np.allclose(vector, own, atol=1e-5), text
        assert tokens == own_tokens, text
    assert "in one engine call" in minilm_gateway.log()  # they were computed together


@pytest.mark.real_model
def test_an_input_too_long_fails_only_its_caller(minilm_gateway: Gateway) -> None:
    long_text = "word " * 400  # past the 256 tokens the model reads; truncate: false

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=minilm_gateway.url, timeout=60) as client:
            bodies = [{"model": "minilm-strict", "input": t} for t in TEXTS[:8]]
            bodies.insert(4, {"model": "minilm-strict", "input": long_text})
            return await asyncio.gather(*(client.post("/v1/embeddings", json=b) for b in bodies))

    responses = asyncio.run(together())
    statuses = [r.status_code for r in responses]
    assert statuses[4] == 400, responses[4].text
    assert responses[4].json()["error"]["param"] == "input"
    assert statuses[:4] + statuses[5:] == [200] * 8


@pytest.mark.real_model
def test_max_concurrency_in_the_yaml_still_wins(minilm_gateway: Gateway) -> None:
    async def together() -> None:
        async with httpx.AsyncClient(base_url=minilm_gateway.url, timeout=60) as client:
            bodies = [{"model": "minilm-one-by-one", "input": t} for t in TEXTS[:6]]
            responses = await asyncio.gather(
                *(client.post("/v1/embeddings", json=b) for b in bodies)
            )
            assert all(r.status_code == 200 for r in responses)

    asyncio.run(together())
    merged = [
        line
        for line in minilm_gateway.log().splitlines()
        if "minilm-one-by-one" in line and "in one engine call" in line
    ]
    assert merged == []  # one request at a time reached the backend: nothing to merge


# The llama backend, in this process, on the tiny GGUF ------------------------------------------


@pytest.mark.llama
async def test_llama_gives_each_caller_what_it_gives_it_alone(tiny_gguf: Path) -> None:
    from backends.llama.backend import LlamaBackend

    backend = LlamaBackend()
    backend.load(pb.LoadRequest(model_path=str(tiny_gguf), embeddings=True, threads=1))
    try:
        calls: list[int] = []

        async def run(request: pb.EmbedRequest, cancelled: threading.Event) -> pb.EmbedResponse:
            calls.append(len(request.inputs))
            return await asyncio.to_thread(backend.embed, request, cancelled)

        batcher = EmbedBatcher(run, max_inputs=LlamaBackend.embed_batch_inputs)
        requests = [embed_request(text) for text in TEXTS]
        answers = await asyncio.gather(*(batcher.embed(r) for r in requests))
        assert len(calls) < len(requests)
        for request, answer in zip(requests, answers, strict=True):
            alone = backend.embed(request, threading.Event())
            assert np.allclose(answer.embeddings[0].values, alone.embeddings[0].values, atol=1e-5)
            assert answer.prompt_tokens == alone.prompt_tokens
    finally:
        backend.unload()
