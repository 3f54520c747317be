"""/v1/embeddings wire types."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from gateway.schemas.common import INT32_MAX, KeepAlive, TokenId


class EmbeddingRequest(msgspec.Struct):
    model: str
    # A string, a list of strings, one token array, or a list of token arrays.
    input: str | list[str | TokenId | list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)] | None = None
    user: str | None = None
    # Ollama's: how long the model stays loaded after this request.
    keep_alive: KeepAlive = None


class EmbeddingData(msgspec.Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(msgspec.Struct):
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
    object: str = "list"
