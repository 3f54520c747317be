"""Every bound on what one request may make the server do: a clear 4xx just past it, fine just
under it, and nothing kept in memory by the refused ones. One gateway with small limits, echo."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, write_model

MIB = 1024 * 1024
LIMITS = {
    "HEARTH_MAX_BODY_BYTES": "4MiB",
    "HEARTH_MAX_JSON_DEPTH": "8",
    "HEARTH_MAX_STOP_SEQUENCES": "4",
    "HEARTH_MAX_STOP_LENGTH": "10",
    "HEARTH_MAX_EMBEDDING_INPUTS": "5",
    "HEARTH_MAX_EMBEDDING_INPUT_TOKENS": "8",
    "HEARTH_MAX_IMAGES": "2",
    "HEARTH_MAX_IMAGE_SIDE": "512",
    "HEARTH_MAX_IMAGE_STEPS": "10",
    "HEARTH_MAX_IMAGE_WORK": "4",
    "HEARTH_MAX_TOKENIZE_CHARS": "100",
}
MESSAGES = [{"role": "user", "content": "hello there"}]
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    models = tmp_path_factory.mktemp("limited")
    write_model(models, "echo", "backend: echo")
    write_model(models, "echo-steps", "backend: echo\noptions: {steps: 5}")
    gateway = Gateway(models, env=LIMITS).start()
    yield gateway
    gateway.cleanup()


@pytest.fixture
def http(limited: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited.url, timeout=30) as session:
        yield session


def refused(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    """The error of a refused request, checked to be OpenAI's shape."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return error


def chat(http: httpx.Client, **fields: object) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": "echo", "messages": MESSAGES, **fields})


def raw_chat(http: httpx.Client, body: bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return http.post("/v1/chat/completions", content=body, headers=headers)


def nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"x": value}
    return value


def with_tool_schema(depth: int) -> dict[str, Any]:
    """A chat whose body nests `depth` deep: body, tools, tool, function, then parameters."""
    function = {"name": "f", "parameters": nested(depth - 5)}
    return {"tools": [{"type": "function", "function": function}]}


def test_a_body_past_max_body_bytes_is_413_naming_the_setting(http: httpx.Client) -> None:
    envelope = json.dumps({"model": "echo", "messages": MESSAGES, "padding": ""}).encode()
    under = envelope.replace(b'""', b'"' + b"x" * (4 * MIB - len(envelope)) + b'"')
    assert len(under) == 4 * MIB
    assert raw_chat(http, under).status_code == 200
    error = refused(raw_chat(http, under.replace(b'"x', b'"xx')), 413)
    assert error["code"] == "request_too_large"
    assert "HEARTH_MAX_BODY_BYTES" in error["message"]


def test_nesting_past_max_json_depth_is_400(http: httpx.Client) -> None:
    assert chat(http, **with_tool_schema(8)).status_code == 200
    error = refused(chat(http, **with_tool_schema(9)))
    assert error["code"] == "nested_too_deeply"
    assert "HEARTH_MAX_JSON_DEPTH" in error["message"]


@pytest.mark.parametrize("depth", [10_000, 100_000, 1_000_000])
@pytest.mark.parametrize("where", ["tools", "ignored", "unclosed"])
def test_very_deep_json_is_400_at_once(http: httpx.Client, depth: int, where: str) -> None:
    opened, closed = b"[" * depth, b"]" * depth
    body = {
        "tools": b'{"model": "echo", "messages": [], "tools": [{"type": "function", "function": '
        b'{"name": "f", "parameters": {"a": ' + opened + closed + b"}}}]}",
        "ignored": b'{"model": "echo", "messages": [], "extra": ' + opened + closed + b"}",
        "unclosed": b'{"model": "echo", "messages": [], "extra": ' + opened,
    }[where]
    error = refused(raw_chat(http, body))
    assert error["code"] == "nested_too_deeply"


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_stop_sequences_are_bounded_in_number_and_length(http: httpx.Client, route: str) -> None:
    def ask(stop: object) -> httpx.Response:
        body = {"model": "echo", "messages": MESSAGES, "prompt": "one two three", "stop": stop}
        return http.post(route, json=body)

    assert ask(["a1", "b2", "c3", "d4"]).status_code == 200
    error = refused(ask(["a1", "b2", "c3", "d4", "e5"]))
    assert (error["param"], error["code"]) == ("stop", "array_above_max_length")
    assert "HEARTH_MAX_STOP_SEQUENCES" in error["message"]
    assert ask("x" * 10).status_code == 200
    error = refused(ask(["ok", "x" * 11]))
    assert (error["param"], error["code"]) == ("stop", "string_above_max_length")
    # Empty ones are ignored, and not counted.
    ignored = ask(["", "", "", "", "", " three"])
    assert ignored.status_code == 200
    if route == "/v1/completions":
        assert ignored.json()["choices"][0]["text"] == "one two"


def test_embedding_inputs_are_bounded_in_number_and_length(http: httpx.Client) -> None:
    def embed(given: object, **fields: object) -> httpx.Response:
        return http.post("/v1/embeddings", json={"model": "echo", "input": given, **fields})

    assert embed(["a"] * 5).status_code == 200
    error = refused(embed(["a"] * 6))
    assert (error["param"], error["code"]) == ("input", "array_above_max_length")
    assert "HEARTH_MAX_EMBEDDING_INPUTS" in error["message"]
    # Token arrays: one input is one array, however long; at most 8 tokens each.
    assert embed(list(range(8))).status_code == 200
    assert embed([list(range(8))] * 5).status_code == 200
    for too_long in (list(range(9)), [[1], list(range(9))]):
        error = refused(embed(too_long))
        assert (error["param"], error["code"]) == ("input", "input_too_long")
    # A string: the gateway bounds its characters (8 tokens x 16) before anything tokenizes it...
    assert embed("x" * 128).status_code == 200
    error = refused(embed("x" * 129))
    assert (error["param"], error["code"]) == ("input", "input_too_long")
    assert "HEARTH_MAX_EMBEDDING_INPUT_TOKENS" in error["message"]
    # ...and the backend its tokens (echo's are words), against the bound the request carries.
    assert embed(["fine", "one two three four five six seven eight"]).status_code == 200
    error = refused(embed(["fine", "one two three four five six seven eight nine"]))
    assert (error["param"], error["code"]) == ("input", "input_too_long")
    assert "input[1]" in error["message"]
    # Dimensions: at most the model's own (16 for echo), and never past what protobuf holds.
    assert len(embed("a", dimensions=16, encoding_format="float").json()["data"][0]["embedding"])
    assert refused(embed("a", dimensions=17))["param"] == "dimensions"
    assert refused(embed("a", dimensions=2**32))["code"] == "integer_above_max_value"


def images(http: httpx.Client, model: object = "echo", **fields: object) -> httpx.Response:
    return http.post("/v1/images/generations", json={"model": model, "prompt": "a fox", **fields})


def past_the_bounds(response: httpx.Response) -> None:
    """Echo makes no images: a request within the bounds reaches it, and hears that."""
    assert refused(response)["code"] == "model_not_supported"


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"n": 3}, "n", "integer_above_max_value"),
        ({"n": 10**30}, "n", "integer_above_max_value"),
        ({"n": 0}, "n", "integer_below_min_value"),
        ({"size": "520x512", "steps": 1}, "size", "size_too_large"),
        ({"size": "99992x8"}, "size", "size_too_large"),
        ({"size": "64x64", "steps": 11}, "steps", "integer_above_max_value"),
        (
            {"size": "64x64", "num_inference_steps": 11},
            "num_inference_steps",
            "integer_above_max_value",
        ),
        ({"size": "64x64", "steps": 2**32}, "steps", "integer_above_max_value"),
        ({"size": "512x512", "steps": 10, "n": 2}, "n", "image_work_too_large"),
        ({"size": "auto", "steps": 5}, "size", "image_work_too_large"),
        ({"size": "64x64", "seed": INT64_MAX, "n": 2}, "seed", "integer_above_max_value"),
        ({"seed": 2**63}, "seed", "integer_above_max_value"),
    ],
)
def test_image_requests_past_a_bound_are_400(
    http: httpx.Client, fields: dict[str, object], param: str, code: str
) -> None:
    error = refused(images(http, **fields))
    assert (error["param"], error["code"]) == (param, code)


def test_image_requests_within_the_bounds_pass_them(http: httpx.Client) -> None:
    # Work is n x width x height x steps in megapixel-steps (2^20 pixels): at most 4 here.
    past_the_bounds(images(http, n=2, size="512x256", steps=10))  # 2.5
    past_the_bounds(images(http, n=1, size="512x512", steps=10))  # 2.5
    past_the_bounds(images(http, size="auto", steps=4))  # auto counts as 1024x1024: 4
    past_the_bounds(images(http, size="64x64", seed=INT64_MAX))
    # No steps in the request: the model YAML's (5 here) are what the estimate takes.
    assert refused(images(http, "echo-steps", size="auto"))["code"] == "image_work_too_large"
    past_the_bounds(images(http, "echo-steps", size="512x512"))  # 1.25


def test_tokenize_and_detokenize_are_bounded(http: httpx.Client) -> None:
    def tokenize(content: str) -> httpx.Response:
        return http.post("/v1/tokenize", json={"model": "echo", "content": content})

    def detokenize(tokens: list[int]) -> httpx.Response:
        return http.post("/v1/detokenize", json={"model": "echo", "tokens": tokens})

    words = tokenize("ab " * 33 + "a")
    assert words.status_code == 200
    error = refused(tokenize("x" * 101))
    assert (error["param"], error["code"]) == ("content", "string_above_max_length")
    assert "HEARTH_MAX_TOKENIZE_CHARS" in error["message"]
    known = words.json()["tokens"][0]
    assert detokenize([known] * 100).status_code == 200
    error = refused(detokenize([known] * 101))
    assert (error["param"], error["code"]) == ("tokens", "array_above_max_length")
    assert refused(detokenize([2**31]))["code"] == "integer_above_max_value"
    assert refused(detokenize([-1]))["code"] == "integer_below_min_value"
    assert refused(detokenize([2**64]))["param"] == "tokens[0]"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"max_tokens": INT32_MAX + 1}, "max_tokens"),
        ({"max_completion_tokens": 2**32}, "max_completion_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"n": 10**30}, "n"),
        ({"top_k": INT32_MAX + 1}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"repeat_penalty": 1e300}, "repeat_penalty"),
        ({"temperature": 1e300}, "temperature"),
        ({"keep_alive": 10**400}, "keep_alive"),
        ({"keep_alive": "9" * 100}, "keep_alive"),
    ],
)
def test_numbers_out_of_range_are_400_not_500(
    http: httpx.Client, fields: dict[str, object], param: str
) -> None:
    assert refused(chat(http, **fields))["param"] == param


def test_numbers_at_the_edge_of_their_range_are_served(http: httpx.Client) -> None:
    edges = {"max_tokens": INT32_MAX, "seed": INT64_MAX, "top_k": INT32_MAX, "keep_alive": -1}
    assert chat(http, **edges).status_code == 200
    assert chat(http, seed=-(2**63), repeat_penalty=10).status_code == 200
    body = b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], "seed": 1e999}'
    assert refused(raw_chat(http, body))["param"] == "seed"


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_refused_requests_leave_nothing_behind(limited: Gateway, http: httpx.Client) -> None:
    deep = b'{"model": "echo", "messages": [], "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    padded = json.dumps({"model": "echo", "messages": MESSAGES, "pad": "x" * (4 * MIB)}).encode()
    stops = {"model": "echo", "messages": MESSAGES, "stop": ["s"] * 100_000}
    inputs = {"model": "echo", "input": ["a"] * 5_000}

    def refuse_all() -> None:
        assert raw_chat(http, padded).status_code == 413
        assert raw_chat(http, deep).status_code == 400
        assert http.post("/v1/chat/completions", json=stops).status_code == 400
        assert http.post("/v1/embeddings", json=inputs).status_code == 400

    assert limited.process is not None
    for _ in range(5):  # the allocator's pools and the first-use caches
        refuse_all()
    before = resident_bytes(limited.process.pid)
    for _ in range(50):
        refuse_all()
    grown = resident_bytes(limited.process.pid) - before
    assert grown < 4 * MIB, f"the gateway grew by {grown / MIB:.1f} MiB"
