"""Ollama's /api/* wire types, spelled as Ollama spells them (api/types.go).

Requests accept and ignore the fields Hearth does not use (msgspec skips unknown keys), so that
Ollama's clients work unchanged; the ones whose absence would change an answer are checked by
the translation, which refuses them by name.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from gateway.schemas.chat import TokenLogprob
from gateway.schemas.common import (
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    KeepAlive,
    Penalty,
    RepeatPenalty,
    Temperature,
    TopK,
    TopLogprobs,
    TopP,
)

#: Ollama's num_predict: a token budget; -1 (its default) is none, -2 fills the context.
NumPredict = Annotated[int, msgspec.Meta(ge=-2, le=INT32_MAX)]
#: Ollama's seed: -1 (its default) draws a new one for each request.
OllamaSeed = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
#: A JSON schema, or "json" for any JSON object ("" for none).
Format = str | dict[str, Any] | None


class Options(msgspec.Struct):
    """The sampling options Hearth applies; the rest (num_ctx, num_gpu, num_thread, mirostat,
    ...) are load settings or samplers it does not have, accepted and ignored."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: TopP | None = None
    num_predict: NumPredict | None = None
    stop: str | list[str] | None = None
    seed: OllamaSeed | None = None
    repeat_penalty: RepeatPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None


class ToolCallFunction(msgspec.Struct):
    name: str
    #: An object, not OpenAI's JSON text.
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)
    #: The call's place among the answer's calls.
    index: int = 0


class ToolCall(msgspec.Struct, omit_defaults=True):
    function: ToolCallFunction
    id: str | None = None


class Message(msgspec.Struct):
    role: str
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class ToolFunction(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(msgspec.Struct):
    function: ToolFunction
    type: str = "function"


class ChatRequest(msgspec.Struct):
    model: str
    #: None or empty: load the model (with keep_alive 0: unload it).
    messages: list[Message] | None = None
    tools: list[Tool] | None = None
    format: Format = None
    options: Options | None = None
    #: Ollama streams unless told not to (null too).
    stream: bool | None = None
    keep_alive: KeepAlive = None
    #: Accepted: models here do not think apart from their answer.
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    think: bool | str | None = None


class GenerateRequest(msgspec.Struct):
    model: str
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    format: Format = None
    options: Options | None = None
    stream: bool | None = None
    keep_alive: KeepAlive = None
    images: list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    think: bool | str | None = None


class EmbedRequest(msgspec.Struct):
    model: str
    input: str | list[str] | None = None
    #: Accepted: whether a long input is cut is the model's (its YAML's options.truncate).
    truncate: bool | None = None
    dimensions: Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)] | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class EmbeddingsRequest(msgspec.Struct):
    """The legacy /api/embeddings: one prompt, one vector."""

    model: str
    prompt: str | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class ShowRequest(msgspec.Struct):
    model: str | None = None
    #: The older spelling of `model`.
    name: str | None = None
    verbose: bool | None = None


class ResponseMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str
    tool_calls: list[ToolCall] | None = None


class ChatResponse(msgspec.Struct, omit_defaults=True):
    """A piece of a chat's answer, or (done) the whole or its end with the figures: durations in
    nanoseconds, counts in tokens, absent on the pieces before the last."""

    model: str
    created_at: str
    message: ResponseMessage
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    logprobs: list[TokenLogprob] | None = None


class GenerateResponse(msgspec.Struct, omit_defaults=True):
    """A piece of a generation, or its whole or its end, with the same figures as chat's."""

    model: str
    created_at: str
    response: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    logprobs: list[TokenLogprob] | None = None


class EmbedResponse(msgspec.Struct, omit_defaults=True):
    model: str
    embeddings: list[list[float]]
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


class EmbeddingsResponse(msgspec.Struct):
    embedding: list[float]


class ModelDetails(msgspec.Struct):
    """What a model's files say it is; unknowns are empty strings, as Ollama leaves them."""

    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str
    parent_model: str = ""


class ListModel(msgspec.Struct):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class ListResponse(msgspec.Struct):
    models: list[ListModel]


class ProcessModel(msgspec.Struct):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    #: No GPU here: nothing is in video memory.
    size_vram: int
    context_length: int


class ProcessResponse(msgspec.Struct):
    models: list[ProcessModel]


class ShowResponse(msgspec.Struct):
    modelfile: str
    parameters: str
    template: str
    system: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(msgspec.Struct):
    version: str
