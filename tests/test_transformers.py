"""The Transformers backend through the gateway: a tiny random Llama, and all-MiniLM-L6-v2."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from gateway.settings import Settings
from tests.conftest import Gateway, wait_until, write_model

MESSAGES = [{"role": "user", "content": "hello there"}]


def chat(client: openai.OpenAI, **kwargs: object) -> openai.types.chat.ChatCompletion:
    options = {"model": "tiny-hf", "messages": MESSAGES, "temperature": 0.0, **kwargs}
    return client.chat.completions.create(**options)  # type: ignore[call-overload,no-any-return]


def test_chat_runs_to_max_tokens_with_usage(client: openai.OpenAI, http: httpx.Client) -> None:
    answer = chat(client, max_tokens=10)
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 10
    prompt = "<|user|>\nhello there</s>\n<|assistant|>\n"  # the tiny model's chat template
    tokens = http.post("/v1/tokenize", json={"model": "tiny-hf", "content": prompt}).json()
    assert answer.usage.prompt_tokens == len(tokens["tokens"])


def test_stream_matches_the_whole_answer(client: openai.OpenAI) -> None:
    whole = chat(client, max_tokens=12).choices[0].message.content
    chunks = list(chat(client, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == whole
    assert len(pieces) > 1, "streamed token by token, not all at once"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_completion_and_stop(client: openai.OpenAI) -> None:
    lenient = openai.OpenAI(base_url=str(client.base_url), api_key="x", max_retries=0)
    full = lenient.completions.create(
        model="tiny-hf", prompt="the water", max_tokens=16, temperature=0
    )
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length"
    words = text.split()
    stop = words[len(words) // 2]
    cut = lenient.completions.create(
        model="tiny-hf", prompt="the water", max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_same_seed_same_text(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str | None:
        return chat(client, max_tokens=12, temperature=1.0, seed=seed).choices[0].message.content

    assert sample(11) == sample(11)
    assert len({sample(s) for s in range(3)}) > 1


def leave_early(gateway: Gateway, body: dict[str, object]) -> None:
    """Stream a chat completion and hang up after a few lines."""
    with (
        httpx.Client(base_url=gateway.url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        for index, _ in enumerate(response.iter_lines()):
            if index > 8:
                break


def test_a_cancelled_stream_stops_generate(gateway: Gateway) -> None:
    body = {
        "model": "tiny-hf",
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": 3000,
        "stream": True,
    }
    started = time.monotonic()
    leave_early(gateway, body)
    assert wait_until(lambda: "generation cancelled after" in gateway.log(), timeout=10)
    line = next(ln for ln in gateway.log().splitlines() if "generation cancelled after" in ln)
    produced = int(line.split("generation cancelled after ")[1].split()[0])
    assert produced < 3000 // 2, line
    assert time.monotonic() - started < 30


# Concurrent generations: static batching ------------------------------------------------------

# Prompts of different lengths, chat and completion, each with its own max_tokens.
REQUESTS: list[dict[str, object]] = [
    {"messages": MESSAGES, "max_tokens": 8},
    {"prompt": "the water is hot and the people who", "max_tokens": 20},
    {"messages": [{"role": "user", "content": "what time is it"}], "max_tokens": 12},
    {"prompt": "one two three four five six seven eight nine ten number sound", "max_tokens": 30},
]

Answer = tuple[str | None, str, int, int]


@pytest.fixture(scope="module")
def batched(gateway: Gateway) -> str:
    """tiny-hf again, waiting up to a second for a batch of 4 to fill, so that requests sent
    at once meet in one batch however slow the machine."""
    body = "backend: transformers\nmodel: tiny-hf\nthreads: 1\nparallel: 4\n"
    write_model(gateway.models_dir, "tiny-hf-batch", body + "options: {batch_window_ms: 1000}")
    answer(gateway, "tiny-hf-batch", REQUESTS[0])  # started and loaded
    return "tiny-hf-batch"


def answer(gateway: Gateway, model: str, request: dict[str, object]) -> Answer:
    """The text, finish_reason and usage of a request (greedy unless it says otherwise)."""
    client = gateway.client(_strict_response_validation=False)  # see test_gateway_echo
    options: dict = {"model": model, "temperature": 0, **request}
    if "messages" in options:
        chat = client.chat.completions.create(**options)
        text, finish, usage = (
            chat.choices[0].message.content,
            chat.choices[0].finish_reason,
            chat.usage,
        )
    else:
        completion = client.completions.create(**options)
        choice = completion.choices[0]
        text, finish, usage = choice.text, choice.finish_reason, completion.usage
    assert usage is not None
    return text, finish, usage.prompt_tokens, usage.completion_tokens


def at_once(gateway: Gateway, model: str, requests: list[dict[str, object]]) -> list[Answer]:
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: answer(gateway, model, r), requests))


def with_stop(gateway: Gateway, request: dict[str, object]) -> dict[str, object]:
    """`request` with a stop sequence from the middle of its answer."""
    text = answer(gateway, "tiny-hf", request)[0] or ""
    words = text.split()
    return {**request, "stop": [words[len(words) // 2]]}


def test_concurrent_requests_share_a_batch_and_each_get_their_own_answer(
    gateway: Gateway, batched: str
) -> None:
    requests = [*REQUESTS]
    requests[1] = with_stop(gateway, requests[1])
    alone = [answer(gateway, "tiny-hf", r) for r in requests]
    stopped = alone[1]
    assert stopped[1] == "stop"
    assert stopped[3] < 20, "the stop sequence ended it early"
    assert [a[1] for a in alone] == ["length", "stop", "length", "length"]
    start = len(gateway.log())
    assert at_once(gateway, batched, requests) == alone
    log = gateway.log()[start:]
    # Left padding of the shorter prompts changed nothing; they all computed in one batch.
    assert "generating 4 prompts together" in log, log


def test_cancelling_one_of_concurrent_streams_leaves_the_others_unchanged(
    gateway: Gateway, batched: str
) -> None:
    others = REQUESTS[:3]
    alone = [answer(gateway, "tiny-hf", r) for r in others]
    body = {
        "model": batched,
        "messages": [{"role": "user", "content": "tell me everything"}],
        "temperature": 0,
        "max_tokens": 3000,
        "stream": True,
    }

    start = len(gateway.log())
    with ThreadPoolExecutor(4) as pool:
        leaving = pool.submit(leave_early, gateway, body)
        results = list(pool.map(lambda r: answer(gateway, batched, r), others))
        leaving.result()
    assert results == alone
    assert wait_until(lambda: "batch of 4 done after" in gateway.log()[start:], timeout=30)
    log = gateway.log()[start:]
    assert "generation cancelled after" in log
    # The batch stopped once its last caller had left, not at the 3000 tokens asked for.
    steps = int(log.split("batch of 4 done after ")[1].split()[0])
    assert steps < 1500, log


def test_a_seeded_request_samples_the_same_beside_others(gateway: Gateway, batched: str) -> None:
    seeded = {"messages": MESSAGES, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    alone = answer(gateway, "tiny-hf", seeded)
    results = at_once(gateway, batched, [seeded, seeded, *REQUESTS[:2]])
    assert results[0] == results[1] == alone
    assert results[2:] == [answer(gateway, "tiny-hf", r) for r in REQUESTS[:2]]


def embed(
    client: openai.OpenAI, texts: list[str], model: str = "all-minilm-l6-v2"
) -> list[list[float]]:
    result = client.embeddings.create(model=model, input=texts, encoding_format="float")
    assert [d.index for d in result.data] == list(range(len(texts)))
    return [d.embedding for d in result.data]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_minilm_vectors(client: openai.OpenAI) -> None:
    cat, kitten, revenue = embed(
        client,
        ["The cat sits on the mat.", "A kitten is resting on a rug.", "Quarterly revenue rose 4%."],
    )
    assert len(cat) == 384
    for vector in (cat, kitten, revenue):
        assert math.sqrt(sum(v * v for v in vector)) == pytest.approx(1.0, abs=1e-5)
    assert cosine(cat, kitten) > 0.5
    assert cosine(cat, kitten) > cosine(cat, revenue) + 0.3


def test_minilm_batch_equals_one_by_one(client: openai.OpenAI) -> None:
    texts = ["short", "a somewhat longer sentence about the weather today", "mid length text"]
    batch = embed(client, texts)
    for text, vector in zip(texts, batch, strict=True):
        assert embed(client, [text])[0] == pytest.approx(vector, abs=1e-5)


def test_minilm_base64_equals_float(gateway: Gateway, client: openai.OpenAI) -> None:
    texts = ["hello", "world"]
    lenient = gateway.client(_strict_response_validation=False)  # see test_gateway_echo
    decoded = lenient.embeddings.create(model="all-minilm-l6-v2", input=texts)
    for a, b in zip(decoded.data, embed(client, texts), strict=True):
        assert a.embedding == pytest.approx(b, abs=1e-7)


def test_minilm_usage_counts_real_tokens(client: openai.OpenAI) -> None:
    result = client.embeddings.create(
        model="all-minilm-l6-v2", input=["hello", "hello world again"], encoding_format="float"
    )
    # [CLS] hello [SEP] and [CLS] hello world again [SEP]: padding is not counted.
    assert result.usage.prompt_tokens == 3 + 5


def test_long_inputs_are_truncated_or_refused(
    gateway: Gateway, client: openai.OpenAI, http: httpx.Client
) -> None:
    long_text = "word " * 600
    assert len(embed(client, [long_text])[0]) == 384
    assert "truncating 1 input(s) to 256 tokens" in gateway.log()
    strict = http.post("/v1/embeddings", json={"model": "all-minilm-strict", "input": [long_text]})
    assert strict.status_code == 400
    assert strict.json()["error"]["code"] == "input_too_long"


def test_an_input_past_the_servers_token_bound_is_refused_not_truncated(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    most = Settings().max_embedding_input_tokens
    body = {"model": "all-minilm-l6-v2", "input": ["short", "word " * (most + 10)]}
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("input_too_long", "input")
    assert f"at most {most}" in error["message"]
    assert len(embed(client, ["still serving"])[0]) == 384


@pytest.mark.parametrize(
    ("request_body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": ["fine", ""]}, "input"),
        ({"input": [101, 7592, 102]}, "input"),
        ({"input": [[101, 7592, 102]]}, "input"),
    ],
)
def test_bad_embedding_input_is_400_and_the_backend_lives_on(
    client: openai.OpenAI, http: httpx.Client, request_body: dict, param: str
) -> None:
    response = http.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", **request_body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert len(embed(client, ["still serving"])[0]) == 384


def test_chat_to_an_embedding_model_is_400(http: httpx.Client, client: openai.OpenAI) -> None:
    response = http.post(
        "/v1/chat/completions", json={"model": "all-minilm-l6-v2", "messages": MESSAGES}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_supported"
    assert len(embed(client, ["still serving"])[0]) == 384


def test_pickle_weights_are_refused(gateway: Gateway, http: httpx.Client, tmp_path: Path) -> None:
    directory = gateway.models_dir / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "bert"}')
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    write_model(
        gateway.models_dir, "pickled", "backend: transformers\nmodel: pickled\nembeddings: true"
    )
    response = http.post("/v1/embeddings", json={"model": "pickled", "input": "x"})
    assert response.status_code == 500
    assert "does not load pickle weights" in response.json()["error"]["message"]


def test_streamed_pieces_add_up_to_the_whole_decode(tiny_hf: Path, real_models: Path) -> None:
    """What a stream sends, joined, is exactly what the tokenizer makes of all the ids at once,
    spaces and characters split across tokens included (byte-level BPE and WordPiece)."""
    import random

    from transformers import AutoTokenizer

    from backends.transformers.backend import _IncrementalText

    for directory in (tiny_hf, real_models / "all-minilm-l6-v2"):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        rng = random.Random(0)
        for _ in range(100):
            ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
            decoder = _IncrementalText(tokenizer)
            streamed = "".join(decoder.push(token) for token in ids) + decoder.flush()
            assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_model_computing_beside_another_takes_its_share_of_the_cores(
    tiny_hf: Path, tmp_path: Path
) -> None:
    import concurrent.futures

    from tests.conftest import link_tree

    link_tree(tiny_hf, tmp_path / "tiny-hf")
    write_model(tmp_path, "tiny-hf", "backend: transformers\nmodel: tiny-hf\nthreads: 2")
    write_model(tmp_path, "busy", "backend: echo\noptions: {latency_ms: 100}")
    gateway = Gateway(tmp_path, env={"HEARTH_CPUS": "2", "HEARTH_LOG_LEVEL": "debug"}).start()
    try:
        with httpx.Client(base_url=gateway.url, timeout=60) as http:
            # Alone, torch computes with both cores.
            body = {"model": "tiny-hf", "messages": MESSAGES, "max_tokens": 8}
            assert http.post("/v1/chat/completions", json=body).status_code == 200
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                words = " ".join(["w"] * 40)
                busy = pool.submit(
                    http.post, "/v1/completions", json={"model": "busy", "prompt": words}
                )
                assert wait_until(lambda: "starting echo backend for busy" in gateway.log())
                time.sleep(1.0)  # loaded and streaming
                assert http.post("/v1/chat/completions", json=body).status_code == 200
                assert busy.result().status_code == 200
        log = gateway.log()
        # Beside the busy model, torch was told one thread, on the thread that generates.
        assert "hearth.backend.tiny-hf: DEBUG hearth.backend: computing with 1 thread" in log
    finally:
        gateway.cleanup()
