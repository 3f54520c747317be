"""Wire types shared by several endpoints."""

from __future__ import annotations

from typing import Annotated

import msgspec

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1)]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


#: Ollama's keep_alive on a request: "5m", seconds, 0 (unload after this request), -1 (never).
KeepAlive = str | int | float | None
