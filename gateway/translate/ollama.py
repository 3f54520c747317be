"""Ollama's requests as the gateway's own (OpenAI-shaped) ones, and backend answers back in
Ollama's shape.

A chat or a generation becomes a ChatCompletionRequest or CompletionRequest, which
`translate.text` turns into the backend's GenerateRequest: the model YAML's defaults, its system
prompt, tools and response formats then work exactly as on /v1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from gateway.config import ModelConfig
from gateway.errors import invalid_request
from gateway.schemas import ollama
from gateway.schemas.chat import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    JSONSchema,
    ResponseFormat,
    TokenLogprob,
    Tool,
    ToolCall,
)
from gateway.schemas.completions import CompletionRequest
from gateway.translate import text
from protos.hearth.backend.v1 import backend_pb2 as pb

#: The Ollama release whose API these routes follow (tool call ids, embed dimensions, think):
#: clients decide from it what they may ask for.
OLLAMA_VERSION = "0.12.0"
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
#: Ollama's done_reason for each finish; a call is a stop, as Ollama reports it.
DONE_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "stop",
}
_NANOSECONDS = 1_000_000_000


def _sampling(options: ollama.Options | None) -> dict[str, Any]:
    """Ollama's options as the OpenAI request's fields (None: the model YAML's default)."""
    if options is None:
        return {}
    predict = options.num_predict
    seed = options.seed
    return {
        "temperature": options.temperature,
        "top_p": options.top_p,
        "top_k": options.top_k,
        "min_p": options.min_p,
        # -1 (none) and -2 (fill the context) both mean: until a stop or the context's end.
        "max_tokens": predict if predict is not None and predict > 0 else None,
        "stop": options.stop,
        # -1 is Ollama's "a new seed each time"; llama.cpp reads any negative seed so.
        "seed": seed if seed is not None and seed >= 0 else None,
        "repeat_penalty": options.repeat_penalty,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
    }


def _logprobs(body: ollama.ChatRequest | ollama.GenerateRequest) -> dict[str, Any]:
    """Ollama's logprobs and top_logprobs, as chat's (top_logprobs alone asks for nothing)."""
    if not body.logprobs:
        return {}
    return {"logprobs": True, "top_logprobs": body.top_logprobs or 0}


def logprobs(items: Iterable[pb.TokenLogprob]) -> list[TokenLogprob]:
    """Token log-probabilities in Ollama's shape (chat's)."""
    return text.token_logprobs(items)


def _response_format(value: ollama.Format) -> ResponseFormat | None:
    if value is None or value == "":
        return None
    if value == "json":
        return ResponseFormat(type="json_object")
    if isinstance(value, dict):
        return ResponseFormat(
            type="json_schema", json_schema=JSONSchema(name="format", schema=value)
        )
    raise invalid_request('format must be "json" or a JSON schema (an object)', param="format")


def _no_images(images: list[str] | None, param: str) -> None:
    if images:
        raise invalid_request(
            "images are not supported: the models here read text only", param=param
        )


def chat_request(body: ollama.ChatRequest) -> ChatCompletionRequest:
    """A chat with messages as the gateway's chat completion request."""
    messages = []
    for index, message in enumerate(body.messages or []):
        where = f"messages[{index}]"
        role = message.role.lower()  # as Ollama reads it
        if role not in ROLES:
            raise invalid_request(
                f"{where}.role: '{message.role}' is not one of {', '.join(sorted(ROLES))}",
                param=f"{where}.role",
            )
        _no_images(message.images, f"{where}.images")
        calls = [
            ToolCall(
                id=call.id or "",
                function=FunctionCall(
                    name=call.function.name,
                    arguments=json.dumps(call.function.arguments, ensure_ascii=False),
                ),
            )
            for call in message.tool_calls or []
        ]
        messages.append(
            ChatMessage(
                role=role,  # type: ignore[arg-type]  # checked against ROLES above
                content=message.content or "",
                name=message.tool_name,
                tool_calls=calls or None,
                tool_call_id=message.tool_call_id,
            )
        )
    tools = []
    for index, tool in enumerate(body.tools or []):
        if tool.type != "function":
            raise invalid_request(
                f"tools[{index}].type: only function tools exist, not '{tool.type}'",
                param=f"tools[{index}].type",
            )
        function = tool.function
        tools.append(
            Tool(
                function=FunctionDefinition(
                    name=function.name,
                    description=function.description,
                    parameters=function.parameters,
                )
            )
        )
    return ChatCompletionRequest(
        model=body.model,
        messages=messages,
        tools=tools or None,
        response_format=_response_format(body.format),
        **_sampling(body.options),
        **_logprobs(body),
    )


def generate_request(body: ollama.GenerateRequest) -> ChatCompletionRequest | CompletionRequest:
    """A generation with a prompt as the gateway's request: the prompt as a user message under
    the model's chat template, or as it is (`raw`, or with a `suffix` to fill in before: Ollama
    writes those with the model's infill format, not its chat template)."""
    _no_images(body.images, "images")
    if body.template:
        raise invalid_request(
            "template is not supported: the model's own chat template (or its YAML's "
            "chat_template) is applied; send raw: true with a prompt written out in full",
            param="template",
        )
    if body.context:
        raise invalid_request(
            "context is not supported: send the conversation to /api/chat as messages",
            param="context",
        )
    sampling = _sampling(body.options)
    prompt = body.prompt or ""
    if body.raw or body.suffix:
        if body.system:
            mode = "raw mode" if body.raw else "filling in the middle (suffix)"
            raise invalid_request(f"{mode} does not take a system message", param="system")
        alternatives = (body.top_logprobs or 0) if body.logprobs else None
        return CompletionRequest(
            model=body.model,
            prompt=prompt,
            suffix=body.suffix or None,
            logprobs=alternatives,
            **sampling,
        )
    messages = [ChatMessage(role="system", content=body.system)] if body.system else []
    messages.append(ChatMessage(role="user", content=prompt))
    return ChatCompletionRequest(
        model=body.model,
        messages=messages,
        response_format=_response_format(body.format),
        **sampling,
        **_logprobs(body),
    )


def raw_generate_request(
    request: CompletionRequest, format: ollama.Format, config: ModelConfig
) -> pb.GenerateRequest:
    """A raw prompt's backend request, its answer held to JSON as a chat's can be (a
    completion request has no field for that)."""
    generate = text.completion_request(request, config)
    response_format = _response_format(format)
    if response_format is None:
        return generate
    if response_format.json_schema is not None:
        generate.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
        generate.response_format.json_schema = json.dumps(response_format.json_schema.schema)
    else:
        generate.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT
    return generate


def tool_calls(calls: list[pb.ToolCall], first: int = 0) -> list[ollama.ToolCall] | None:
    """A backend's calls with their arguments as objects, numbered from `first`."""
    if not calls:
        return None
    out = []
    for offset, call in enumerate(calls):
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except ValueError:
            arguments = None
        out.append(
            ollama.ToolCall(
                id=call.id or None,
                function=ollama.ToolCallFunction(
                    name=call.function.name,
                    # Backends parse calls into objects; anything else has no Ollama spelling.
                    arguments=arguments if isinstance(arguments, dict) else {},
                    index=first + offset,
                ),
            )
        )
    return out


@dataclass
class Timings:
    """When (time.monotonic()) a generation's stages happened, for the figures Ollama reports."""

    #: The request arrived.
    started: float
    #: The backend call began: a slot taken, the model loaded (the wait is Ollama's load time).
    called: float
    #: The first piece arrived: the prompt read and the first token made.
    first: float
    #: The last piece arrived.
    last: float = 0.0


def figures(usage: pb.Usage, times: Timings) -> dict[str, int]:
    """Ollama's figures of a finished generation: durations in nanoseconds, counts in tokens."""

    def span(start: float, end: float) -> int:
        return max(0, round((end - start) * _NANOSECONDS))

    return {
        "total_duration": span(times.started, times.last),
        "load_duration": span(times.started, times.called),
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": span(times.called, times.first),
        "eval_count": usage.completion_tokens,
        "eval_duration": span(times.first, times.last),
    }


def timestamp(wall: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama writes times; `wall`: seconds since the epoch (else now)."""
    moment = datetime.now(UTC) if wall is None else datetime.fromtimestamp(wall, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def shortened(values: list[float], dimensions: int | None) -> list[float]:
    """The first `dimensions` values, made unit length again (Ollama's `dimensions`); all of
    them where the vector has no more."""
    if dimensions is None or dimensions >= len(values):
        return values
    kept = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in kept))
    return [v / norm for v in kept] if norm else kept


def embed_inputs(given: str | list[str] | None) -> list[str]:
    """/api/embed's input as a list; an empty string (or none) is no input: a load."""
    if given is None or given == "":
        return []
    return [given] if isinstance(given, str) else given


class Answer(Protocol):
    """Builds one generation's answer in Ollama's shape from the backend's pieces."""

    def piece(self, item: pb.GenerateStreamResponse) -> Any | None: ...

    def final(self, item: pb.GenerateStreamResponse, times: Timings) -> Any: ...


class ChatAnswer:
    """/api/chat's pieces (`message`), or with `whole` the one answer at the end."""

    def __init__(self, model: str, whole: bool) -> None:
        self.model, self.whole = model, whole
        self.text: list[str] = []
        self.calls: list[ollama.ToolCall] = []
        self.logprobs: list[TokenLogprob] = []

    def piece(self, item: pb.GenerateStreamResponse) -> ollama.ChatResponse | None:
        calls = tool_calls(list(item.tool_calls), len(self.calls)) or []
        self.calls += calls
        scored = logprobs(item.logprobs)
        if self.whole:
            self.text.append(item.text)
            self.logprobs += scored
            return None
        if not (item.text or calls or scored):
            return None
        message = ollama.ResponseMessage("assistant", item.text, calls or None)
        return ollama.ChatResponse(
            self.model, timestamp(), message, done=False, logprobs=scored or None
        )

    def final(self, item: pb.GenerateStreamResponse, times: Timings) -> ollama.ChatResponse:
        content = "".join(self.text) if self.whole else ""
        calls = (self.calls or None) if self.whole else None
        return ollama.ChatResponse(
            self.model,
            timestamp(),
            ollama.ResponseMessage("assistant", content, calls),
            done=True,
            done_reason=DONE_REASONS.get(item.finish_reason, "stop"),
            **figures(item.usage, times),
            logprobs=(self.logprobs or None) if self.whole else None,
        )


class GenerateAnswer:
    """/api/generate's pieces (`response`), or with `whole` the one answer at the end."""

    def __init__(self, model: str, whole: bool) -> None:
        self.model, self.whole = model, whole
        self.text: list[str] = []
        self.logprobs: list[TokenLogprob] = []

    def piece(self, item: pb.GenerateStreamResponse) -> ollama.GenerateResponse | None:
        scored = logprobs(item.logprobs)
        if self.whole:
            self.text.append(item.text)
            self.logprobs += scored
            return None
        if not (item.text or scored):
            return None
        return ollama.GenerateResponse(
            self.model, timestamp(), item.text, done=False, logprobs=scored or None
        )

    def final(self, item: pb.GenerateStreamResponse, times: Timings) -> ollama.GenerateResponse:
        return ollama.GenerateResponse(
            self.model,
            timestamp(),
            "".join(self.text) if self.whole else "",
            done=True,
            done_reason=DONE_REASONS.get(item.finish_reason, "stop"),
            **figures(item.usage, times),
            logprobs=(self.logprobs or None) if self.whole else None,
        )
