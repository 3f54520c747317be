"""Chat and completion requests to GenerateRequest, and backend answers back to OpenAI's shape."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from typing import Any, TypeVar

from gateway.config import ModelConfig
from gateway.errors import invalid_request
from gateway.schemas.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    FunctionCall,
    TokenLogprob,
    ToolCall,
    TopLogprob,
)
from gateway.schemas.chat import Choice as ChatChoice
from gateway.schemas.common import PromptTokensDetails, Usage
from gateway.schemas.completions import (
    Completion,
    CompletionChoice,
    CompletionLogprobsResult,
    CompletionRequest,
)
from protos.hearth.backend.v1 import backend_pb2 as pb

T = TypeVar("T")

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


def _sampling(
    request: ChatCompletionRequest | CompletionRequest, config: ModelConfig, max_tokens: int | None
) -> pb.SamplingParams:
    """The request's sampling settings over the model YAML's defaults."""
    defaults = config.parameters
    stop = request.stop if request.stop is not None else defaults.stop
    # An empty stop sequence would end every answer at once: a client that sends one (stop: "")
    # means none, so it is ignored.
    stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
    sampling = pb.SamplingParams(stop=stops)
    values = {
        "max_tokens": max_tokens if max_tokens is not None else defaults.max_tokens,
        "temperature": _first(request.temperature, defaults.temperature),
        "top_p": _first(request.top_p, defaults.top_p),
        "top_k": _first(request.top_k, defaults.top_k),
        "min_p": _first(request.min_p, defaults.min_p),
        "repeat_penalty": _first(request.repeat_penalty, defaults.repeat_penalty),
        "presence_penalty": _first(request.presence_penalty, defaults.presence_penalty),
        "frequency_penalty": _first(request.frequency_penalty, defaults.frequency_penalty),
        "seed": _first(request.seed, defaults.seed),
    }
    for name, value in values.items():
        if value is not None:
            setattr(sampling, name, value)
    alternatives = _alternatives(request)
    if alternatives is not None:
        sampling.logprobs = alternatives
    return sampling


def _alternatives(request: ChatCompletionRequest | CompletionRequest) -> int | None:
    """The log-probabilities asked for: None, or how many alternatives at each token."""
    if isinstance(request, CompletionRequest):
        return request.logprobs
    if request.top_logprobs is not None and not request.logprobs:
        raise invalid_request(
            "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value"
        )
    return (request.top_logprobs or 0) if request.logprobs else None


def _first(*values: T | None) -> T | None:
    return next((v for v in values if v is not None), None)


def chat_request(request: ChatCompletionRequest, config: ModelConfig) -> pb.GenerateRequest:
    """A chat completion request as the backend's GenerateRequest."""
    if not request.messages:
        raise invalid_request("messages must not be empty", param="messages")
    messages = []
    if config.system_prompt and not any(
        m.role in {"system", "developer"} for m in request.messages
    ):
        messages.append(pb.ChatMessage(role="system", content=config.system_prompt))
    for index, message in enumerate(request.messages):
        converted = pb.ChatMessage(
            role=message.role,
            name=message.name or "",
            tool_call_id=message.tool_call_id or "",
        )
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise invalid_request(
                        f"content parts of type '{part.type}' are not supported; send text",
                        param=f"messages[{index}].content",
                    )
                texts.append(part.text)
            content = "".join(texts)
        if content is not None:
            converted.content = content
        for call in message.tool_calls or []:
            converted.tool_calls.append(
                pb.ToolCall(
                    id=call.id,
                    type=call.type,
                    function=pb.FunctionCall(
                        name=call.function.name, arguments=call.function.arguments
                    ),
                )
            )
        messages.append(converted)
    chat = pb.ChatInput(messages=messages)
    for tool in request.tools or []:
        chat.tools.append(
            pb.Tool(
                type=tool.type,
                name=tool.function.name,
                description=tool.function.description or "",
                parameters_json=json.dumps(tool.function.parameters or {}),
            )
        )
    if request.parallel_tool_calls is not None:
        chat.parallel_tool_calls = request.parallel_tool_calls
    choice = request.tool_choice
    if choice not in (None, "none", "auto") and not request.tools:
        raise invalid_request(
            "tool_choice asks for a call, but the request gives no tools", param="tool_choice"
        )
    if choice is not None:
        chat.tool_choice = choice if isinstance(choice, str) else json.dumps(choice)
    generate = pb.GenerateRequest(
        chat=chat,
        sampling=_sampling(request, config, request.max_completion_tokens or request.max_tokens),
        adapters=adapters(config),
    )
    response_format = request.response_format
    if response_format is not None:
        if response_format.type == "json_object":
            generate.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT
        elif response_format.type == "json_schema":
            schema = response_format.json_schema
            if schema is None or schema.schema is None:
                raise invalid_request(
                    "response_format json_schema needs json_schema.schema",
                    param="response_format.json_schema",
                )
            generate.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
            generate.response_format.json_schema = json.dumps(schema.schema)
    return generate


def completion_request(request: CompletionRequest, config: ModelConfig) -> pb.GenerateRequest:
    """A (legacy) completion request as the backend's GenerateRequest."""
    if request.echo and request.logprobs is not None:
        raise invalid_request(
            "echo with logprobs (the prompt's own log-probabilities) is not supported; send "
            "one or the other",
            param="echo",
        )
    generate = pb.GenerateRequest(
        prompt=prompt_of(request),
        sampling=_sampling(request, config, request.max_tokens),
        suffix=request.suffix or "",
        adapters=adapters(config),
    )
    best_of = request.best_of
    if best_of is not None and best_of < (request.n or 1):
        raise invalid_request(
            f"best_of ({best_of}) must be at least n ({request.n})", param="best_of"
        )
    if best_of is not None and best_of > (request.n or 1):
        if request.stream:
            raise invalid_request(
                "best_of greater than n cannot be streamed: the best are known at the end",
                param="best_of",
            )
        if not generate.sampling.HasField("logprobs"):
            generate.sampling.logprobs = 0  # to rank them
    return generate


def adapters(config: ModelConfig) -> list[pb.LoraAdapter]:
    """The model's LoRA adapters (a variant's base's first), as the backend applies them."""
    return [
        pb.LoraAdapter(path=path, scale=adapter.scale)
        for path, adapter in zip(config.lora_paths, config.lora, strict=True)
    ]


def prompt_of(request: CompletionRequest) -> str:
    """A completion request's one prompt text (null: empty, the start of a document)."""
    prompt = request.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise invalid_request("send one prompt per request", param="prompt")
        prompt = prompt[0]
    return prompt or ""


def best_of(responses: list[pb.GenerateResponse], n: int) -> list[pb.GenerateResponse]:
    """The `n` answers with the highest mean token log-probability, best first (OpenAI's
    best_of)."""

    def score(response: pb.GenerateResponse) -> float:
        values = [lp.logprob for lp in response.logprobs]
        return sum(values) / len(values) if values else 0.0

    return sorted(responses, key=score, reverse=True)[:n]


def usage(value: pb.Usage) -> Usage:
    details = None
    if value.HasField("cached_prompt_tokens"):
        details = PromptTokensDetails(cached_tokens=value.cached_prompt_tokens)
    return Usage(
        prompt_tokens=value.prompt_tokens,
        completion_tokens=value.completion_tokens,
        total_tokens=value.prompt_tokens + value.completion_tokens,
        prompt_tokens_details=details,
    )


def _tool_calls(calls: list[pb.ToolCall]) -> list[ToolCall] | None:
    if not calls:
        return None
    return [
        ToolCall(
            id=c.id,
            type=c.type or "function",
            function=FunctionCall(name=c.function.name, arguments=c.function.arguments),
        )
        for c in calls
    ]


def choices(request: pb.GenerateRequest, n: int | None) -> list[pb.GenerateRequest]:
    """One generation per choice (`n`): the same request, each with its own seed where the
    request gives one (else each draws its own), so that sampled choices differ."""
    copies = []
    for index in range(n or 1):
        copy = pb.GenerateRequest()
        copy.CopyFrom(request)
        if index and copy.sampling.HasField("seed"):
            copy.sampling.seed = (copy.sampling.seed + index + 2**63) % 2**64 - 2**63
        copies.append(copy)
    return copies


def total_usage(usages: list[pb.Usage]) -> pb.Usage:
    """The usage of several choices of one request: the prompt once, every completion."""
    total = pb.Usage()
    total.CopyFrom(usages[0])
    total.completion_tokens = sum(u.completion_tokens for u in usages)
    return total


def chat_logprobs(items: Iterable[pb.TokenLogprob]) -> ChoiceLogprobs:
    """Token log-probabilities in chat's shape."""
    return ChoiceLogprobs(content=token_logprobs(items))


def token_logprobs(items: Iterable[pb.TokenLogprob]) -> list[TokenLogprob]:
    """Token log-probabilities as chat, the Responses API and Ollama all write them: token,
    logprob, bytes, top_logprobs."""
    return [
        TokenLogprob(
            token=item.token,
            logprob=item.logprob,
            bytes=list(item.token_bytes),
            top_logprobs=[
                TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token_bytes))
                for t in item.top
            ],
        )
        for item in items
    ]


class TextOffsets:
    """Where each token of a choice's text begins, in characters: its bytes are decoded as
    they come, so a character split over several tokens counts once (at its first token)."""

    def __init__(self, start: int = 0) -> None:
        self.at = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, data: bytes) -> int:
        """The offset of the token of `data`; the text moves on past it."""
        here = self.at
        self.at += len(self._decoder.decode(data))
        return here


def _token_name(token: str, data: bytes) -> str:
    """A token as the legacy completions shape names it: its text, or `bytes:\\xNN...` for
    bytes that are not whole UTF-8 characters (as OpenAI writes them)."""
    try:
        return data.decode("utf-8") if data else token
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def completion_logprobs(
    items: Iterable[pb.TokenLogprob], offsets: TextOffsets
) -> CompletionLogprobsResult:
    """Token log-probabilities in the legacy completions shape; `offsets` follows the choice's
    text (it starts after an echoed prompt)."""
    result = CompletionLogprobsResult(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for item in items:
        result.tokens.append(_token_name(item.token, item.token_bytes))
        result.token_logprobs.append(item.logprob)
        result.top_logprobs.append(
            {_token_name(t.token, t.token_bytes): t.logprob for t in item.top}
        )
        result.text_offset.append(offsets.next(item.token_bytes or item.token.encode()))
    return result


def chat_completion(
    responses: list[pb.GenerateResponse],
    *,
    id: str,
    created: int,
    model: str,
    logprobs: bool = False,
) -> ChatCompletion:
    return ChatCompletion(
        id=id,
        created=created,
        model=model,
        choices=[_chat_choice(index, r, logprobs) for index, r in enumerate(responses)],
        usage=usage(total_usage([r.usage for r in responses])),
    )


def _chat_choice(index: int, response: pb.GenerateResponse, logprobs: bool) -> ChatChoice:
    calls = _tool_calls(list(response.tool_calls))
    message = ChatCompletionMessage(
        role="assistant", content=response.text if response.text or not calls else None
    )
    if calls:
        message.tool_calls = calls
    return ChatChoice(
        index=index,
        message=message,
        finish_reason=FINISH_REASONS.get(response.finish_reason, "stop"),
        logprobs=chat_logprobs(response.logprobs) if logprobs else None,
    )


def completion(
    responses: list[pb.GenerateResponse],
    *,
    id: str,
    created: int,
    model: str,
    echo: str | None = None,
    logprobs: bool = False,
    generated: list[pb.GenerateResponse] | None = None,
) -> Completion:
    """`echo`: the prompt, written before each choice's text. `generated`: every generation
    made, where best_of made more than `responses` (all are billed)."""
    choices = []
    for index, response in enumerate(responses):
        text_ = (echo or "") + response.text
        choice = CompletionChoice(
            index=index,
            text=text_,
            finish_reason=FINISH_REASONS.get(response.finish_reason, "stop"),
        )
        if logprobs:
            choice.logprobs = completion_logprobs(response.logprobs, TextOffsets(len(echo or "")))
        choices.append(choice)
    return Completion(
        id=id,
        created=created,
        model=model,
        choices=choices,
        usage=usage(total_usage([r.usage for r in generated or responses])),
    )


class ChatChunks:
    """Builds the chunks of one streamed chat completion (one id for all of them)."""

    def __init__(
        self, *, id: str, created: int, model: str, include_usage: bool, logprobs: bool = False
    ) -> None:
        self.id, self.created, self.model = id, created, model
        self.include_usage = include_usage
        self.logprobs = logprobs
        #: Tool calls sent so far, by choice: a call's index counts its choice's calls.
        self.calls: dict[int, int] = {}
        #: Ids of the calls whose deltas were sent as they were written.
        self.streamed: set[str] = set()

    def _chunk(
        self, choices: list[ChunkChoice], usage_: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage_
        )

    def opening(self, n: int) -> list[ChatCompletionChunk]:
        return [
            self._chunk([ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content=""))])
            for i in range(n)
        ]

    def piece(self, item: pb.GenerateStreamResponse, index: int = 0) -> list[ChatCompletionChunk]:
        chunks = []
        scored = self.logprobs and len(item.logprobs) > 0
        if item.text or scored:
            delta = ChoiceDelta(content=item.text) if item.text else ChoiceDelta()
            choice = ChunkChoice(index=index, delta=delta)
            if scored:
                choice.logprobs = chat_logprobs(item.logprobs)
            chunks.append(self._chunk([choice]))
        for written in item.tool_call_deltas:
            # A call as it is written: its id and name first, then fragments of its arguments
            # (its index is the backend's: the calls before it in this answer).
            if written.id:
                self.streamed.add(written.id)
                call: dict[str, Any] = {
                    "index": written.index,
                    "id": written.id,
                    "type": "function",
                    "function": {"name": written.name, "arguments": written.arguments},
                }
            else:
                call = {"index": written.index, "function": {"arguments": written.arguments}}
            delta = ChoiceDelta(tool_calls=[call])
            chunks.append(self._chunk([ChunkChoice(index=index, delta=delta)]))
        if item.tool_calls:
            first = self.calls.get(index, 0)
            self.calls[index] = first + len(item.tool_calls)
            calls = [
                {
                    "index": first + i,
                    "id": c.id,
                    "type": c.type or "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for i, c in enumerate(item.tool_calls)
                if c.id not in self.streamed  # already sent, piece by piece
            ]
            if calls:
                delta = ChoiceDelta(tool_calls=calls)
                chunks.append(self._chunk([ChunkChoice(index=index, delta=delta)]))
        if item.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            reason = FINISH_REASONS.get(item.finish_reason, "stop")
            chunks.append(
                self._chunk([ChunkChoice(index=index, delta=ChoiceDelta(), finish_reason=reason)])
            )
        return chunks

    def closing(self, total: pb.Usage) -> list[ChatCompletionChunk]:
        """After every choice has finished: the usage chunk, where the client asked for it."""
        return [self._chunk([], usage(total))] if self.include_usage else []


class CompletionChunks:
    """Builds the chunks of one streamed completion."""

    def __init__(
        self,
        *,
        id: str,
        created: int,
        model: str,
        include_usage: bool,
        echo: str | None = None,
        logprobs: bool = False,
    ) -> None:
        self.id, self.created, self.model = id, created, model
        self.include_usage = include_usage
        self.echo, self.logprobs = echo, logprobs
        #: Where each choice's text has got to (text_offset of its next token).
        self.offsets: dict[int, TextOffsets] = {}

    def _chunk(self, choices: list[CompletionChoice], usage_: Usage | None = None) -> Completion:
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage_
        )

    def opening(self, n: int) -> list[Completion]:
        """With echo, each choice's text begins with the prompt."""
        if not self.echo:
            return []
        return [
            self._chunk([CompletionChoice(index=i, text=self.echo, finish_reason=None)])
            for i in range(n)
        ]

    def piece(self, item: pb.GenerateStreamResponse, index: int = 0) -> list[Completion]:
        finished = item.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        scored = self.logprobs and len(item.logprobs) > 0
        if not (item.text or finished or scored):
            return []
        reason = FINISH_REASONS.get(item.finish_reason, "stop") if finished else None
        choice = CompletionChoice(index=index, text=item.text, finish_reason=reason)
        if scored:
            offsets = self.offsets.setdefault(index, TextOffsets(len(self.echo or "")))
            choice.logprobs = completion_logprobs(item.logprobs, offsets)
        return [self._chunk([choice])]

    def closing(self, total: pb.Usage) -> list[Completion]:
        return [self._chunk([], usage(total))] if self.include_usage else []
