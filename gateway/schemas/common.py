"""Wire types shared by several endpoints."""

from __future__ import annotations

from typing import Annotated

import msgspec

# Every number a client sends has a range here: a value past what the protobuf field holds
# (int32, uint32, int64, float32) would fail to convert when the backend's request is built.
# JSON cannot spell NaN or infinity, and msgspec refuses a float literal that overflows (1e999),
# so a float needs only an upper bound that a float32 holds.
INT32_MAX = 2**31 - 1
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
#: Choices per request (only 1 is served; a larger n is refused by name, not by overflow).
Choices = Annotated[int, msgspec.Meta(ge=1, le=128)]
Seed = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
TopK = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
#: llama.cpp divides by it and transformers wants it positive; past 10 it only garbles text.
RepeatPenalty = Annotated[float, msgspec.Meta(gt=0, le=10)]
#: Alternatives reported at each token's place: chat's top_logprobs, completions' logprobs.
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]
CompletionLogprobs = Annotated[int, msgspec.Meta(ge=0, le=5)]
#: A token id, as the backends' int32 fields hold it.
TokenId = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class PromptTokensDetails(msgspec.Struct):
    #: Prompt tokens the backend found in its cache and did not compute again.
    cached_tokens: int


class Usage(msgspec.Struct, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


#: Ollama's keep_alive on a request: "5m", seconds, 0 (unload after this request), -1 (never).
KeepAlive = (
    Annotated[str, msgspec.Meta(max_length=64)]
    | Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]  # a larger one overflows float()
    | float
    | None
)
