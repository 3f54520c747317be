"""POST /v1/embeddings."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post
from litestar.di import NamedDependency

from gateway import limits
from gateway.manager import BackendManager
from gateway.routes.common import decode_body, keep_alive_of, resolve_model
from gateway.schemas.embeddings import CreateEmbeddingResponse, EmbeddingRequest
from gateway.translate import embeddings
from protos.hearth.backend.v1.contract import Capability


class EmbeddingsController(Controller):
    path = "/v1/embeddings"

    @post(status_code=200)
    async def create(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> CreateEmbeddingResponse:
        body = decode_body(await request.body(), EmbeddingRequest)
        limits.check_embeddings(body, manager.settings)
        config = await resolve_model(request, manager, body.model)
        keep_alive = keep_alive_of(body.keep_alive)
        embed = embeddings.embed_request(body, manager.settings.max_embedding_input_tokens)
        response = await manager.call(
            config, Capability.EMBEDDINGS, lambda client: client.embed(embed), keep_alive
        )
        manager.metrics.tokens_used(config.name, response.prompt_tokens, 0)
        return embeddings.embedding_response(
            response, model=body.model, encoding_format=body.encoding_format
        )
