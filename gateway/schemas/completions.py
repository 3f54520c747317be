"""/v1/completions wire types."""

from __future__ import annotations

from typing import Annotated

import msgspec

from gateway.schemas.common import (
    INT32_MAX,
    Choices,
    CompletionLogprobs,
    KeepAlive,
    Penalty,
    RepeatPenalty,
    Seed,
    StreamOptions,
    Temperature,
    TopK,
    TopP,
    Usage,
)


class CompletionRequest(msgspec.Struct):
    model: str
    #: OpenAI's spec: nullable, null meaning the start of a document.
    prompt: str | list[str] | None
    #: 0 generates nothing (with echo: the prompt alone).
    max_tokens: Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Choices | None = None
    stream: bool | None = False  # OpenAI's spec lets clients send null
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    echo: bool | None = False
    suffix: str | None = None
    logprobs: CompletionLogprobs | None = None
    #: Generations made to return the `n` most likely of (by mean token log-probability).
    best_of: Choices | None = None
    # Extensions llama.cpp users expect.
    top_k: TopK | None = None
    min_p: TopP | None = None
    repeat_penalty: RepeatPenalty | None = None
    # Ollama's: how long the model stays loaded after this request.
    keep_alive: KeepAlive = None


class CompletionLogprobsResult(msgspec.Struct):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobsResult | None = None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: Usage | None = None
