"""/v1/tokenize and /v1/detokenize wire types (llama.cpp server's field names)."""

from __future__ import annotations

import msgspec

from gateway.schemas.common import TokenId


class TokenizeRequest(msgspec.Struct):
    model: str
    content: str
    add_special: bool = False


class TokenizeResponse(msgspec.Struct):
    tokens: list[int]


class DetokenizeRequest(msgspec.Struct):
    model: str
    tokens: list[TokenId]


class DetokenizeResponse(msgspec.Struct):
    content: str
