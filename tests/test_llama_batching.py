"""Continuous batching in the llama backend: concurrent requests share one context, and each gets
exactly the answer it would get alone."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, link_tree, write_model

pytestmark = pytest.mark.llama

SMOLLM2 = "smollm2"
TINY = "tiny-two"
#: Prompts of different lengths, each of which SmolLM2 continues past 48 tokens.
PROMPTS = [
    "The old lighthouse keeper climbed the stairs one last time, and",
    "Here is a recipe for a simple bread that anyone can bake at home:",
    "In the year 2150, the first city on Mars",
    "A letter to my younger self: Dear me,",
]


@pytest.fixture(scope="module")
def batching(
    tmp_path_factory: pytest.TempPathFactory, real_models: Path, tiny_gguf: Path
) -> Iterator[Gateway]:
    models = tmp_path_factory.mktemp("batching")
    link_tree(real_models / "smollm2-135m-instruct", models / "smollm2-135m-instruct")
    gguf = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    # No parallel: the default, 4 generations at once.
    write_model(models, SMOLLM2, f"backend: llama\nmodel: {gguf}\ncontext_size: 1024")
    link_tree(tiny_gguf.parent, models / "tiny")
    write_model(
        models,
        TINY,
        # A batch of one token: prompts are read a token a step, and a step's tokens for the
        # two sequences still fit (llama.cpp aborts on more outputs than its batch holds).
        "backend: llama\nmodel: tiny/tiny-llama.gguf\ncontext_size: 256\nparallel: 2\n"
        "batch_size: 1",
    )
    gateway = Gateway(models).start()
    yield gateway
    gateway.cleanup()


@dataclass
class Stream:
    """One streamed completion: its text, when each piece came, and how it ended."""

    text: str = ""
    arrivals: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def first(self) -> float:
        return self.arrivals[0]

    @property
    def last(self) -> float:
        return self.arrivals[-1]


def stream(url: str, body: dict[str, Any], *, stop_after: int | None = None) -> Stream:
    """Stream a completion (a chat one if `body` has messages); `stop_after`: hang up after
    that many pieces."""
    result = Stream()
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chat = "messages" in body
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with (
        httpx.Client(base_url=url, timeout=120) as http,
        http.stream("POST", path, json=request) as response,
    ):
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                result.usage = chunk["usage"]
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content") if chat else choice["text"]
                if piece:
                    result.text += piece
                    result.arrivals.append(time.monotonic())
                result.finish_reason = choice["finish_reason"] or result.finish_reason
            if stop_after is not None and len(result.arrivals) >= stop_after:
                break
    return result


def together(url: str, bodies: list[dict[str, Any]], **options: Any) -> list[Stream]:
    """All bodies streamed at once, one thread each."""
    results: list[Stream | None] = [None] * len(bodies)

    def run(index: int) -> None:
        results[index] = stream(url, bodies[index], **options.get(str(index), {}))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert all(r is not None for r in results), "a stream failed"
    return [r for r in results if r is not None]


def greedy(model: str, prompt: str, max_tokens: int = 48, **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def assert_overlapped(streams: list[Stream]) -> None:
    """Each stream's first piece came before every other stream's last: computed together,
    not one after another."""
    for one in streams:
        for other in streams:
            assert one.first < other.last, "the requests were served one after another"


@pytest.mark.real_model
def test_greedy_answers_are_the_same_alone_and_batched_with_three_others(
    batching: Gateway,
) -> None:
    bodies = [greedy(SMOLLM2, p) for p in PROMPTS]
    alone = [stream(batching.url, body) for body in bodies]
    assert all(a.finish_reason == "length" for a in alone), "prompts chosen to run to the limit"
    batched = together(batching.url, bodies)
    assert_overlapped(batched)
    for a, b in zip(alone, batched, strict=True):
        assert b.text == a.text
        assert b.finish_reason == "length"
        assert b.usage["completion_tokens"] == a.usage["completion_tokens"] == 48
        assert b.usage["prompt_tokens"] == a.usage["prompt_tokens"]


@pytest.mark.real_model
def test_cancelling_one_stream_leaves_the_others_unchanged_and_frees_its_slot(
    batching: Gateway,
) -> None:
    bodies = [greedy(SMOLLM2, p, max_tokens=96) for p in PROMPTS]
    alone = {i: stream(batching.url, bodies[i]).text for i in (1, 2, 3)}
    newcomer = greedy(SMOLLM2, "The history of the bicycle begins", max_tokens=8)
    results: dict[str, Stream] = {}

    def hang_up_then_send_another() -> None:
        results["cancelled"] = stream(batching.url, bodies[0], stop_after=3)
        # The four slots were all taken: this one starts only if the cancelled one's is free.
        results["newcomer"] = stream(batching.url, newcomer)

    first = threading.Thread(target=hang_up_then_send_another)
    first.start()
    others = together(batching.url, bodies[1:])
    first.join(180)
    for index, other in zip((1, 2, 3), others, strict=True):
        assert other.text == alone[index]
        assert other.usage["completion_tokens"] == 96
    assert len(results["cancelled"].arrivals) == 3
    arrived = results["newcomer"]
    assert arrived.usage["completion_tokens"] == 8
    assert all(arrived.last < other.last for other in others), "the freed slot was not reused"


@pytest.mark.real_model
def test_stops_limits_and_a_grammar_each_hold_for_their_own_sequence(batching: Gateway) -> None:
    plain = stream(batching.url, greedy(SMOLLM2, PROMPTS[1]))
    stop_word = plain.text.split()[3]
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "year": {"type": "integer"}},
        "required": ["city", "year"],
    }
    bodies = [
        greedy(SMOLLM2, PROMPTS[0]),
        greedy(SMOLLM2, PROMPTS[1], stop=[stop_word]),
        greedy(SMOLLM2, PROMPTS[2], max_tokens=5),
        {
            "model": SMOLLM2,
            "messages": [{"role": "user", "content": "Name a city and the year it was founded."}],
            "max_tokens": 64,
            "temperature": 0,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": schema},
            },
        },
    ]
    free, stopped, short, constrained = together(batching.url, bodies)
    assert free.finish_reason == "length"
    assert free.usage["completion_tokens"] == 48
    assert stopped.finish_reason == "stop"
    assert stop_word not in stopped.text
    assert plain.text.startswith(stopped.text)
    assert stopped.usage["completion_tokens"] < 48
    assert short.finish_reason == "length"
    assert short.usage["completion_tokens"] == 5
    answer = json.loads(constrained.text)
    assert isinstance(answer["city"], str)
    assert isinstance(answer["year"], int)
    assert constrained.finish_reason == "stop"


@pytest.mark.real_model
def test_a_conversation_continued_reuses_its_cached_beginning(batching: Gateway) -> None:
    messages = [{"role": "user", "content": "Tell me about lighthouses."}]
    body = {"model": SMOLLM2, "messages": messages, "max_tokens": 16, "temperature": 0}
    with httpx.Client(base_url=batching.url, timeout=120) as http:
        first = http.post("/v1/chat/completions", json=body).json()
        answer = first["choices"][0]["message"]["content"]
        turn = [
            *messages,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And who kept them?"},
        ]
        second = http.post("/v1/chat/completions", json={**body, "messages": turn}).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    # At least the first turn's prompt was found in the cache, not computed again.
    assert cached >= first["usage"]["prompt_tokens"]
    assert cached < second["usage"]["prompt_tokens"]


def test_more_requests_than_sequences_wait_for_a_slot_and_get_their_own_answers(
    batching: Gateway,
) -> None:
    prompts = [f"item {i}: " + "word " * i for i in range(6)]
    bodies = [greedy(TINY, p, max_tokens=24) for p in prompts]
    alone = [stream(batching.url, body) for body in bodies]
    batched = together(batching.url, bodies)
    for a, b in zip(alone, batched, strict=True):
        assert b.text == a.text
        assert b.usage["completion_tokens"] == a.usage["completion_tokens"]
    with httpx.Client(base_url=batching.url, timeout=30) as http:
        listed = {m["model"]: m for m in http.get("/backends").json()["data"]}
    assert listed[TINY]["requests"]["at_once"] == 2


# The backend in this process: loading, unloading and what is in flight -------------------------


def load_tiny(path: Path, **settings: Any) -> Any:
    from backends.llama.backend import LlamaBackend
    from protos.hearth.backend.v1 import backend_pb2 as pb

    backend = LlamaBackend()
    request = pb.LoadRequest(model_name="tiny", model_path=str(path), threads=1, **settings)
    backend.load(request)
    return backend


def test_loading_again_or_failing_to_load_leaves_no_engine_behind(tiny_gguf: Path) -> None:
    from backends.runtime import BackendError
    from protos.hearth.backend.v1 import backend_pb2 as pb

    backend = load_tiny(tiny_gguf, context_size=128, parallel=2)
    first = backend.engine
    assert first is not None
    assert first.running
    backend.load(pb.LoadRequest(model_name="t", model_path=str(tiny_gguf), threads=1))
    second = backend.engine
    assert second is not None
    assert not first.running, "the first model's engine (and its cache) is gone"
    assert second.running
    broken = pb.LoadRequest(
        model_name="t", model_path=str(tiny_gguf), threads=1, chat_template="{% if %}"
    )
    with pytest.raises(BackendError, match="chat_template in the model YAML does not parse"):
        backend.load(broken)
    assert not second.running
    assert backend.engine is None
    backend.unload()


def test_unloading_under_a_stream_and_a_tokenization_ends_them_cleanly(tiny_gguf: Path) -> None:
    from backends.runtime import BackendError
    from protos.hearth.backend.v1 import backend_pb2 as pb

    # Room for thousands of tokens: still generating when the unload comes.
    backend = load_tiny(tiny_gguf, context_size=16384, parallel=1)
    request = pb.GenerateRequest(prompt="hello there")
    request.sampling.temperature = 0
    outcomes: dict[str, object] = {}

    def slow_reader() -> None:
        pieces = 0
        try:
            for _ in backend.generate_stream(request, threading.Event()):
                pieces += 1
                if pieces < 4:
                    time.sleep(0.1)  # the engine runs ahead: tokens wait in the queue
            outcomes["stream"] = "finished"
        except BackendError as exc:
            outcomes["stream"] = exc.reason
        outcomes["pieces"] = pieces

    def tokenizer() -> None:
        try:
            backend.tokenize(pb.TokenizeRequest(text="word " * 400_000))
            outcomes["tokenize"] = "done"
        except BackendError as exc:
            outcomes["tokenize"] = exc.reason

    threads = [threading.Thread(target=slow_reader), threading.Thread(target=tokenizer)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    backend.unload()
    for thread in threads:
        thread.join(30)
    # The stream was told the model went (not a crash, not an AttributeError), after the
    # pieces already made; the tokenization finished before the model was freed.
    assert outcomes["stream"] == "model_not_loaded"
    assert isinstance(outcomes["pieces"], int)
    assert outcomes["pieces"] > 0
    assert outcomes["tokenize"] in ("done", "model_not_loaded")


def test_without_room_for_four_caches_a_model_computes_one_at_a_time(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    from gateway.config import load_model_file
    from gateway.manager.footprint import estimate

    shutil.copy(tiny_gguf, tmp_path / "tiny.gguf")
    # A long context and a small batch: the cache is most of what the model takes.
    body = "backend: llama\nmodel: tiny.gguf\ncontext_size: 65536\nbatch_size: 8"
    write_model(tmp_path, "roomy", body)
    one = write_model(tmp_path, "one", f"{body}\nparallel: 1")
    default = estimate(load_model_file(tmp_path / "roomy.yaml", tmp_path), tmp_path).bytes
    single = estimate(load_model_file(one, tmp_path), tmp_path).bytes
    one.unlink()
    assert single < default
    gateway = Gateway(tmp_path, env={"HEARTH_MEMORY": str((single + default) // 2)}).start()
    try:
        reply = httpx.post(
            f"{gateway.url}/v1/completions",
            json={"model": "roomy", "prompt": "hello", "max_tokens": 4},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        log = gateway.log()
        assert "would not fit the memory budget; computing one at a time" in log
        assert "1 request(s) at once" in log
    finally:
        gateway.cleanup()


def test_n_sampled_choices_differ_and_are_computed_together(batching: Gateway) -> None:
    body = {
        "model": TINY,
        "prompt": "item 7: word word",
        "max_tokens": 16,
        "temperature": 1.0,
        "seed": 5,
        "n": 2,
    }
    with httpx.Client(base_url=batching.url, timeout=60) as http:
        first = http.post("/v1/completions", json=body).json()
        again = http.post("/v1/completions", json=body).json()
    texts = [c["text"] for c in first["choices"]]
    assert len(set(texts)) == 2, "each choice samples with its own seed"
    assert [c["text"] for c in again["choices"]] == texts, "and the same seed repeats them"
    assert first["usage"]["completion_tokens"] == 32
