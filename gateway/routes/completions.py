"""POST /v1/completions."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency

from gateway import limits
from gateway.lifetime import life_of
from gateway.manager import BackendManager
from gateway.routes.common import (
    decode_body,
    generate_all,
    keep_alive_of,
    new_id,
    now,
    resolve_model,
    stream_text,
)
from gateway.schemas.completions import CompletionRequest
from gateway.translate import text


class CompletionsController(Controller):
    path = "/v1/completions"

    @post(status_code=200)
    async def create(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> Response[Any]:
        # Annotated as Response so that a stream keeps its own text/event-stream media type.
        body = decode_body(await request.body(), CompletionRequest)
        limits.check_completion(body, manager.settings)
        config = await resolve_model(request, manager, body.model)
        keep_alive = keep_alive_of(body.keep_alive)
        generate = text.completion_request(body, config)
        n = body.n or 1
        generations = text.choices(generate, max(n, body.best_of or 1))
        echo = text.prompt_of(body) if body.echo else None
        logprobs = body.logprobs is not None
        id_, created = new_id("cmpl"), now()
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = text.CompletionChunks(
                id=id_,
                created=created,
                model=body.model,
                include_usage=include_usage,
                echo=echo,
                logprobs=logprobs,
            )
            life = life_of(request)
            return await stream_text(life, manager, config, generations, chunks, keep_alive)
        responses = await generate_all(manager, config, generations, keep_alive)
        completion = text.completion(
            text.best_of(responses, n) if len(responses) > n else responses,
            id=id_,
            created=created,
            model=body.model,
            echo=echo,
            logprobs=logprobs,
            generated=responses,
        )
        return Response(completion)
