"""The whole path on the echo backend: openai SDK → gateway → gRPC → backend process."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import struct

import httpx
import openai
import pytest

from tests.conftest import Gateway, backend_pids, wait_until


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert {"echo", "tiny-llama", "reverse"} <= set(ids)
    assert ids == sorted(ids)
    model = client.models.retrieve("echo")
    assert model.id == "echo"
    assert model.object == "model"


def test_retrieve_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["param"] == "model"  # type: ignore[index]


def test_chat(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="echo",
        messages=[
            {"role": "system", "content": "ignored by echo"},
            {"role": "user", "content": "the quick brown fox"},
        ],
    )
    assert answer.choices[0].message.content == "the quick brown fox"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.id.startswith("chatcmpl-")
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 4
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 4


def test_chat_content_parts_are_joined(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="echo",
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}],
            }
        ],
    )
    assert answer.choices[0].message.content == "one two"


def test_refusal_and_logprobs_keys_are_present(http: httpx.Client) -> None:
    body = http.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
    ).json()
    choice = body["choices"][0]
    assert choice["logprobs"] is None
    assert choice["message"]["refusal"] is None


def test_chat_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "one two three four"}],
        stream=True,
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1, "every chunk of one completion shares its id"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) == 4, "echo streams word by word"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_chat_stream_include_usage(client: openai.OpenAI, http: httpx.Client) -> None:
    chunks = list(
        client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "a b c"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "echo",
            "messages": [{"role": "user", "content": "a b c"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"] == []
    assert json.loads(events[-2])["usage"]["total_tokens"] > 0


def test_completions(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="echo", prompt="say this back")
    assert answer.choices[0].text == "say this back"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.object == "text_completion"


def test_completions_stream_with_usage(gateway: Gateway) -> None:
    # The SDK types CompletionChoice.finish_reason as never null, yet OpenAI itself sends null
    # until the last chunk (as we do), so strict validation rejects any real completions
    # stream: this one test reads it without strict validation.
    lenient = gateway.client(_strict_response_validation=False)
    chunks = list(
        lenient.completions.create(
            model="echo",
            prompt="alpha beta gamma",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "alpha beta gamma"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None, None, None, "stop"]


def test_max_tokens_gives_finish_reason_length(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "one two three four"}], max_tokens=2
    )
    assert answer.choices[0].message.content == "one two"
    assert answer.choices[0].finish_reason == "length"


def test_stop_sequence_is_not_returned(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="echo", prompt="one two three four", stop=[" three"])
    assert answer.choices[0].text == "one two"
    assert answer.choices[0].finish_reason == "stop"


def test_yaml_parameters_are_request_defaults(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="echo-defaults", messages=[{"role": "user", "content": "one two three"}]
    )
    assert answer.choices[0].message.content == "one two", "max_tokens: 2 from the YAML"
    answer = client.chat.completions.create(
        model="echo-defaults",
        messages=[{"role": "user", "content": "one two three"}],
        max_tokens=3,
    )
    assert answer.choices[0].message.content == "one two three", "the request wins"
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == 5, "the YAML's system prompt ('be brief') was added"


def test_embeddings_float_and_base64_agree(
    gateway: Gateway, client: openai.OpenAI, http: httpx.Client
) -> None:
    as_float = client.embeddings.create(
        model="echo", input=["hello", "world"], encoding_format="float"
    )
    # The SDK asks for base64 when no format is given, and decodes it; its strict validation
    # checks the still-encoded strings against `list[float]` and so rejects every base64
    # answer (OpenAI's own too), hence a lenient client for this call.
    lenient = gateway.client(_strict_response_validation=False)
    as_default = lenient.embeddings.create(model="echo", input=["hello", "world"])
    assert [d.index for d in as_float.data] == [0, 1]
    for a, b in zip(as_float.data, as_default.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-7)
    assert as_float.data[0].embedding != as_float.data[1].embedding
    raw = http.post(
        "/v1/embeddings",
        json={"model": "echo", "input": "hello", "encoding_format": "base64"},
    ).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    values = struct.unpack(f"<{len(packed) // 4}f", packed)
    assert values == pytest.approx(as_float.data[0].embedding, abs=1e-7)


def test_embeddings_single_string_and_tokens(client: openai.OpenAI) -> None:
    single = client.embeddings.create(model="echo", input="hello", encoding_format="float")
    assert len(single.data) == 1
    assert len(single.data[0].embedding) == 16
    tokens = client.embeddings.create(model="echo", input=[[1, 2, 3], [4]], encoding_format="float")
    assert len(tokens.data) == 2
    assert tokens.usage.prompt_tokens == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "echo", "input": []}, "input"),
        ({"model": "echo", "input": ["ok", ""]}, "input"),
        ({"model": "echo", "input": 5}, "input"),
        ({"input": "x"}, "model"),
    ],
)
def test_bad_embedding_input_is_400(http: httpx.Client, body: dict, param: str) -> None:
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_unknown_model_is_404_naming_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="missing", messages=[{"role": "user", "content": "hi"}]
        )
    error = caught.value.body
    assert error["param"] == "model"  # type: ignore[index]
    assert error["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "echo"}, "messages"),
        ({"model": "echo", "messages": "hello"}, "messages"),
        ({"model": "echo", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "echo", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": "echo", "messages": [], "temperature": 9}, "temperature"),
        ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "n": 17}, "n"),
        ({"model": "echo", "messages": []}, "messages"),
        ({"model": 7, "messages": []}, "model"),
    ],
)
def test_bad_chat_requests_are_400_naming_the_field(
    http: httpx.Client, body: dict, param: str
) -> None:
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'{"model": "echo", "messages": [}'])
def test_invalid_json_is_400(http: httpx.Client, raw: bytes) -> None:
    response = http.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_fields_are_ignored(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions",
        json={
            "model": "echo",
            "messages": [{"role": "user", "content": "hi"}],
            "user": "me",
            "logit_bias": {"50256": -100},
            "parallel_tool_calls": True,
            "something_new_openai_added": {"x": 1},
        },
    )
    assert response.status_code == 200


def test_unknown_route_and_wrong_method(http: httpx.Client) -> None:
    missing = http.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert "error" in missing.json()
    wrong = http.get("/v1/chat/completions")
    assert wrong.status_code == 405
    assert "error" in wrong.json()


def test_backend_error_before_the_stream_is_an_http_error(client: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="echo-fail-before",
                messages=[{"role": "user", "content": "hello"}],
                stream=stream,
            )
        assert caught.value.status_code == 400
        assert caught.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
        assert "prompt too long" in caught.value.body["message"]  # type: ignore[index]


def test_backend_error_mid_stream_is_one_error_event_then_done(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    body = {
        "model": "echo-fail-mid",
        "messages": [{"role": "user", "content": "one two three four"}],
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error"
    assert "echo failed on purpose" in error["message"]
    content = "".join(
        json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-2]
    )
    assert content == "one two"
    with pytest.raises(openai.APIError, match="echo failed on purpose"):
        for _ in client.chat.completions.create(**body):  # type: ignore[call-overload]
            pass


def test_backend_crash_mid_stream_then_the_next_request_works(http: httpx.Client) -> None:
    body = {
        "model": "echo-crash-mid",
        "messages": [{"role": "user", "content": "one two three four"}],
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "backend_crashed"
    assert "exited with code 17" in error["message"]
    again = http.post(
        "/v1/completions", json={"model": "echo-crash-mid", "prompt": "x", "max_tokens": 1}
    )
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["text"] == "x"


def test_sigkilled_backend_is_replaced_on_the_next_request(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    client.completions.create(model="echo", prompt="warm up")
    before = backend_pids(f"{gateway.runtime_dir}/")
    assert before
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    answer = client.completions.create(model="echo", prompt="still here")
    assert answer.choices[0].text == "still here"
    assert wait_until(lambda: set(gateway.backend_pids()).isdisjoint(before))


def test_queue_full_is_429(gateway: Gateway) -> None:
    def ask(_: int) -> int:
        return httpx.post(
            f"{gateway.url}/v1/completions",
            json={"model": "echo-single", "prompt": "a b"},
            timeout=30,
        ).status_code

    ask(0)  # load it first
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        codes = sorted(pool.map(ask, range(3)))
    assert codes[0] == 200
    assert 429 in codes


def test_custom_backend_outside_the_package(gateway: Gateway, client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="reverse", messages=[{"role": "user", "content": "stressed"}]
    )
    assert answer.choices[0].message.content == "desserts"
    lenient = gateway.client(_strict_response_validation=False)  # see the completions stream test
    stream = lenient.completions.create(model="reverse", prompt="abc", stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "cba"


def test_custom_backend_does_not_serve_what_it_does_not_implement(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", json={"model": "reverse", "input": "x"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_supported"


def test_a_backend_that_cannot_start_reports_its_output(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"model": "broken", "prompt": "x"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "backend_start_failed"
    assert "exited with code 3" in error["message"]
    assert "cannot find libfoo.so" in error["message"]


def test_health_and_readiness(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


def test_null_for_the_spec_s_nullable_stream_and_echo_is_accepted(http: httpx.Client) -> None:
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi there"}], "stream": None}
    answer = http.post("/v1/chat/completions", json=chat)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "hi there"
    body = {"model": "echo", "prompt": "hi there", "stream": None, "echo": None}
    answer = http.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == "hi there"


def test_n_choices_each_come_back_with_their_index(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "one two three"}], n=3
    )
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.message.content == "one two three" for c in answer.choices)
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 9  # three words, three times
    assert answer.usage.prompt_tokens == 3  # the prompt once
    completion = client.completions.create(model="echo", prompt="a b", n=2)
    assert [c.text for c in completion.choices] == ["a b", "a b"]


def test_n_streamed_choices_each_get_their_deltas_and_one_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "one two three"}],
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    usages = []
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert texts == {0: "one two three", 1: "one two three"}
    assert finished == {0: "stop", 1: "stop"}
    assert len(usages) == 1
    assert usages[0].completion_tokens == 6
