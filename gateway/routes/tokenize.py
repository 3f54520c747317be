"""POST /v1/tokenize and POST /v1/detokenize: a text model's own tokenizer."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post
from litestar.di import NamedDependency

from gateway import limits
from gateway.manager import BackendManager
from gateway.routes.common import decode_body, resolve_model
from gateway.schemas.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Capability


class TokenizeController(Controller):
    path = "/v1"

    @post("/tokenize", status_code=200)
    async def tokenize(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> TokenizeResponse:
        body = decode_body(await request.body(), TokenizeRequest)
        limits.check_tokenize(body, manager.settings)
        call = pb.TokenizeRequest(text=body.content, add_special=body.add_special)
        config = await resolve_model(request, manager, body.model)
        response = await manager.call(config, Capability.TEXT, lambda client: client.tokenize(call))
        return TokenizeResponse(tokens=list(response.tokens))

    @post("/detokenize", status_code=200)
    async def detokenize(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> DetokenizeResponse:
        body = decode_body(await request.body(), DetokenizeRequest)
        limits.check_detokenize(body, manager.settings)
        call = pb.DetokenizeRequest(tokens=body.tokens)
        config = await resolve_model(request, manager, body.model)
        response = await manager.call(
            config, Capability.TEXT, lambda client: client.detokenize(call)
        )
        return DetokenizeResponse(content=response.text)
