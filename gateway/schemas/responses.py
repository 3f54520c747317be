"""/v1/responses wire types: the request, the Response object, and its stream's events.

Named and spelled as OpenAI's Responses API names them (`openai.types.responses` in the SDK).
Only function tools, text and the fields a stateless server can honour are modelled; the route
refuses the rest by name (see gateway/translate/responses.py).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from gateway.schemas.common import (
    KeepAlive,
    MaxTokens,
    RepeatPenalty,
    Seed,
    Temperature,
    TopK,
    TopLogprobs,
    TopP,
)

# The request ------------------------------------------------------------------------------------


class InputContent(msgspec.Struct):
    """A part of an input message's content: `input_text` (or `output_text`, in an assistant
    message sent back) is served; images, files and audio are refused by name."""

    type: str
    text: str | None = None


class InputItem(msgspec.Struct):
    """One item of `input`: a message (whose `type` may be left out), a `function_call` the
    model made, or a `function_call_output`. Other item types are refused by name. Fields an
    item sent back from a response carries (`id`, `status`, `annotations`) are ignored."""

    type: str | None = None
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list[InputContent] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputContent] | None = None


class FunctionTool(msgspec.Struct):
    """A tool, in the Responses API's flat shape: `{type: function, name, parameters, ...}`."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(msgspec.Struct):
    """`tool_choice` naming a function; other types (hosted tools, allowed_tools) are refused."""

    type: str
    name: str | None = None


class TextFormat(msgspec.Struct, omit_defaults=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponseCreateRequest(msgspec.Struct):
    """The body of POST /v1/responses. Fields OpenAI defines that change nothing here
    (`reasoning`, `service_tier`, `prompt_cache_key`, `stream_options`, ...) are accepted
    and ignored, as unknown fields are."""

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    # Accepted; nothing is kept (the server is stateless), and the response says store: false.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    include: list[str] | None = None
    #: With include message.output_text.logprobs: alternatives at each token.
    top_logprobs: TopLogprobs | None = None
    # Refused when set: each needs a response or conversation kept on the server.
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    prompt: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Extensions llama.cpp users expect, as on /v1/chat/completions.
    top_k: TopK | None = None
    min_p: TopP | None = None
    repeat_penalty: RepeatPenalty | None = None
    seed: Seed | None = None
    # Ollama's: how long the model stays loaded after this request.
    keep_alive: KeepAlive = None


# The Response object ----------------------------------------------------------------------------

ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputText(msgspec.Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(msgspec.Struct, kw_only=True, tag_field="type", tag="message"):
    id: str
    status: ItemStatus
    role: str = "assistant"
    content: list[OutputText]


class FunctionCallItem(msgspec.Struct, kw_only=True, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(msgspec.Struct):
    reason: Literal["max_output_tokens"]


class ResponseError(msgspec.Struct):
    #: One of OpenAI's codes for a failed response (server_error, rate_limit_exceeded, ...).
    code: str
    message: str


class Reasoning(msgspec.Struct):
    effort: None = None
    summary: None = None


class EchoedTool(msgspec.Struct, tag_field="type", tag="function"):
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    strict: bool | None


class EchoedToolChoice(msgspec.Struct, tag_field="type", tag="function"):
    name: str


class Response(msgspec.Struct, kw_only=True):
    """OpenAI's Response object; the request's settings are echoed back in it."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: None = None
    reasoning: Reasoning = msgspec.field(default_factory=Reasoning)
    store: bool = False
    background: bool = False
    temperature: float | None
    text: TextConfig
    tool_choice: Literal["none", "auto", "required"] | EchoedToolChoice
    tools: list[EchoedTool]
    top_p: float | None
    truncation: Literal["auto", "disabled"]
    usage: ResponseUsage | None = None
    user: str | None
    metadata: dict[str, str]


# The stream's events ----------------------------------------------------------------------------


class ResponseStreamEvent(msgspec.Struct, kw_only=True, tag_field="type"):
    #: Set as the event is sent: its place in the stream, from 0.
    sequence_number: int = 0


class ResponseCreatedEvent(ResponseStreamEvent, tag="response.created"):
    response: Response


class ResponseInProgressEvent(ResponseStreamEvent, tag="response.in_progress"):
    response: Response


class ResponseCompletedEvent(ResponseStreamEvent, tag="response.completed"):
    response: Response


class ResponseIncompleteEvent(ResponseStreamEvent, tag="response.incomplete"):
    response: Response


class ResponseFailedEvent(ResponseStreamEvent, tag="response.failed"):
    response: Response


class ResponseOutputItemAddedEvent(ResponseStreamEvent, tag="response.output_item.added"):
    output_index: int
    item: OutputItem


class ResponseOutputItemDoneEvent(ResponseStreamEvent, tag="response.output_item.done"):
    output_index: int
    item: OutputItem


class ResponseContentPartAddedEvent(ResponseStreamEvent, tag="response.content_part.added"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class ResponseContentPartDoneEvent(ResponseStreamEvent, tag="response.content_part.done"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class ResponseTextDeltaEvent(ResponseStreamEvent, tag="response.output_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


class ResponseTextDoneEvent(ResponseStreamEvent, tag="response.output_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []


class ResponseFunctionCallArgumentsDeltaEvent(
    ResponseStreamEvent, tag="response.function_call_arguments.delta"
):
    item_id: str
    output_index: int
    delta: str


class ResponseFunctionCallArgumentsDoneEvent(
    ResponseStreamEvent, tag="response.function_call_arguments.done"
):
    item_id: str
    output_index: int
    name: str
    arguments: str


class ResponseErrorEvent(ResponseStreamEvent, tag="error"):
    code: str | None
    message: str
    param: str | None
