"""Embedding requests to EmbedRequest, and vectors back (float lists or base64 float32)."""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any

from gateway.errors import invalid_request
from gateway.schemas.embeddings import (
    CreateEmbeddingResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingUsage,
)
from protos.hearth.backend.v1 import backend_pb2 as pb


def embed_request(request: EmbeddingRequest, max_input_tokens: int = 0) -> pb.EmbedRequest:
    """Accepts a string, a list of strings, a token array, or a list of token arrays.

    The backend refuses an input of more than `max_input_tokens` tokens (0: its model's limit).
    """
    given = request.input
    items: list[Any] = [given] if isinstance(given, str) else list(given)
    if not items:
        raise invalid_request("input must not be empty", param="input")
    inputs = []
    if all(isinstance(item, int) for item in items):
        items = [items]  # one token array
    elif any(isinstance(item, int) for item in items):
        raise invalid_request("input mixes token ids with other inputs", param="input")
    for index, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise invalid_request(f"input[{index}] is an empty string", param="input")
            inputs.append(pb.EmbedInput(text=item))
        elif isinstance(item, list):
            if not item:
                raise invalid_request(f"input[{index}] is an empty token array", param="input")
            inputs.append(pb.EmbedInput(tokens=pb.TokenIds(ids=item)))
        else:
            raise invalid_request("input mixes strings and tokens", param="input")
    return pb.EmbedRequest(
        inputs=inputs, dimensions=request.dimensions or 0, max_input_tokens=max_input_tokens
    )


def _base64(values: list[float]) -> str:
    packed = array("f", values)
    if packed.itemsize != 4:
        raise RuntimeError("float32 arrays are not 4 bytes on this platform")
    if sys.byteorder == "big":  # OpenAI's base64 is little-endian float32
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()


def embedding_response(
    response: pb.EmbedResponse, *, model: str, encoding_format: str
) -> CreateEmbeddingResponse:
    data = []
    for index, embedding in enumerate(response.embeddings):
        values = list(embedding.values)
        encoded = _base64(values) if encoding_format == "base64" else values
        data.append(EmbeddingData(index=index, embedding=encoded))
    return CreateEmbeddingResponse(
        data=data,
        model=model,
        usage=EmbeddingUsage(
            prompt_tokens=response.prompt_tokens, total_tokens=response.prompt_tokens
        ),
    )
