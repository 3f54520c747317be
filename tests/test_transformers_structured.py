"""Structured output on the Transformers backend: response_format JSON (object and schema) and
forced tool calls, through a real gateway, on a tiny random Llama (and the real SmolLM2, made a
Transformers model from its GGUF)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import CACHE, Gateway, link_tree, write_model

MESSAGES = [{"role": "user", "content": "hello there"}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "active", "tags"],
    "additionalProperties": False,
}
# Schemas a random model cannot wander off in: bounded strings and integers, enums. (Given the
# chance, it writes digits for ever: 10000000…, -0.0000000….)
SCHEMAS: list[dict[str, Any]] = [
    PERSON,
    {
        "type": "object",
        "properties": {
            "colour": {"enum": ["cyan", "magenta"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["colour", "count"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -5, "maximum": 9},
                    "y": {"type": "null"},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "ok": {"const": True},
        },
        "required": ["point", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {"type": "integer", "minimum": 3, "maximum": 300},
        "minItems": 2,
        "maxItems": 4,
    },
]

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
UNIT: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "set_unit",
        "description": "Choose the temperature unit",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["unit"],
            "additionalProperties": False,
        },
    },
}


def conforms(value: Any, schema: dict[str, Any]) -> bool:
    """Whether `value` fits `schema`, for the keywords these tests use."""
    if "const" in schema and value != schema["const"]:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    kind = schema.get("type")
    types: dict[str, Any] = {
        "object": dict,
        "array": list,
        "string": str,
        "boolean": bool,
        "null": type(None),
        "integer": int,
        "number": (int, float),
    }
    if kind is not None:
        if not isinstance(value, types[kind]):
            return False
        if kind in ("integer", "number") and isinstance(value, bool):
            return False
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        return False
    if isinstance(value, str) and len(value) > schema.get("maxLength", len(value)):
        return False
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return False
        return all(conforms(item, schema.get("items", {})) for item in value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if any(key not in value for key in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(properties):
            return False
        return all(conforms(value[key], properties.get(key, {})) for key in value)
    return True


def test_the_checker_catches_what_it_checks() -> None:
    good = {"name": "ada", "age": 36, "role": "admin", "active": True, "tags": ["red"]}
    assert conforms(good, PERSON)
    for bad in (
        {**good, "role": "boss"},
        {**good, "age": 300},
        {**good, "age": "36"},
        {**good, "extra": 1},
        {key: value for key, value in good.items() if key != "name"},
        {**good, "tags": ["red", "blue"]},
        {**good, "name": "x" * 13},
    ):
        assert not conforms(bad, PERSON), bad


def json_schema(schema: Any) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "answer", "strict": True, "schema": schema},
    }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_hf: Path) -> Iterator[Gateway]:
    models = tmp_path_factory.mktemp("structured")
    link_tree(tiny_hf, models / "tiny-hf")
    base = "backend: transformers\nmodel: tiny-hf\nthreads: 1"
    write_model(models, "tiny-hf", base)
    # Waits up to a second for a batch of 4 to fill, so that requests sent at once meet.
    write_model(models, "tiny-hf-batch", f"{base}\nparallel: 4\noptions: {{batch_window_ms: 1000}}")
    for family in ("llama3", "mistral"):
        write_model(models, f"tiny-hf-{family}", f"{base}\ntool_parser: {family}")
    running = Gateway(models).start()
    yield running
    running.cleanup()


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return gateway.client()


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    options = {"model": "tiny-hf", "messages": MESSAGES, "temperature": 0.0, **kwargs}
    return client.chat.completions.create(**options)


# response_format -------------------------------------------------------------------------------


def test_a_json_schema_answer_fits_the_schema_even_from_a_random_model(
    client: openai.OpenAI,
) -> None:
    free = chat(client, max_tokens=40).choices[0].message.content
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)  # what the model says unconstrained is no JSON
    answer = chat(client, max_tokens=200, response_format=json_schema(PERSON)).choices[0]
    assert answer.finish_reason == "stop", answer.message.content
    assert conforms(json.loads(answer.message.content), PERSON), answer.message.content


def test_a_streamed_json_schema_answer_fits_the_schema(client: openai.OpenAI) -> None:
    whole = chat(client, max_tokens=200, response_format=json_schema(PERSON))
    chunks = list(chat(client, max_tokens=200, response_format=json_schema(PERSON), stream=True))
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 1, "streamed piece by piece"
    text = "".join(pieces)
    assert text == whole.choices[0].message.content
    assert conforms(json.loads(text), PERSON), text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_answers_are_json_objects(client: openai.OpenAI) -> None:
    # Greedy, this random model writes one string forever; sampling closes it soon enough.
    finished = []
    for seed in range(4):
        answer = chat(
            client,
            max_tokens=300,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_object"},
        ).choices[0]
        if answer.finish_reason == "stop":
            finished.append(json.loads(answer.message.content))
    assert len(finished) >= 3
    assert all(isinstance(value, dict) for value in finished), finished


def test_a_budget_too_small_for_the_json_ends_with_length(client: openai.OpenAI) -> None:
    answer = chat(client, max_tokens=5, response_format=json_schema(PERSON)).choices[0]
    assert answer.finish_reason == "length"
    assert answer.message.content.startswith('{"n'), "the schema's first key, cut short"
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer.message.content)


def test_concurrent_requests_with_different_schemas_each_get_theirs(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    requests = [
        {"max_tokens": 200, "response_format": json_schema(schema)} for schema in SCHEMAS[1:]
    ]
    requests.append({"max_tokens": 12})  # a free one shares the batch
    alone = [chat(client, **r).choices[0].message.content for r in requests]
    start = len(gateway.log())
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: chat(client, model="tiny-hf-batch", **r), requests))
    assert "generating 4 prompts together" in gateway.log()[start:]
    texts = [answer.choices[0].message.content for answer in together]
    assert texts == alone, "each row kept its own mask, and the free one none"
    for text, schema in zip(texts, SCHEMAS[1:], strict=False):
        assert conforms(json.loads(text), schema), text


# Bad schemas --------------------------------------------------------------------------------

BAD_SCHEMAS = {
    "unknown type": ({"type": "float"}, "Invalid type"),
    "dangling reference": ({"$ref": "#/$defs/missing"}, "missing"),
    "keyword it cannot enforce": ({"not": {"type": "string"}}, "not"),
    "impossible bounds": ({"type": "array", "minItems": 5, "maxItems": 2}, "minItems"),
}


@pytest.mark.parametrize("case", BAD_SCHEMAS)
def test_a_bad_schema_is_a_400_and_the_backend_lives_on(gateway: Gateway, case: str) -> None:
    schema, words = BAD_SCHEMAS[case]
    # Greedy: the random-weight model may sample its end-of-sequence token first, an empty
    # answer (seen once in CI); its greedy answer to this chat has words.
    body = {"model": "tiny-hf", "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        backends = gateway.backend_pids()
        response = http.post(
            "/v1/chat/completions", json={**body, "response_format": json_schema(schema)}
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["type"], error["code"], error["param"]) == (
            "invalid_request_error",
            "invalid_json_schema",
            "response_format",
        )
        assert words in error["message"]
        after = http.post("/v1/chat/completions", json=body)
        assert after.status_code == 200, after.text
        assert after.json()["choices"][0]["message"]["content"]
        assert gateway.backend_pids() == backends, "the same backend process answered"


def test_a_schema_too_costly_to_follow_is_refused_with_the_reason(gateway: Gateway) -> None:
    # Compiled, then past llguidance's own limit on the work of one token (a node with 600
    # optional children); schemas too costly to compile are tests/test_schema_cost.py's.
    node = {"type": "object", "properties": {f"c{i}": {"$ref": "#/$defs/node"} for i in range(600)}}
    body = {
        "model": "tiny-hf",
        "messages": MESSAGES,
        "max_tokens": 20,
        "response_format": json_schema({"$defs": {"node": node}, "$ref": "#/$defs/node"}),
    }
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("schema_too_complex", "response_format")
        assert "max is 2000" in error["message"]
        plain = {"model": "tiny-hf", "messages": MESSAGES, "max_tokens": 4}
        assert http.post("/v1/chat/completions", json=plain).status_code == 200


# Forced tool calls ----------------------------------------------------------------------------


def forced_call(client: openai.OpenAI, model: str, tool_choice: Any, **kwargs: Any) -> Any:
    answer = chat(
        client,
        model=model,
        messages=[{"role": "user", "content": "what is the weather in paris?"}],
        tools=[WEATHER, UNIT],
        tool_choice=tool_choice,
        max_tokens=200,  # the tiny vocabulary spells much of it a character at a time
        **kwargs,
    )
    return answer.choices[0]


@pytest.mark.parametrize("model", ["tiny-hf", "tiny-hf-llama3", "tiny-hf-mistral"])
@pytest.mark.parametrize("name", ["get_weather", "set_unit"])
def test_a_named_call_from_a_random_model_is_a_valid_call(
    client: openai.OpenAI, model: str, name: str
) -> None:
    # tiny-hf's template renders no tools: hermes-style calls, asked for in a system message.
    choice = forced_call(client, model, {"type": "function", "function": {"name": name}})
    assert choice.finish_reason == "tool_calls", choice.message.content
    assert not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == name
    tool = WEATHER if name == "get_weather" else UNIT
    arguments = json.loads(call.function.arguments)
    assert conforms(arguments, tool["function"]["parameters"]), arguments


def test_a_required_call_is_one_of_the_tools(client: openai.OpenAI) -> None:
    choice = forced_call(client, "tiny-hf", "required")
    assert choice.finish_reason == "tool_calls", choice.message.content
    (call,) = choice.message.tool_calls
    tool = {"get_weather": WEATHER, "set_unit": UNIT}[call.function.name]
    assert conforms(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_a_streamed_forced_call_arrives_as_tool_call_deltas(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "set_unit"}}
    chunks = list(
        chat(
            client,
            messages=[{"role": "user", "content": "which unit?"}],
            tools=[WEATHER, UNIT],
            tool_choice=named,
            max_tokens=200,
            stream=True,
        )
    )
    # Put together as an OpenAI client does: by index, the name once, the arguments in pieces.
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta.function and delta.function.name:
                names[delta.index] = names.get(delta.index, "") + delta.function.name
            if delta.function and delta.function.arguments:
                arguments[delta.index] = arguments.get(delta.index, "") + delta.function.arguments
    assert names == {0: "set_unit"}
    assert json.loads(arguments[0])["unit"] in ("celsius", "fahrenheit")
    assert not any(c.choices and c.choices[0].delta.content for c in chunks), "no text"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_schema_it_cannot_follow_is_a_400_naming_tools(http_client: httpx.Client) -> None:
    odd = {
        "type": "function",
        "function": {"name": "odd", "parameters": {"type": "object", "not": {"required": ["a"]}}},
    }
    body = {
        "model": "tiny-hf",
        "messages": MESSAGES,
        "tools": [odd],
        "tool_choice": "required",
        "max_tokens": 20,
    }
    response = http_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_json_schema", "tools")


@pytest.fixture
def http_client(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60) as session:
        yield session


# The real SmolLM2, as a Transformers model --------------------------------------------------


def write_transformers_from_gguf(gguf: Path, directory: Path) -> Path:
    """A Transformers model directory (safetensors, float32) from a llama GGUF: its tensors
    dequantized, its tokenizer and chat template. Written whole or not at all."""
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    settings = dict(load_gguf_checkpoint(str(gguf))["config"])
    assert settings.pop("model_type") == "llama", "only llama GGUFs"
    settings.pop("_model_name_or_path", None)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings))
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    model.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    scratch = Path(tempfile.mkdtemp(prefix=".hf-", dir=directory.parent))
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        scratch.rename(directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return directory


@pytest.fixture(scope="module")
def smollm2(real_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    converted = CACHE / "smollm2-135m-instruct-transformers"
    if not converted.is_dir():
        gguf = real_models / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        write_transformers_from_gguf(gguf, converted)
    models = tmp_path_factory.mktemp("smollm2-hf")
    link_tree(converted, models / "smollm2-hf")
    write_model(models, "smollm2-hf", "backend: transformers\nmodel: smollm2-hf\nthreads: 2")
    running = Gateway(models).start()
    yield running
    running.cleanup()


@pytest.mark.real_model
def test_the_real_smollm2_answers_json_as_asked(smollm2: Gateway) -> None:
    client = smollm2.client()
    ask = 'Reply with a JSON object with the keys "name" and "age" for a cat called Tom, aged 3.'
    options: dict[str, Any] = {
        "model": "smollm2-hf",
        "messages": [{"role": "user", "content": ask}],
        "temperature": 0,
        "max_tokens": 40,
    }
    anything = client.chat.completions.create(**options, response_format={"type": "json_object"})
    assert json.loads(anything.choices[0].message.content or "") == {"name": "Tom", "age": 3}
    cat = {
        "type": "object",
        "properties": {"name": {"enum": ["Tom", "Felix"]}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    shaped = client.chat.completions.create(  # type: ignore[call-overload]
        **options, response_format=json_schema(cat)
    )
    assert json.loads(shaped.choices[0].message.content or "") == {"name": "Tom", "age": 3}


@pytest.mark.real_model
def test_the_real_smollm2_makes_the_named_call(smollm2: Gateway) -> None:
    answer = smollm2.client().chat.completions.create(  # type: ignore[call-overload]
        model="smollm2-hf",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
    )
    (call,) = answer.choices[0].message.tool_calls or []
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather"
    assert arguments["city"] == "Paris"
