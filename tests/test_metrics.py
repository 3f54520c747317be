"""GET /metrics and request ids: what a Prometheus scrape shows after real requests, and the
`x-request-id` that ties an answer to the gateway's log lines."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway, wait_until, write_model

ALPHA_KEY = "alpha-inference-key-0123"  # api-1
BETA_KEY = "beta-inference-key-45678"  # api-2
ADMIN_KEY = "admin-key-abcdefghijklmn"  # admin-1
METRICS_KEY = "metrics-key-opqrstuvwxyz"  # metrics-1
WORDS = "one two three four five six"
GENERATED_ID = re.compile(r"req_[0-9a-f]{24}")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory: Path = tmp_path_factory.mktemp("metrics-models")
    write_model(directory, "echo", "backend: echo")
    # 20 ms before each word: the gaps between a stream's pieces are measurable.
    write_model(directory, "echo-slow", "backend: echo\noptions: {latency_ms: 20}")
    write_model(directory, "echo-victim", "backend: echo")
    write_model(directory, "echo-traced", "backend: echo")
    write_model(directory, "echo-ids", "backend: echo")
    env = {
        "HEARTH_API_KEYS": f"{ALPHA_KEY},{BETA_KEY}",
        "HEARTH_ADMIN_KEYS": ADMIN_KEY,
        "HEARTH_METRICS_KEYS": METRICS_KEY,
    }
    running = Gateway(directory, env=env).start()
    yield running
    running.cleanup()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def scrape(gateway: Gateway, key: str = METRICS_KEY) -> Samples:
    response = httpx.get(f"{gateway.url}/metrics", headers=_auth(key), timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_a_scrape_shows_requests_timings_and_usage_per_model_and_key(gateway: Gateway) -> None:
    alpha = gateway.client(api_key=ALPHA_KEY)
    beta = gateway.client(api_key=BETA_KEY)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": WORDS}]
    alpha_prompt = alpha_completion = 0
    for _ in range(2):
        chat = alpha.chat.completions.create(model="echo", messages=messages)
        assert chat.usage is not None
        alpha_prompt += chat.usage.prompt_tokens
        alpha_completion += chat.usage.completion_tokens
    completion = alpha.completions.create(model="echo", prompt="a b c")
    assert completion.usage is not None
    alpha_prompt += completion.usage.prompt_tokens
    alpha_completion += completion.usage.completion_tokens
    embedded = beta.embeddings.create(model="echo", input=["a b", "c d e"], encoding_format="float")
    stream = beta.chat.completions.create(
        model="echo-slow",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed = list(stream)
    stream_usage = streamed[-1].usage
    assert stream_usage is not None
    with pytest.raises(openai.NotFoundError):
        alpha.chat.completions.create(model="no-such-model", messages=messages)
    bad = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "echo", "messages": "not a list"},
        headers=_auth(ALPHA_KEY),
    )
    assert bad.status_code == 400

    samples = scrape(gateway)
    requests = "hearth_requests_total"
    chat_route = "/v1/chat/completions"
    assert value(samples, requests, route=chat_route, model="echo", status="200") == 2
    assert value(samples, requests, route=chat_route, model="echo-slow", status="200") == 1
    assert value(samples, requests, route="/v1/completions", model="echo", status="200") == 1
    assert value(samples, requests, route="/v1/embeddings", model="echo", status="200") == 1
    # Neither named a model the catalog has: counted, but under no model.
    assert value(samples, requests, route=chat_route, model="", status="404") == 1
    assert value(samples, requests, route=chat_route, model="", status="400") == 1
    scraped = httpx.get(f"{gateway.url}/metrics", headers=_auth(METRICS_KEY)).text
    assert "no-such-model" not in scraped, "a made-up model name must not become a label"

    # Tokens: what the API reported to each key, by key and model.
    prompt, generated = "hearth_prompt_tokens_total", "hearth_completion_tokens_total"
    assert value(samples, prompt, model="echo", key="api-1") == alpha_prompt
    assert value(samples, generated, model="echo", key="api-1") == alpha_completion
    assert value(samples, prompt, model="echo", key="api-2") == embedded.usage.prompt_tokens
    assert value(samples, prompt, model="echo-slow", key="api-2") == stream_usage.prompt_tokens
    words = stream_usage.completion_tokens
    assert words == len(WORDS.split())
    assert value(samples, generated, model="echo-slow", key="api-2") == words

    # The stream's first token, and the gaps between its words (20 ms each at least).
    first = "hearth_time_to_first_token_seconds"
    assert value(samples, f"{first}_count", model="echo-slow") == 1
    assert value(samples, f"{first}_sum", model="echo-slow") >= 0.02
    gaps = "hearth_inter_token_latency_seconds"
    assert value(samples, f"{gaps}_count", model="echo-slow") == words - 1
    assert value(samples, f"{gaps}_sum", model="echo-slow") >= 0.01 * (words - 1)
    assert value(samples, f"{first}_count", model="echo") == 0, "only streams are timed"

    # Each request took a slot; each model loaded once.
    assert value(samples, "hearth_queue_seconds_count", model="echo") == 4
    assert value(samples, "hearth_queue_seconds_count", model="echo-slow") == 1
    for model in ("echo", "echo-slow"):
        assert value(samples, "hearth_backend_load_seconds_count", model=model) == 1
        assert value(samples, "hearth_backend_load_seconds_sum", model=model) > 0
        assert value(samples, "hearth_backend_resident_memory_bytes", model=model) > 1e6
        assert value(samples, "hearth_backend_requests_in_flight", model=model) == 0
    assert value(samples, "hearth_process_resident_memory_bytes") > 1e6


def test_metrics_need_a_metrics_or_admin_key(gateway: Gateway) -> None:
    url = f"{gateway.url}/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=_auth(ALPHA_KEY)).status_code == 403
    assert scrape(gateway, METRICS_KEY)
    assert scrape(gateway, ADMIN_KEY)
    # A metrics key reads metrics, nothing else.
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    refused = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat, headers=_auth(METRICS_KEY)
    )
    assert refused.status_code == 403


def test_a_killed_backend_is_counted_and_started_again(gateway: Gateway) -> None:
    client = gateway.client(api_key=ALPHA_KEY)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
    client.chat.completions.create(model="echo-victim", messages=messages)
    backends = httpx.get(f"{gateway.url}/backends", headers=_auth(ADMIN_KEY)).json()["data"]
    pid = next(row["pid"] for row in backends if row["model"] == "echo-victim")
    os.kill(pid, signal.SIGKILL)

    exits = "hearth_backend_unexpected_exits_total"
    assert wait_until(lambda: value(scrape(gateway), exits, model="echo-victim") == 1)
    client.chat.completions.create(model="echo-victim", messages=messages)
    samples = scrape(gateway)
    assert value(samples, "hearth_backend_load_seconds_count", model="echo-victim") == 2
    assert value(samples, exits, model="echo-victim") == 1
    assert value(samples, exits, model="echo") == 0


def test_every_answer_carries_a_request_id(gateway: Gateway) -> None:
    headers = _auth(ALPHA_KEY)
    chat = {"model": "echo-ids", "messages": [{"role": "user", "content": WORDS}]}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=30) as http:
        plain = http.post("/v1/chat/completions", json=chat)
        again = http.post("/v1/chat/completions", json=chat)
        with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            streamed_id = stream.headers["x-request-id"]
            assert stream.read().endswith(b"data: [DONE]\r\n\r\n")
        error = http.post("/v1/completions", json={"model": "no-such-model", "prompt": "hi"})
        unrouted = http.get("/no/such/path")
        given = http.post("/v1/chat/completions", json=chat, headers={"x-request-id": "abc.1-2_3"})
        unsafe = http.post("/v1/chat/completions", json=chat, headers={"x-request-id": "a b"})
        too_long = http.post("/v1/chat/completions", json=chat, headers={"x-request-id": "a" * 65})
    assert (plain.status_code, error.status_code, unrouted.status_code) == (200, 404, 404)
    ids = [
        plain.headers["x-request-id"],
        again.headers["x-request-id"],
        streamed_id,
        error.headers["x-request-id"],
        unrouted.headers["x-request-id"],
    ]
    assert all(GENERATED_ID.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids), "each request has its own id"
    assert given.headers["x-request-id"] == "abc.1-2_3", "a client's plain id is kept"
    # Ids go into log lines: one that is not plain and short is replaced.
    assert GENERATED_ID.fullmatch(unsafe.headers["x-request-id"])
    assert GENERATED_ID.fullmatch(too_long.headers["x-request-id"])


def test_log_lines_carry_the_request_id(gateway: Gateway) -> None:
    chat = {"model": "echo-traced", "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat, headers=_auth(ALPHA_KEY), timeout=30
    )
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    # The request started the model: the gateway's lines about that start are its lines.
    lines = [line for line in gateway.log().splitlines() if "echo-traced" in line]
    started = next(line for line in lines if "starting echo backend for echo-traced" in line)
    assert f"[{request_id}]" in started
    ready = next(line for line in lines if "echo-traced ready" in line)
    assert f"[{request_id}]" in ready
    # The backend's own output outlives the request: it is nobody's.
    backend = [line for line in lines if "hearth.backend.echo-traced" in line]
    assert backend
    assert not any(request_id in line for line in backend)
