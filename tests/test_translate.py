"""Wire ⇄ protobuf translation, without processes."""

from __future__ import annotations

import base64
import struct

import msgspec
import pytest

from gateway.config import ModelConfig, Parameters
from gateway.errors import OpenAIError
from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.completions import CompletionRequest
from gateway.schemas.embeddings import EmbeddingRequest
from gateway.translate import embeddings, text
from protos.hearth.backend.v1 import backend_pb2 as pb


def chat_request(**fields: object) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.convert(body, ChatCompletionRequest)


CONFIG = ModelConfig(name="m", backend="echo")


def test_request_values_win_over_yaml_defaults() -> None:
    config = ModelConfig(
        name="m", backend="echo", parameters=Parameters(temperature=0.3, top_k=20, max_tokens=50)
    )
    generate = text.chat_request(chat_request(temperature=1.0, max_tokens=9), config)
    sampling = generate.sampling
    assert sampling.temperature == pytest.approx(1.0)
    assert sampling.max_tokens == 9
    assert sampling.top_k == 20
    assert not sampling.HasField("top_p"), "unset stays unset so the backend's default applies"


def test_max_completion_tokens_is_the_newer_name_for_max_tokens() -> None:
    generate = text.chat_request(chat_request(max_completion_tokens=7), CONFIG)
    assert generate.sampling.max_tokens == 7


def test_stop_as_string_or_list() -> None:
    assert list(text.chat_request(chat_request(stop="END"), CONFIG).sampling.stop) == ["END"]
    assert list(text.chat_request(chat_request(stop=["a", "b"]), CONFIG).sampling.stop) == [
        "a",
        "b",
    ]


def test_messages_tools_and_schema_carry_over() -> None:
    request = chat_request(
        messages=[
            {"role": "system", "content": "be kind"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="auto",
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object"}},
        },
    )
    generate = text.chat_request(request, CONFIG)
    messages = generate.chat.messages
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[1].content == "ab"
    assert not messages[2].HasField("content")
    assert messages[2].tool_calls[0].function.name == "f"
    assert messages[3].tool_call_id == "c1"
    assert generate.chat.tools[0].parameters_json == '{"type": "object"}'
    assert generate.chat.tool_choice == "auto"
    assert generate.response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA


def test_yaml_system_prompt_is_added_only_when_the_chat_has_none() -> None:
    config = ModelConfig(name="m", backend="echo", system_prompt="You are Hearth.")
    added = text.chat_request(chat_request(), config).chat.messages
    assert [(m.role, m.content) for m in added] == [("system", "You are Hearth."), ("user", "hi")]
    own = chat_request(
        messages=[{"role": "system", "content": "mine"}, {"role": "user", "content": "x"}]
    )
    assert text.chat_request(own, config).chat.messages[0].content == "mine"


def test_image_parts_are_refused_with_the_field_named() -> None:
    request = chat_request(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    )
    with pytest.raises(OpenAIError) as caught:
        text.chat_request(request, CONFIG)
    assert caught.value.status == 400
    assert caught.value.param == "messages[0].content"


def test_a_list_of_several_prompts_is_refused() -> None:
    request = msgspec.convert({"model": "m", "prompt": ["a", "b"]}, CompletionRequest)
    with pytest.raises(OpenAIError, match="one prompt"):
        text.completion_request(request, CONFIG)


def test_stream_chunks_end_with_finish_then_usage() -> None:
    chunks = text.ChatChunks(id="chatcmpl-1", created=1, model="m", include_usage=True)
    assert chunks.opening(1)[0].choices[0].delta.role == "assistant"
    assert chunks.piece(pb.GenerateStreamResponse(text="hi"))[0].choices[0].delta.content == "hi"
    usage = pb.Usage(prompt_tokens=3, completion_tokens=2)
    final = chunks.piece(
        pb.GenerateStreamResponse(finish_reason=pb.FINISH_REASON_LENGTH, usage=usage)
    )
    assert [c.choices[0].finish_reason for c in final] == ["length"]
    closing = chunks.closing(usage)
    assert closing[0].choices == []
    assert closing[0].usage is not None
    assert closing[0].usage.total_tokens == 5
    assert {c.id for c in final + closing} == {"chatcmpl-1"}


def test_a_second_choice_s_chunks_carry_its_index() -> None:
    chunks = text.ChatChunks(id="chatcmpl-1", created=1, model="m", include_usage=False)
    assert [c.choices[0].index for c in chunks.opening(2)] == [0, 1]
    call = pb.ToolCall(id="call_1", type="function", function=pb.FunctionCall(name="f"))
    first = chunks.piece(pb.GenerateStreamResponse(tool_calls=[call]), 1)
    again = chunks.piece(pb.GenerateStreamResponse(tool_calls=[call]), 1)
    other = chunks.piece(pb.GenerateStreamResponse(tool_calls=[call]), 0)
    assert first[0].choices[0].index == 1
    # A call's index counts its own choice's calls.
    indexes = []
    for chunk in (first, again, other):
        calls = chunk[0].choices[0].delta.tool_calls
        assert calls is not None
        indexes.append(calls[0]["index"])
    assert indexes == [0, 1, 0]
    assert chunks.closing(pb.Usage()) == []


@pytest.mark.parametrize(
    ("given", "kinds"),
    [
        ("one", ["text"]),
        (["a", "b"], ["text", "text"]),
        ([1, 2, 3], ["tokens"]),
        ([[1], [2, 3]], ["tokens", "tokens"]),
    ],
)
def test_embedding_inputs(given: object, kinds: list[str]) -> None:
    request = msgspec.convert({"model": "m", "input": given}, EmbeddingRequest)
    converted = embeddings.embed_request(request)
    assert [i.WhichOneof("input") for i in converted.inputs] == kinds


def test_base64_is_little_endian_float32_of_the_same_values() -> None:
    response = pb.EmbedResponse(
        embeddings=[pb.Embedding(values=[0.5, -1.25, 3.0])], prompt_tokens=1
    )
    encoded = embeddings.embedding_response(response, model="m", encoding_format="base64")
    raw = base64.b64decode(encoded.data[0].embedding)  # type: ignore[arg-type]
    assert struct.unpack("<3f", raw) == (0.5, -1.25, 3.0)


def test_completion_logprobs_name_split_characters_and_count_them_once() -> None:
    """A character written over two byte tokens: both named by their bytes, as OpenAI names
    them, and text_offset counts the character once."""
    items = [
        pb.TokenLogprob(token="a", logprob=-0.1, token_bytes=b"a"),
        pb.TokenLogprob(token="\ufffd", logprob=-0.2, token_bytes=b"\xc3"),
        pb.TokenLogprob(token="\ufffd", logprob=-0.3, token_bytes=b"\xa9"),
        pb.TokenLogprob(token="x", logprob=-0.4, token_bytes=b"x"),
    ]
    result = text.completion_logprobs(items, text.TextOffsets(start=5))
    assert result.tokens == ["a", "bytes:\\xc3", "bytes:\\xa9", "x"]
    assert result.text_offset == [5, 6, 6, 7]  # "a" at 5, "é" at 6, "x" at 7
