"""Tool calls: parsed from the model's text in its family's format, streamed as OpenAI's deltas,
and forced by a grammar when tool_choice asks for a call."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pydantic
import pytest

from tests.conftest import Gateway, link_tree, write_model

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
UNIT = {
    "type": "function",
    "function": {
        "name": "set_unit",
        "description": "Choose the temperature unit",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["unit"],
        },
    },
}
#: A chat template that renders tools and asks for hermes-style calls, as Qwen's and Hermes' do.
HERMES_TEMPLATE = (
    "{% if tools %}<|system|>\nTools: {{ tools | tojson }}. Call one as "
    '<tool_call>{"name": ..., "arguments": ...}</tool_call></s>\n{% endif %}'
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tools_gateway(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, real_models: Path
) -> Iterator[Gateway]:
    models = tmp_path_factory.mktemp("tools")
    write_model(models, "echo-hermes", "backend: echo")
    write_model(models, "echo-llama3", "backend: echo\ntool_parser: llama3")
    write_model(models, "echo-mistral", "backend: echo\ntool_parser: mistral")
    shutil.copy(tiny_gguf, models / "tiny.gguf")
    template = json.dumps(HERMES_TEMPLATE)
    write_model(
        models, "tiny-hermes", f"backend: llama\nmodel: tiny.gguf\ncontext_size: 512\n"
        f"chat_template: {template}",
    )  # fmt: skip
    link_tree(real_models / "smollm2-135m-instruct", models / "smollm2-135m-instruct")
    gguf = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    write_model(models, "smollm2", f"backend: llama\nmodel: {gguf}\ncontext_size: 2048")
    gateway = Gateway(models).start()
    yield gateway
    gateway.cleanup()


@pytest.fixture(scope="module")
def client(tools_gateway: Gateway) -> openai.OpenAI:
    return tools_gateway.client()


def said(model: str, text: str, **extra: Any) -> dict[str, Any]:
    """A chat whose user message the echo backend answers with."""
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


HERMES_CALLS = (
    'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    '\n<tool_call>{"name": "set_unit", "arguments": {"unit": "celsius"}}</tool_call>'
)
FAMILIES = {
    "echo-hermes": HERMES_CALLS,
    "echo-llama3": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
    '{"name": "set_unit", "parameters": {"unit": "celsius"}}',
    "echo-mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
    '{"name": "set_unit", "arguments": {"unit": "celsius"}}]',
}


@pytest.mark.parametrize("model", FAMILIES)
def test_each_familys_calls_come_back_as_tool_calls(client: openai.OpenAI, model: str) -> None:
    answer = client.chat.completions.create(**said(model, FAMILIES[model], tools=[WEATHER, UNIT]))
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("set_unit", {"unit": "celsius"}),
    ]
    assert len({c.id for c in calls}) == 2
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    if model == "echo-hermes":
        assert choice.message.content == "Let me look. "
    else:
        assert choice.message.content is None


@pytest.mark.parametrize("model", FAMILIES)
def test_streamed_calls_are_deltas_with_their_own_index(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        **said(model, FAMILIES[model], tools=[WEATHER, UNIT]), stream=True
    )
    calls: dict[int, dict[str, str]] = {}
    pieces: dict[int, int] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                assert delta.function is not None
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
                pieces[delta.index] = pieces.get(delta.index, 0) + 1
    assert finish == "tool_calls"
    assert sorted(calls) == [0, 1]
    assert [calls[i]["name"] for i in (0, 1)] == ["get_weather", "set_unit"]
    assert all(calls[i]["id"].startswith("call_") for i in (0, 1))
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert json.loads(calls[1]["arguments"]) == {"unit": "celsius"}
    if model == "echo-hermes":
        # hermes calls stream as they are written: the id and name, then argument fragments
        # (echo writes a word at a time). llama3 and mistral answers are read whole.
        assert pieces[0] > 2
    else:
        assert pieces == {0: 1, 1: 1}


def test_text_that_only_looks_like_a_call_stays_text(client: openai.OpenAI) -> None:
    text = "Use <tool_call>not json</tool_call> and a < b <tool"
    answer = client.chat.completions.create(**said("echo-hermes", text, tools=[WEATHER]))
    assert answer.choices[0].message.content == text
    assert not answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason == "stop"


def test_tool_choice_none_leaves_the_text_alone(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        **said("echo-hermes", HERMES_CALLS, tools=[WEATHER], tool_choice="none")
    )
    assert answer.choices[0].message.content == HERMES_CALLS
    assert not answer.choices[0].message.tool_calls


def test_a_response_without_calls_has_no_tool_calls_key(tools_gateway: Gateway) -> None:
    import httpx

    body = said("echo-hermes", "just words", tools=[WEATHER])
    reply = httpx.post(f"{tools_gateway.url}/v1/chat/completions", json=body, timeout=30).json()
    message = reply["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "just words", "refusal": None}
    assert "system_fingerprint" not in reply


def test_a_tool_choice_naming_an_unknown_function_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            **said("echo-hermes", "x", tools=[WEATHER]),
            tool_choice={"type": "function", "function": {"name": "launch_rockets"}},
        )
    assert "launch_rockets" in str(caught.value)


# The parser on its own: what a model may write ------------------------------------------------

NAMES = ("get_weather", "set_unit", "f", "g")
PARSED: dict[str, tuple[str, str, list[tuple[str, dict[str, Any]]], str]] = {
    "a JSON answer that is no call": ("llama3", '{"name": "Alice", "age": 30}', [], "same"),
    "an unknown function": (
        "hermes",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
        [],
        "same",
    ),
    "arguments that are not JSON": (
        "hermes",
        '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
        [],
        "same",
    ),
    "arguments as JSON text": (
        "hermes",
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        [("f", {"a": 1})],
        "",
    ),
    "a closing tag inside a string": (
        "hermes",
        '<tool_call>{"name": "f", "arguments": {"s": "</tool_call>"}}</tool_call> done',
        [("f", {"s": "</tool_call>"})],
        " done",
    ),
    "an escaped quote before a semicolon": (
        "llama3",
        '{"name": "f", "parameters": {"q": "a\\";"}}; {"name": "g", "parameters": {}}',
        [("f", {"q": 'a";'}), ("g", {})],
        "",
    ),
    "mistral's newer form, twice": (
        "mistral",
        '[TOOL_CALLS]f[ARGS]{"a": "y[ARGS]z"}[TOOL_CALLS]g[ARGS]{}',
        [("f", {"a": "y[ARGS]z"}), ("g", {})],
        "",
    ),
    "mistral's newer form with text after it": (
        "mistral",
        '[TOOL_CALLS]f[ARGS]{"a": 1} and then some',
        [],
        "same",
    ),
    "a call cut short": ("hermes", 'Hi <tool_call>{"name": "f", "argu', [], "same"),
}


@pytest.mark.parametrize("case", PARSED)
def test_the_parser_returns_calls_only_where_the_model_wrote_valid_ones(case: str) -> None:
    from backends.runtime.tools import ToolCallParser

    family, text, expected, rest = PARSED[case]
    for size in (1, 3, len(text)):  # however the text is cut into pieces
        parser = ToolCallParser(family, NAMES)
        shown, calls = "", []
        for start in range(0, len(text), size):
            piece, found = parser.feed(text[start : start + size])
            shown, calls = shown + piece, calls + found
        piece, found = parser.finish()
        shown, calls = shown + piece, calls + found
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == expected
        assert shown == (text if rest == "same" else rest)


def test_parallel_tool_calls_false_returns_one_call(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        **said("echo-hermes", HERMES_CALLS, tools=[WEATHER, UNIT]), parallel_tool_calls=False
    )
    calls = answer.choices[0].message.tool_calls
    assert calls is not None
    assert [c.function.name for c in calls] == ["get_weather"]


# Forced calls: a grammar from the tools' schemas ---------------------------------------------


@pytest.mark.llama
@pytest.mark.parametrize("choice", ["required", "named"])
def test_a_forced_call_from_a_tiny_random_model_is_valid(
    client: openai.OpenAI, choice: str
) -> None:
    tool_choice: Any = "required"
    if choice == "named":
        tool_choice = {"type": "function", "function": {"name": "set_unit"}}
    answer = client.chat.completions.create(
        model="tiny-hermes",
        messages=[{"role": "user", "content": "which unit?"}],
        tools=[UNIT],  # only enum arguments: a random model cannot wander off in a string
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=200,  # the tiny vocabulary spells much of it a character at a time
    )
    choice_ = answer.choices[0]
    assert choice_.finish_reason == "tool_calls", choice_.message
    assert choice_.message.tool_calls is not None
    (call,) = choice_.message.tool_calls
    assert call.function.name == "set_unit"
    assert json.loads(call.function.arguments)["unit"] in ("celsius", "fahrenheit")


class Weather(pydantic.BaseModel):
    city: str


@pytest.mark.llama
@pytest.mark.real_model
def test_the_sdks_pydantic_tool_helpers_work_with_a_template_without_tools(
    client: openai.OpenAI,
) -> None:
    # SmolLM2's template renders no tools: they are described in a system message, and the
    # named call is forced by the grammar.
    tool = openai.pydantic_function_tool(Weather, name="get_weather")
    completion = client.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=48,
    )
    message = completion.choices[0].message
    assert message.tool_calls
    parsed = message.tool_calls[0].function.parsed_arguments
    assert isinstance(parsed, Weather)
    assert parsed.city


@pytest.mark.llama
@pytest.mark.real_model
def test_a_history_with_calls_and_their_results_is_accepted(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="smollm2",
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21}'},
        ],
        tools=[WEATHER],
        temperature=0,
        max_tokens=24,
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


def test_hermes_calls_stream_their_arguments_as_they_are_written() -> None:
    from backends.runtime.tools import ToolCallParser

    def run(text: str, **kwargs: Any) -> tuple[str, list[Any], list[Any]]:
        parser = ToolCallParser("hermes", NAMES, **kwargs)
        shown, calls, deltas = "", [], []
        for start in range(0, len(text), 2):
            piece, found = parser.feed(text[start : start + 2])
            shown, calls, deltas = shown + piece, calls + found, deltas + parser.take_deltas()
        piece, found = parser.finish()
        return shown + piece, calls + found, deltas + parser.take_deltas()

    text = 'Hi <tool_call>{"name": "f", "arguments": {"a": "}{", "b": [1]}}</tool_call>'
    shown, calls, deltas = run(text)
    assert shown == "Hi "
    (call,) = calls
    assert (deltas[0].index, deltas[0].id, deltas[0].name) == (0, call.id, "f")
    assert len(deltas) > 3  # the arguments in pieces, braces inside strings no end to them
    assert "".join(d.arguments for d in deltas) == call.function.arguments
    assert json.loads(call.function.arguments) == {"a": "}{", "b": [1]}
    # A call whose arguments had begun streaming stays a call when the model breaks off, with
    # what it wrote (its deltas were sent); the closing tag is not part of it.
    shown, calls, deltas = run('<tool_call>{"name": "f", "arguments": {"a": 1</tool_call>')
    assert shown == ""
    assert [c.function.arguments for c in calls] == ['{"a": 1']
    assert "".join(d.arguments for d in deltas) == '{"a": 1'
    # A function the request does not offer is not streamed, nor a second call where one is
    # the most (parallel_tool_calls false).
    shown, calls, deltas = run('<tool_call>{"name": "nope", "arguments": {}}</tool_call>')
    assert (calls, deltas) == ([], [])
    two = '<tool_call>{"name": "f", "arguments": {}}</tool_call>' * 2
    shown, calls, deltas = run(two, most=1)
    assert len(calls) == 1
    assert {d.index for d in deltas} == {0}
