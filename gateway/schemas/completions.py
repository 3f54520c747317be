"""/v1/completions wire types."""

from __future__ import annotations

import msgspec

from gateway.schemas.common import (
    Choices,
    KeepAlive,
    MaxTokens,
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
    prompt: str | list[str]
    max_tokens: MaxTokens | None = None
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
    # Extensions llama.cpp users expect.
    top_k: TopK | None = None
    min_p: TopP | None = None
    repeat_penalty: RepeatPenalty | None = None
    # Ollama's: how long the model stays loaded after this request.
    keep_alive: KeepAlive = None


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: Usage | None = None
