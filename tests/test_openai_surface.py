"""The rest of OpenAI's chat and completions surface: logprobs, best_of, echo, suffix (fill in
the middle), max_tokens 0, null prompts, and the spec-valid spellings clients send (nulls,
integers written as floats)."""

from __future__ import annotations

import math
from typing import Any

import httpx
import openai
import pytest

GREEDY = {"temperature": 0.0}


def _sse_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    import json

    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


# Log-probabilities ------------------------------------------------------------------------------


def test_chat_logprobs_cover_the_answer_token_by_token(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "hello wide world"}],
        logprobs=True,
        top_logprobs=1,
    )
    choice = answer.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.content is not None
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content == "hello wide world"
    for token in tokens:
        assert bytes(token.bytes or []) == token.token.encode()
        assert token.top_logprobs[0].token == token.token
    # Not asked for: none.
    plain = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hello"}]
    )
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_come_with_the_text_they_made(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "one two three four"}],
        logprobs=True,
        stop=[" three"],
        stream=True,
    )
    text, tokens = "", []
    for chunk in stream:
        for choice in chunk.choices:
            piece = choice.delta.content or ""
            text += piece
            scored = choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
            assert "".join(t.token for t in scored) == piece
            tokens += [t.token for t in scored]
    # The stop sequence's token is not part of the answer, nor of its log-probabilities.
    assert text == "one two"
    assert tokens == ["one", " two"]


def test_top_logprobs_needs_logprobs_and_has_a_bound(http: httpx.Client) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    alone = http.post("/v1/chat/completions", json={**body, "top_logprobs": 2})
    assert alone.status_code == 400
    assert alone.json()["error"]["param"] == "top_logprobs"
    many = http.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 21})
    assert many.status_code == 400
    assert many.json()["error"]["param"] == "top_logprobs"
    legacy = http.post("/v1/completions", json={"model": "echo", "prompt": "x", "logprobs": 6})
    assert legacy.status_code == 400
    assert legacy.json()["error"]["param"] == "logprobs"


@pytest.mark.llama
def test_llama_logprobs_are_the_models_distribution(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        **GREEDY,
    )
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert len(content) == 6
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for token in content:
        top = [t.logprob for t in token.top_logprobs]
        assert len(top) == 3
        assert top == sorted(top, reverse=True)
        assert all(lp <= 0 for lp in top)
        assert sum(math.exp(lp) for lp in top) <= 1 + 1e-4
        # Greedy: the token taken is the likeliest.
        assert token.token == token.top_logprobs[0].token
        assert token.logprob == pytest.approx(top[0])
    stream = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        stream=True,
        **GREEDY,
    )
    streamed = [
        t
        for chunk in stream
        for choice in chunk.choices
        for t in (choice.logprobs.content or [] if choice.logprobs else [])
    ]
    assert [t.token for t in streamed] == [t.token for t in content]
    # The second request finds its prompt in the cache and reads only its end: another shape
    # of computation, which rounds a little differently.
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-2)


@pytest.mark.llama
def test_completion_logprobs_in_the_legacy_shape(http: httpx.Client) -> None:
    body = {"model": "tiny-llama", "prompt": "the water", "max_tokens": 5, "logprobs": 2}
    answer = http.post("/v1/completions", json={**body, **GREEDY}).json()
    choice = answer["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert len(logprobs["token_logprobs"]) == len(logprobs["tokens"]) == 5
    offsets = [0]
    for token in logprobs["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs["text_offset"] == offsets
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True):
        assert len(top) == 2
        assert max(top, key=top.get) == token  # greedy


# best_of ----------------------------------------------------------------------------------------


@pytest.mark.llama
def test_best_of_returns_the_likeliest_of_its_generations(http: httpx.Client) -> None:
    body = {"model": "tiny-llama", "prompt": "hot day", "max_tokens": 6, "seed": 11}
    body["temperature"] = 1.5
    # The same three generations (seed + i each), shown with their scores...
    three = http.post("/v1/completions", json={**body, "n": 3, "logprobs": 0}).json()

    def mean(choice: dict[str, Any]) -> float:
        values = choice["logprobs"]["token_logprobs"]
        return sum(values) / len(values)

    assert len({c["text"] for c in three["choices"]}) > 1, "the seeds should differ"
    likeliest = max(three["choices"], key=mean)["text"]
    # ...and best_of picks the likeliest of them, billing all three.
    best = http.post("/v1/completions", json={**body, "n": 1, "best_of": 3}).json()
    assert [c["text"] for c in best["choices"]] == [likeliest]
    assert best["choices"][0]["logprobs"] is None  # not asked for
    assert best["usage"]["completion_tokens"] == three["usage"]["completion_tokens"] == 18


def test_best_of_below_n_or_streamed_is_400(http: httpx.Client) -> None:
    body = {"model": "echo", "prompt": "x"}
    below = http.post("/v1/completions", json={**body, "n": 3, "best_of": 2})
    assert below.status_code == 400
    assert below.json()["error"]["param"] == "best_of"
    streamed = http.post("/v1/completions", json={**body, "best_of": 2, "stream": True})
    assert streamed.status_code == 400
    assert streamed.json()["error"]["param"] == "best_of"


# echo, max_tokens 0, null prompts ---------------------------------------------------------------


def test_echo_writes_the_prompt_before_the_answer(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    answer = client.completions.create(model="echo", prompt="say this", echo=True)
    assert answer.choices[0].text == "say thissay this"
    # (The SDK's strict validation refuses a streamed completion's null finish_reason, which
    # OpenAI sends too: read the stream as it is.)
    body = {"model": "echo", "prompt": "say this", "echo": True, "stream": True}
    chunks = _sse_chunks(http.post("/v1/completions", json=body))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "say thissay this"
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="echo", prompt="x", echo=True, logprobs=1)
    assert refused.value.body["param"] == "echo"  # type: ignore[index]


def test_max_tokens_zero_generates_nothing(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="echo", prompt="two words", max_tokens=0)
    assert answer.choices[0].text == ""
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (2, 0)
    # With echo, the prompt alone: how clients score or show a prompt.
    echoed = client.completions.create(model="echo", prompt="two words", max_tokens=0, echo=True)
    assert echoed.choices[0].text == "two words"


@pytest.mark.llama
def test_llama_max_tokens_zero_and_a_null_prompt(http: httpx.Client) -> None:
    zero = http.post(
        "/v1/completions", json={"model": "tiny-llama", "prompt": "the water", "max_tokens": 0}
    )
    assert zero.status_code == 200
    assert zero.json()["choices"][0]["text"] == ""
    counted = http.post("/v1/tokenize", json={"model": "tiny-llama", "content": "the water"})
    tokens = len(counted.json()["tokens"])
    assert zero.json()["usage"]["prompt_tokens"] == tokens + 1  # and BOS
    # A null prompt starts a document, as OpenAI's default <|endoftext|> does.
    null = http.post(
        "/v1/completions", json={"model": "tiny-llama", "prompt": None, "max_tokens": 3}
    )
    assert null.status_code == 200, null.text
    usage = null.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (1, 3)


# suffix: fill in the middle -------------------------------------------------------------------


@pytest.mark.llama
def test_suffix_fills_the_middle_on_a_model_with_infill_tokens(http: httpx.Client) -> None:
    body = {"model": "tiny-llama-infill", "prompt": "the water", "suffix": "hot day"}
    answer = http.post("/v1/completions", json={**body, "max_tokens": 4, **GREEDY})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 4

    def count(text: str) -> int:
        call = {"model": "tiny-llama-infill", "content": text}
        return len(http.post("/v1/tokenize", json=call).json()["tokens"])

    # BOS, <fim_prefix>, the prompt, <fim_suffix>, the suffix, <fim_middle>.
    expected = 1 + 1 + count("the water") + 1 + count("hot day") + 1
    assert answer.json()["usage"]["prompt_tokens"] == expected
    # The same prompt without the suffix is another request.
    plain = http.post(
        "/v1/completions", json={**body, "suffix": None, "max_tokens": 4, **GREEDY}
    ).json()
    assert plain["usage"]["prompt_tokens"] == 1 + count("the water")


@pytest.mark.llama
@pytest.mark.parametrize("model", ["tiny-llama", "echo"])
def test_suffix_on_a_model_that_cannot_infill_is_a_clear_400(
    http: httpx.Client, model: str
) -> None:
    answer = http.post("/v1/completions", json={"model": model, "prompt": "a", "suffix": "b"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["param"], error["code"]) == ("suffix", "infill_unsupported")


# Spec-valid spellings -----------------------------------------------------------------------


def test_integers_written_as_floats_and_nulls_are_accepted(http: httpx.Client) -> None:
    chat = {
        "model": "echo",
        "messages": [{"role": "user", "content": "hi"}],
        "n": 2.0,
        "max_tokens": 5.0,
        "stream": None,
        "logprobs": None,
        "top_logprobs": None,
    }
    answer = http.post("/v1/chat/completions", json=chat)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["choices"]) == 2
    completion = {"model": "echo", "prompt": "hi", "echo": None, "stream": None, "suffix": None}
    assert http.post("/v1/completions", json=completion).status_code == 200
    fraction = http.post("/v1/chat/completions", json={**chat, "n": 2.5})
    assert fraction.status_code == 400
    assert fraction.json()["error"]["param"] == "n"


def test_an_image_request_may_leave_out_model_size_and_n(http: httpx.Client) -> None:
    body = {"prompt": "a red square", "size": None, "n": None, "response_format": "b64_json"}
    answer = http.post("/v1/images/generations", json={**body, "steps": 1}, timeout=120)
    # The models dir has one image model: a request naming none gets it.
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"]) == 1
    assert answer.json()["data"][0]["b64_json"]


def test_a_backend_that_cannot_score_tokens_says_so(http: httpx.Client) -> None:
    """transformers models compute no log-probabilities: a 400, not an answer without them."""
    body = {"model": "tiny-hf", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    answer = http.post("/v1/chat/completions", json={**body, "logprobs": True}, timeout=120)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["param"], error["code"]) == ("logprobs", "logprobs_unsupported")
    best_of = http.post(
        "/v1/completions",
        json={"model": "tiny-hf", "prompt": "hi", "max_tokens": 2, "best_of": 2},
        timeout=120,
    )
    assert best_of.status_code == 400
    # The model still answers what it can.
    assert http.post("/v1/chat/completions", json=body, timeout=120).status_code == 200


def test_a_tool_choice_that_needs_tools_without_any_is_a_400(http: httpx.Client) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        answer = http.post("/v1/chat/completions", json={**body, "tool_choice": choice})
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == "tool_choice"
    assert http.post("/v1/chat/completions", json={**body, "tool_choice": "auto"}).is_success
