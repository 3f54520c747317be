"""POST /v1/rerank (also /rerank and /v2/rerank): documents ordered by relevance to a query."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post
from litestar.di import NamedDependency

from gateway.errors import OpenAIError, invalid_request
from gateway.manager import BackendManager
from gateway.routes.common import (
    decode_body,
    keep_alive_of,
    new_id,
    only_model,
    require_kind,
    resolve_model,
)
from gateway.schemas.rerank import (
    Document,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
)
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Capability


class RerankController(Controller):
    path = "/"

    @post(["/v1/rerank", "/rerank", "/v2/rerank"], status_code=200)
    async def rerank(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> RerankResponse:
        """Score every document against the query (a cross-encoder reranker, or an embedding
        model's cosine similarity) and return them best first, `top_n` of them."""
        body = decode_body(await request.body(), RerankRequest)
        if not body.query.strip():
            raise invalid_request(
                "query is empty: give the text to rank documents by", param="query"
            )
        documents = body.texts()
        if not documents:
            raise invalid_request("documents is empty: give at least one", param="documents")
        # llama.cpp's server is called without one: the models dir's one reranker, else its one
        # embedding model.
        name = body.model or await only_model(
            manager, ["rerank", "embeddings"], "a reranker or an embedding model"
        )
        config = await resolve_model(request, manager, name)
        require_kind(config, {"rerank", "embeddings"}, "reranking")
        call = pb.RerankRequest(query=body.query, documents=documents)
        answer = await manager.call(
            config,
            Capability.RERANK,
            lambda client: client.rerank(call),
            keep_alive_of(body.keep_alive),
        )
        scores = list(answer.scores)
        if len(scores) != len(documents):
            raise OpenAIError(
                502,
                f"the backend of {config.name} scored {len(scores)} of {len(documents)} documents",
                code="backend_error",
            )
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        if body.top_n is not None:
            order = order[: body.top_n]
        manager.metrics.tokens_used(config.name, answer.prompt_tokens, 0)
        results = [
            RerankResult(
                index=i,
                relevance_score=scores[i],
                document=Document(documents[i]) if body.return_documents else None,
            )
            for i in order
        ]
        usage = RerankUsage(prompt_tokens=answer.prompt_tokens, total_tokens=answer.prompt_tokens)
        return RerankResponse(id=new_id("rerank"), model=config.name, results=results, usage=usage)
