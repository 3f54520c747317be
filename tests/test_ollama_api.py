"""Ollama's API beside OpenAI's: the `ollama` Python client against a real gateway, as the
home-server clients that speak only Ollama use it."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from gateway.model_facts import human_number
from gateway.schemas import ollama as wire
from gateway.translate import ollama as translate
from tests.conftest import Gateway, wait_until, write_model

WEATHER_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
SAID = "the quick brown fox"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ollama")
    write_model(directory, "echo", "backend: echo")
    write_model(directory, "echo-embed", "backend: echo\nembeddings: true")
    write_model(directory, "echo-slow-load", "backend: echo\noptions: {load_delay_ms: 400}")
    write_model(directory, "echo-unload", "backend: echo")
    write_model(
        directory,
        "echo-fail-mid",
        "backend: echo\noptions: {fail_code: INTERNAL, fail_after_words: 2}",
    )
    write_model(
        directory,
        "echo-defaults",
        "backend: echo\nparameters: {max_tokens: 2, temperature: 0.3}\nsystem_prompt: 'be brief'",
    )
    write_model(directory, "whisper-speech", "backend: whisper\nmodel: speech")
    return directory


@pytest.fixture(scope="module")
def gateway(models: Path) -> Iterator[Gateway]:
    running = Gateway(models).start()
    yield running
    running.cleanup()


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> ollama.Client:
    return ollama.Client(host=gateway.url, timeout=60)


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines() if line]


def test_root_and_version_answer_as_ollama_does(gateway: Gateway) -> None:
    root = httpx.get(gateway.url)
    assert root.status_code == 200
    assert root.text == "Ollama is running"
    assert httpx.head(gateway.url).status_code == 200
    version = httpx.get(f"{gateway.url}/api/version").json()["version"]
    # Clients gate features on it: tools (0.3), JSON schema formats (0.5), think (0.9).
    assert tuple(int(part) for part in version.split(".")) >= (0, 9, 0)


def test_chat_answers_whole_with_its_figures(client: ollama.Client) -> None:
    answer = client.chat(model="echo", messages=[{"role": "user", "content": SAID}])
    assert answer.message.role == "assistant"
    assert answer.message.content == SAID
    assert answer.done is True
    assert answer.done_reason == "stop"
    assert answer.model == "echo"
    assert answer.eval_count == 4
    assert answer.prompt_eval_count == 4
    figures = [answer.total_duration, answer.load_duration, answer.prompt_eval_duration]
    assert all(isinstance(f, int) and f >= 0 for f in [*figures, answer.eval_duration])
    assert answer.total_duration is not None
    assert answer.eval_duration is not None
    assert answer.total_duration >= answer.eval_duration


def test_a_tagged_name_finds_the_model(client: ollama.Client) -> None:
    answer = client.chat(model="echo:latest", messages=[{"role": "user", "content": SAID}])
    assert answer.message.content == SAID
    assert answer.model == "echo:latest"  # named as the client named it
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="echo:7b", messages=[{"role": "user", "content": SAID}])
    assert caught.value.status_code == 404


def test_streamed_chat_is_ndjson_ending_with_done(client: ollama.Client, gateway: Gateway) -> None:
    pieces = list(
        client.chat(model="echo", messages=[{"role": "user", "content": SAID}], stream=True)
    )
    assert len(pieces) == 5  # a piece a word, then the end
    assert [p.done for p in pieces] == [False, False, False, False, True]
    assert "".join(p.message.content or "" for p in pieces) == SAID
    last = pieces[-1]
    assert last.done_reason == "stop"
    assert last.eval_count == 4
    assert last.total_duration is not None
    assert last.total_duration > 0
    # Ollama's default is to stream: a request that does not say gets NDJSON.
    raw = httpx.post(
        f"{gateway.url}/api/chat",
        json={"model": "echo", "messages": [{"role": "user", "content": SAID}]},
    )
    assert raw.headers["content-type"].startswith("application/x-ndjson")
    lines = ndjson(raw)
    assert lines[-1]["done"] is True
    assert all(line["done"] is False for line in lines[:-1])
    assert "total_duration" not in lines[0]  # the figures come on the last line only


def test_options_reach_the_model(client: ollama.Client) -> None:
    answer = client.chat(
        model="echo",
        messages=[{"role": "user", "content": "one two three four five"}],
        options={"num_predict": 2, "seed": -1, "num_ctx": 8192, "stop": ["four"]},
    )
    assert answer.message.content == "one two"
    assert answer.done_reason == "length"
    stopped = client.generate(
        model="echo", prompt="one two three four five", options={"stop": ["four"]}
    )
    assert stopped.response == "one two three "  # the stop sequence itself is not returned
    assert stopped.done_reason == "stop"


def test_model_defaults_apply_and_the_request_wins(client: ollama.Client) -> None:
    defaults = client.generate(model="echo-defaults", prompt="one two three")
    assert defaults.response == "one two"  # the YAML's max_tokens: 2
    unlimited = client.generate(
        model="echo-defaults", prompt="one two three", options={"num_predict": 3}
    )
    assert unlimited.response == "one two three"


def test_generate_whole_and_streamed(client: ollama.Client) -> None:
    answer = client.generate(model="echo", prompt=SAID)
    assert answer.response == SAID
    assert answer.done is True
    assert answer.done_reason == "stop"
    assert answer.eval_count == 4
    pieces = list(client.generate(model="echo", prompt=SAID, stream=True))
    assert "".join(p.response or "" for p in pieces) == SAID
    assert pieces[-1].done is True
    assert pieces[-1].response == ""
    raw = client.generate(model="echo", prompt=SAID, raw=True)
    assert raw.response == SAID


def test_an_empty_generate_loads_the_model_and_keep_alive_0_unloads_it(
    client: ollama.Client,
) -> None:
    def loaded() -> set[str]:
        return {m.model or "" for m in client.ps().models}

    assert "echo-unload:latest" not in loaded()
    answer = client.generate(model="echo-unload")
    assert answer.done is True
    assert answer.done_reason == "load"
    assert answer.response == ""
    assert "echo-unload:latest" in loaded()
    unloaded = client.generate(model="echo-unload", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert wait_until(lambda: "echo-unload:latest" not in loaded())
    chat = client.chat(model="echo-unload", messages=[])
    assert chat.done_reason == "load"
    assert chat.message.content == ""


def test_load_duration_is_the_wait_for_the_model(client: ollama.Client) -> None:
    first = client.chat(model="echo-slow-load", messages=[{"role": "user", "content": SAID}])
    again = client.chat(model="echo-slow-load", messages=[{"role": "user", "content": SAID}])
    assert first.load_duration is not None
    assert first.load_duration >= 400_000_000
    assert again.load_duration is not None
    assert again.load_duration < 200_000_000


def test_embed_and_the_legacy_embeddings(client: ollama.Client, gateway: Gateway) -> None:
    both = client.embed(model="echo-embed", input=["hello", "world"])
    assert both.model == "echo-embed"
    assert len(both.embeddings) == 2
    assert all(len(vector) == 16 for vector in both.embeddings)
    assert both.embeddings[0] != both.embeddings[1]
    assert both.prompt_eval_count == 2
    # The same vectors as OpenAI's route gives.
    openai_vectors = httpx.post(
        f"{gateway.url}/v1/embeddings", json={"model": "echo-embed", "input": "hello"}
    ).json()
    assert both.embeddings[0] == pytest.approx(openai_vectors["data"][0]["embedding"])
    one = client.embed(model="echo-embed", input="hello")
    assert one.embeddings == [both.embeddings[0]]
    legacy = client.embeddings(model="echo-embed", prompt="hello")
    assert legacy.embedding == pytest.approx(both.embeddings[0])


def test_embed_dimensions_shorten_to_unit_vectors(client: ollama.Client) -> None:
    full = client.embed(model="echo-embed", input="hello").embeddings[0]
    short = client.embed(model="echo-embed", input="hello", dimensions=4).embeddings[0]
    assert len(short) == 4
    assert math.fsum(v * v for v in short) == pytest.approx(1.0)
    norm = math.sqrt(math.fsum(v * v for v in full[:4]))
    assert short == pytest.approx([v / norm for v in full[:4]])


def test_tags_lists_the_models_ollama_can_use(client: ollama.Client) -> None:
    listed = {m.model: m for m in client.list().models}
    assert {"echo:latest", "echo-embed:latest", "echo-defaults:latest"} <= set(listed)
    assert "whisper-speech:latest" not in listed  # speech models are not Ollama's
    echo = listed["echo:latest"]
    assert echo.digest is not None
    assert len(echo.digest) == 64
    assert echo.modified_at is not None
    assert abs((datetime.now(UTC) - echo.modified_at).total_seconds()) < 3600
    assert echo.details is not None
    assert echo.details.format == ""  # echo has no model files: nothing to say, nothing made up
    assert echo.details.family == ""
    raw = httpx.get(f"{client._client.base_url}/api/tags").json()["models"]
    assert {"name", "model", "modified_at", "size", "digest", "details"} <= set(raw[0])


def test_ps_lists_loaded_models(client: ollama.Client) -> None:
    client.chat(model="echo", messages=[{"role": "user", "content": SAID}])
    running = {m.model: m for m in client.ps().models}
    echo = running["echo:latest"]
    assert echo.size is not None
    assert echo.size > 0
    assert echo.size_vram == 0
    assert echo.expires_at is not None
    assert echo.expires_at > datetime.now(UTC)  # the default keep_alive of 5 minutes


def test_show_describes_the_model(client: ollama.Client) -> None:
    shown = client.show("echo-defaults")
    assert shown.capabilities == ["completion", "tools"]
    assert shown.parameters is not None
    assert "num_predict" in shown.parameters
    assert "temperature" in shown.parameters
    assert shown.modelinfo == {}
    assert client.show("echo-embed").capabilities == ["embedding"]
    raw = httpx.post(
        f"{client._client.base_url}/api/show", json={"name": "echo-defaults:latest"}
    ).json()
    assert raw["system"] == "be brief"  # the older spelling of the model's name works too


def get_weather(city: str) -> str:
    """
    The weather in a city.

    Args:
      city: The city's name

    Returns:
      str: The weather
    """
    return "11 degrees celsius"


def test_tool_call_round_trip(client: ollama.Client) -> None:
    messages: list[Any] = [{"role": "user", "content": WEATHER_CALL}]
    answer = client.chat(model="echo", messages=messages, tools=[get_weather])
    calls = answer.message.tool_calls
    assert calls is not None
    assert len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == {"city": "Paris"}  # an object, as Ollama sends it
    assert answer.done_reason == "stop"
    result = get_weather(**calls[0].function.arguments)
    messages += [answer.message, {"role": "tool", "content": result, "tool_name": "get_weather"}]
    followed = client.chat(model="echo", messages=messages, tools=[get_weather])
    # The call (arguments as an object again) and its result reached the model.
    assert followed.prompt_eval_count == (answer.prompt_eval_count or 0) + len(result.split())
    streamed = list(
        client.chat(model="echo", messages=messages[:1], tools=[get_weather], stream=True)
    )
    called = [c for piece in streamed for c in piece.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in called] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_unknown_model_is_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404
    assert caught.value.error == "model 'no-such-model' not found"
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.generate(model="no-such-model", prompt="hi", stream=True))
    assert streamed.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as shown:
        client.show("no-such-model")
    assert shown.value.status_code == 404


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (
            {"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]},
            "messages[0].images",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "options": {"temperature": "hot"}},
            "options.temperature",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "format": "yaml"}, "format"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}], "keep_alive": "soon"}, "keep_alive"),
    ],
)
def test_bad_input_is_400_naming_the_field(
    gateway: Gateway, body: dict[str, Any], named: str
) -> None:
    response = httpx.post(f"{gateway.url}/api/chat", json={"model": "echo", **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert isinstance(error, str)  # Ollama's shape: the message itself
    assert named in error


def test_bad_input_through_the_client(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="echo", prompt="hi", images=[b"\x89PNG"])
    assert caught.value.status_code == 400
    assert "images" in caught.value.error
    with pytest.raises(ollama.ResponseError) as unsupported:
        client.pull("llama3.2")
    assert unsupported.value.status_code == 404
    assert "hearth models install" in unsupported.value.error


def test_an_error_mid_stream_is_the_last_line(client: ollama.Client, gateway: Gateway) -> None:
    pieces: list[ollama.ChatResponse] = []
    stream = client.chat(
        model="echo-fail-mid", messages=[{"role": "user", "content": SAID}], stream=True
    )
    with pytest.raises(ollama.ResponseError) as caught:
        pieces.extend(stream)
    assert caught.value.error == "echo failed on purpose"
    assert "".join(p.message.content or "" for p in pieces) == "the quick"
    raw = httpx.post(
        f"{gateway.url}/api/chat",
        json={"model": "echo-fail-mid", "messages": [{"role": "user", "content": SAID}]},
    )
    assert raw.status_code == 200  # begun before it failed
    assert ndjson(raw)[-1] == {"error": "echo failed on purpose"}
    whole = httpx.post(
        f"{gateway.url}/api/chat",
        json={
            "model": "echo-fail-mid",
            "stream": False,
            "messages": [{"role": "user", "content": SAID}],
        },
    )
    assert whole.status_code == 500  # nothing sent yet: an error answer of its own
    assert whole.json() == {"error": "echo failed on purpose"}


def test_a_keyed_server_asks_ollama_clients_for_the_key(models: Path) -> None:
    keyed = Gateway(models, env={"HEARTH_API_KEYS": "sesame"}).start()
    try:
        with pytest.raises(ollama.ResponseError) as caught:
            ollama.Client(host=keyed.url).list()
        assert caught.value.status_code == 401
        assert "API key" in caught.value.error
        allowed = ollama.Client(host=keyed.url, headers={"Authorization": "Bearer sesame"})
        assert allowed.chat(model="echo", messages=[{"role": "user", "content": SAID}]).done
    finally:
        keyed.cleanup()


def test_format_and_options_become_the_gateways_request() -> None:
    body = wire.ChatRequest(
        model="m",
        messages=[wire.Message(role="User", content="hi")],
        format={"type": "object", "properties": {"age": {"type": "integer"}}},
        options=wire.Options(num_predict=-1, seed=-1, temperature=0.0, top_k=5),
    )
    chat = translate.chat_request(body)
    assert chat.messages[0].role == "user"  # Ollama reads roles in any case
    assert chat.response_format is not None
    assert chat.response_format.type == "json_schema"
    assert chat.response_format.json_schema is not None
    assert chat.response_format.json_schema.schema == body.format
    assert chat.max_tokens is None
    assert chat.seed is None
    assert (chat.temperature, chat.top_k) == (0.0, 5)
    json_mode = translate.chat_request(wire.ChatRequest(model="m", messages=[], format="json"))
    assert json_mode.response_format is not None
    assert json_mode.response_format.type == "json_object"


def test_parameter_counts_read_as_ollama_writes_them() -> None:
    assert human_number(7_615_616_512) == "7.6B"
    assert human_number(8_000_000_000) == "8B"
    assert human_number(134_515_008) == "134.52M"
    assert human_number(22_000_000) == "22M"
    assert human_number(600_123) == "600K"


@pytest.mark.llama
def test_a_real_engine_streams_ndjson(client: ollama.Client, models: Path, tiny_gguf: Path) -> None:
    shutil.copy(tiny_gguf, models / "tiny.gguf")
    write_model(models, "tiny-llama", "backend: llama\nmodel: tiny.gguf\ncontext_size: 256")
    pieces = list(
        client.chat(
            model="tiny-llama",
            messages=[{"role": "user", "content": "hello there"}],
            options={"num_predict": 8, "temperature": 0},
            stream=True,
        )
    )
    assert len(pieces) > 2
    assert not any(p.done for p in pieces[:-1])
    last = pieces[-1]
    assert last.done
    assert last.done_reason == "length"
    assert last.eval_count == 8
    assert last.prompt_eval_count is not None
    assert last.prompt_eval_count > 2
    assert "".join(p.message.content or "" for p in pieces).strip()
    details = {m.model: m.details for m in client.list().models}["tiny-llama:latest"]
    assert details is not None
    assert (details.format, details.family, details.quantization_level) == ("gguf", "llama", "F32")
    shown = client.show("tiny-llama")
    assert shown.modelinfo is not None
    assert shown.modelinfo["llama.context_length"] == 512  # what the file says
    assert shown.template  # the GGUF's own chat template


def test_logprobs_come_with_each_piece_and_with_the_whole(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": SAID}]
    pieces = list(client.chat(model="echo", messages=messages, logprobs=True, stream=True))
    for piece in pieces[:-1]:
        assert piece.logprobs is not None
        assert "".join(lp.token for lp in piece.logprobs) == piece.message.content
    whole = client.chat(model="echo", messages=messages, logprobs=True, top_logprobs=1)
    assert whole.logprobs is not None
    assert [lp.token for lp in whole.logprobs] == ["the", " quick", " brown", " fox"]
    assert all(lp.top_logprobs and lp.top_logprobs[0].token == lp.token for lp in whole.logprobs)
    generated = client.generate(model="echo", prompt=SAID, logprobs=True)
    assert "".join(lp.token for lp in generated.logprobs or []) == generated.response == SAID
    assert client.chat(model="echo", messages=messages).logprobs is None


def test_x_and_x_latest_are_both_listed_and_reachable(client: ollama.Client, models: Path) -> None:
    write_model(models, "twin", "backend: echo")
    write_model(models, "twin:latest", "backend: echo\nsystem_prompt: 'the tagged one'")
    names = [m.model for m in client.list().models]
    assert names.count("twin:latest") == 1
    assert "twin" in names
    # Each name reaches its own model.
    assert client.generate(model="twin", prompt="one").response == "one"
    host = client._client.base_url
    shown = httpx.post(f"{host}/api/show", json={"model": "twin:latest"}).json()
    assert shown["system"] == "the tagged one"
    assert httpx.post(f"{host}/api/show", json={"model": "twin"}).json()["system"] == ""


def test_no_route_under_api_still_answers_in_ollamas_shape(gateway: Gateway) -> None:
    wrong_method = httpx.get(f"{gateway.url}/api/chat")
    assert wrong_method.status_code == 405
    assert isinstance(wrong_method.json()["error"], str)
    unknown = httpx.post(f"{gateway.url}/api/blobs/sha256:00", json={})
    assert unknown.status_code == 404
    assert isinstance(unknown.json()["error"], str)
    # /v1 keeps OpenAI's.
    assert isinstance(httpx.get(f"{gateway.url}/v1/chat/completions").json()["error"], dict)


def test_a_system_message_with_a_suffix_is_refused_not_dropped(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model="echo", prompt="a", suffix="b", system="be brief")
    assert refused.value.status_code == 400
    assert "system" in refused.value.error


def test_show_does_not_follow_links_out_of_the_models_dir(
    client: ollama.Client, models: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text('{"model_type": "SECRET_FROM_OUTSIDE"}')
    (outside / "big.bin").write_bytes(b"x" * 100_000)
    folder = models / "linked-hf"
    folder.mkdir()
    (folder / "config.json").symlink_to(outside / "config.json")
    (folder / "big.bin").symlink_to(outside / "big.bin")
    (folder / "tokenizer.json").write_text("{}")
    write_model(models, "linked-hf", "backend: transformers\nmodel: linked-hf")
    listed = {m.model: m for m in client.list().models}["linked-hf:latest"]
    assert listed.size == 2  # the one file inside
    assert listed.details is not None
    assert "SECRET" not in (listed.details.family or "")
    assert "SECRET" not in json.dumps(client.show("linked-hf").modelinfo or {})
