"""POST /v1/responses, stateless: the openai SDK's `client.responses.create` against a real
gateway, with echo models (which answer with the last user message, and parse it for hermes
tool calls) and the tiny random GGUF for a real engine."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest

from tests.conftest import Gateway, write_model

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TEXT_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
CALL_EVENTS = [
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
]


@pytest.fixture(scope="module")
def responses_gateway(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path
) -> Iterator[Gateway]:
    models = tmp_path_factory.mktemp("responses")
    write_model(models, "echo", "backend: echo")
    write_model(
        models,
        "echo-fail-before",
        "backend: echo\noptions: {fail_code: INVALID_ARGUMENT, fail_after_words: 0, "
        "fail_reason: context_length_exceeded, fail_message: 'prompt too long for echo'}",
    )
    write_model(
        models,
        "echo-fail-mid",
        "backend: echo\noptions: {fail_code: INTERNAL, fail_after_words: 2}",
    )
    shutil.copy(tiny_gguf, models / "tiny-llama.gguf")
    write_model(models, "tiny-llama", "backend: llama\nmodel: tiny-llama.gguf\ncontext_size: 256")
    gateway = Gateway(models).start()
    yield gateway
    gateway.cleanup()


@pytest.fixture(scope="module")
def client(responses_gateway: Gateway) -> openai.OpenAI:
    return responses_gateway.client()


def words(text: str) -> int:
    """How many tokens echo counts in `text`: its words."""
    return len(text.split())


def events_of(stream: Any) -> list[Any]:
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def collapsed(types: list[str]) -> list[str]:
    """Event types with each run of text or argument deltas as one."""
    runs = {"response.output_text.delta", "response.function_call_arguments.delta"}
    out: list[str] = []
    for kind in types:
        if not (kind in runs and out and out[-1] == kind):
            out.append(kind)
    return out


# Plain text ---------------------------------------------------------------------------------------


def test_a_string_input_is_answered_as_a_completed_response(client: openai.OpenAI) -> None:
    response = client.responses.create(model="echo", input="hello there, world")
    assert response.output_text == "hello there, world"
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.model == "echo"
    (message,) = response.output
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.status == "completed"
    assert message.id.startswith("msg_")
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (3, 3)
    assert response.usage.total_tokens == 6
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.incomplete_details is None


def test_an_item_list_with_instructions_reaches_the_model_whole(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="echo",
        instructions="be brief please",
        input=[
            {"role": "user", "content": "first question"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "an answer"}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "second "},
                    {"type": "input_text", "text": "question"},
                ],
            },
        ],
    )
    assert response.output_text == "second question"
    assert response.instructions == "be brief please"
    # Echo counts the words of every message it was given: the instructions are one of them.
    assert response.usage is not None
    assert response.usage.input_tokens == words("be brief please first question an answer") + 2


def test_the_request_settings_are_echoed_back(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="echo",
        input="hi",
        temperature=0.5,
        top_p=0.9,
        max_output_tokens=50,
        metadata={"ticket": "42"},
        store=True,
        tools=[WEATHER],
        tool_choice="none",
    )
    assert (response.temperature, response.top_p, response.max_output_tokens) == (0.5, 0.9, 50)
    assert response.metadata == {"ticket": "42"}
    assert response.tool_choice == "none"
    assert [t.name for t in response.tools] == ["get_weather"]
    assert response.text is not None
    assert response.text.format is not None
    assert response.text.format.type == "text"
    # Nothing was kept, and the response says so.
    assert response.model_extra is not None
    assert response.model_extra["store"] is False


def test_a_stream_sends_openais_events_in_order(client: openai.OpenAI) -> None:
    events = events_of(client.responses.create(model="echo", input="one two three", stream=True))
    types = [e.type for e in events]
    assert collapsed(types) == [
        "response.created",
        "response.in_progress",
        *TEXT_EVENTS,
        "response.completed",
    ]
    assert events[0].response.status == "in_progress"
    assert events[0].response.output == []
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 3
    assert "".join(d.delta for d in deltas) == "one two three"
    item_id = events[2].item.id
    assert {e.item_id for e in deltas} == {item_id}
    done = events[-1].response
    assert done.status == "completed"
    assert done.id == events[0].response.id
    assert done.output_text == "one two three"
    assert done.output[0].id == item_id
    assert done.usage is not None
    assert done.usage.output_tokens == 3


def test_a_stream_has_no_done_marker(responses_gateway: Gateway) -> None:
    # OpenAI's Responses stream ends with its last event; a client that parses every data line
    # as JSON would choke on chat's [DONE].
    body = {"model": "echo", "input": "a b", "stream": True}
    with httpx.stream("POST", f"{responses_gateway.url}/v1/responses", json=body) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line.startswith("data:")]
    data = [json.loads(line.removeprefix("data:")) for line in lines]
    assert data[-1]["type"] == "response.completed"


class Verdict(pydantic.BaseModel):
    ok: bool


def test_the_sdks_stream_and_parse_helpers_work(client: openai.OpenAI) -> None:
    # The stream helper rebuilds the response from the events' ids and indices: it fails on a
    # delta for an item or part it was not told of.
    with client.responses.stream(
        model="echo",
        input=f"Let me look. {CALL}",
        tools=[WEATHER],
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == "Let me look. "
    assert [item.type for item in final.output] == ["message", "function_call"]
    # Echo ignores the format, and answers with JSON because it is given JSON.
    parsed = client.responses.parse(model="echo", input='{"ok": true}', text_format=Verdict)
    assert parsed.output_parsed == Verdict(ok=True)


# Limits -------------------------------------------------------------------------------------------


def test_max_output_tokens_leaves_the_response_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="echo", input="one two three four five", max_output_tokens=2
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "one two"
    assert response.output[0].status == "incomplete"
    events = events_of(
        client.responses.create(
            model="echo", input="one two three four five", max_output_tokens=2, stream=True
        )
    )
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == "one two"


@pytest.mark.parametrize("stream", [False, True])
def test_a_failure_before_generation_is_an_http_error(client: openai.OpenAI, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="echo-fail-before", input="hi", stream=stream)
    assert caught.value.code == "context_length_exceeded"
    assert "prompt too long for echo" in str(caught.value)


def test_a_failure_mid_stream_is_an_error_event_then_a_failed_response(
    client: openai.OpenAI,
) -> None:
    stream = client.responses.create(model="echo-fail-mid", input="one two three four", stream=True)
    events = events_of(stream)
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert "echo failed on purpose" in events[-2].message
    failed = events[-1].response
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.code == "server_error"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "one two"
    assert failed.output_text == "one two"


# Tools --------------------------------------------------------------------------------------------


def test_a_call_comes_back_as_a_function_call_item(client: openai.OpenAI) -> None:
    response = client.responses.create(model="echo", input=CALL, tools=[WEATHER])
    (call,) = response.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_")
    assert call.id is not None
    assert call.id.startswith("fc_")
    assert call.status == "completed"
    assert response.output_text == ""


def test_a_calls_output_sent_back_completes_the_round_trip(client: openai.OpenAI) -> None:
    first = client.responses.create(model="echo", input=CALL, tools=[WEATHER])
    call = first.output[0]
    assert call.type == "function_call"
    result = "sunny and 21 degrees"
    # As an agent does it: the input so far, the response's output items, then each result.
    second = client.responses.create(
        model="echo",
        tools=[WEATHER],
        input=[
            {"role": "user", "content": CALL},
            *first.output,
            {"type": "function_call_output", "call_id": call.call_id, "output": result},
            {"role": "user", "content": "thanks"},
        ],
    )
    assert second.status == "completed"
    assert second.output_text == "thanks"
    # The result reached the model: echo counts the words of every message it was given.
    assert second.usage is not None
    assert second.usage.input_tokens == words(CALL) + words(result) + 1


def test_an_output_for_a_call_never_made_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model="echo",
            input=[
                {"role": "user", "content": "hi"},
                {"type": "function_call_output", "call_id": "call_nope", "output": "x"},
            ],
        )
    assert "call_nope" in str(caught.value)
    assert caught.value.body["param"] == "input[1].call_id"


def test_a_streamed_call_sends_its_item_and_argument_events(client: openai.OpenAI) -> None:
    stream = client.responses.create(
        model="echo",
        input=f"Let me look. {CALL}",
        tools=[WEATHER],
        stream=True,
    )
    events = events_of(stream)
    assert collapsed([e.type for e in events]) == [
        "response.created",
        "response.in_progress",
        *TEXT_EVENTS,
        *CALL_EVENTS,
        "response.completed",
    ]
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [(e.output_index, e.item.type) for e in added] == [(0, "message"), (1, "function_call")]
    assert added[1].item.status == "in_progress"
    arguments = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(arguments.arguments) == {"city": "Paris"}
    assert arguments.item_id == added[1].item.id
    # The arguments stream as the model writes them: in pieces that add up to the whole.
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1
    assert "".join(pieces) == arguments.arguments
    final = events[-1].response
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert final.output_text == "Let me look. "
    assert final.output[1].name == "get_weather"


def test_tool_choice_none_leaves_a_call_as_text(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="echo",
        input=CALL,
        tools=[WEATHER],
        tool_choice="none",
    )
    assert response.output_text == CALL
    assert [item.type for item in response.output] == ["message"]


def test_a_tool_choice_naming_an_unknown_function_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model="echo",
            input="hi",
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "launch_rockets"},
        )
    assert "launch_rockets" in str(caught.value)


def test_hosted_tools_are_refused_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model="echo",
            input="hi",
            tools=[WEATHER, {"type": "web_search"}],
        )
    assert "'web_search'" in str(caught.value)
    assert caught.value.body["param"] == "tools[1].type"


# What a stateless server refuses ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("previous_response_id", "resp_123"), ("conversation", "conv_123")],
)
def test_stored_state_is_refused_with_a_400_that_says_why(
    client: openai.OpenAI, field: str, value: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="echo", input="hi", **{field: value})
    assert caught.value.body["param"] == field
    assert "stateless" in str(caught.value)


def test_an_unknown_include_is_a_400_and_a_known_one_is_ignored(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="echo", input="hi", include=["everything"])
    assert "'everything'" in str(caught.value)
    response = client.responses.create(
        model="echo", input="hi", include=["reasoning.encrypted_content"], store=False
    )
    assert response.output_text == "hi"


def test_an_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="no-such-model", input="hi")
    assert caught.value.body["param"] == "model"
    assert caught.value.code == "model_not_found"


def test_a_json_schema_format_without_a_schema_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model="echo",
            input="hi",
            text={"format": {"type": "json_schema", "name": "x"}},
        )
    assert caught.value.body["param"] == "text.format.schema"


# A real engine ------------------------------------------------------------------------------------


@pytest.mark.llama
def test_a_tiny_llama_answers_plain_and_streamed_alike(client: openai.OpenAI) -> None:
    options: dict[str, Any] = {
        "model": "tiny-llama",
        "input": "hello there",
        "temperature": 0,
        "max_output_tokens": 8,
    }
    whole = client.responses.create(**options)
    assert whole.status == "incomplete"
    assert whole.output_text
    assert whole.usage is not None
    assert whole.usage.output_tokens == 8
    events = events_of(client.responses.create(**options, stream=True))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == whole.output_text
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == whole.output_text


@pytest.mark.llama
def test_a_json_schema_text_format_constrains_a_real_model(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model="tiny-llama",
        input="hello there",
        temperature=0,
        max_output_tokens=60,
        text={
            "format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}
        },
    )
    assert response.text is not None
    assert response.text.format is not None
    assert response.text.format.type == "json_schema"
    # A random model writes JSON, and stops, only because the schema's grammar makes it.
    assert response.status == "completed", response.output_text
    assert json.loads(response.output_text)["ok"] in (True, False)


@pytest.mark.llama
def test_a_schema_the_engine_cannot_follow_is_a_400_naming_text_format(
    client: openai.OpenAI,
) -> None:
    unenforceable = {"type": "object", "not": {"required": ["a"]}}  # `not`: no grammar can
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model="tiny-llama",
            input="hi",
            max_output_tokens=4,
            text={"format": {"type": "json_schema", "name": "x", "schema": unenforceable}},
        )
    assert caught.value.code == "invalid_json_schema"
    assert caught.value.body["param"] == "text.format"


def test_an_input_with_no_message_is_a_400_naming_input(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(
            model="echo",
            input=[{"type": "reasoning", "id": "rs_1", "summary": []}],  # type: ignore[list-item]
        )
    assert refused.value.body["param"] == "input"  # type: ignore[index]


def test_include_logprobs_gives_each_tokens_log_probability(client: openai.OpenAI) -> None:
    include: Any = ["message.output_text.logprobs"]
    response = client.responses.create(
        model="echo", input="one two three", include=include, top_logprobs=1
    )
    (part,) = response.output[0].content  # type: ignore[union-attr]
    assert [lp.token for lp in part.logprobs] == ["one", " two", " three"]  # type: ignore[union-attr]
    assert all(lp.top_logprobs[0].token == lp.token for lp in part.logprobs)  # type: ignore[union-attr]
    events = events_of(
        client.responses.create(model="echo", input="one two three", include=include, stream=True)
    )
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    for delta in deltas:
        assert "".join(lp.token for lp in delta.logprobs) == delta.delta
    done = next(e for e in events if e.type == "response.output_text.done")
    assert len(done.logprobs) == 3
    # Not asked for: none.
    plain = client.responses.create(model="echo", input="one two")
    assert plain.output[0].content[0].logprobs == []  # type: ignore[union-attr]
