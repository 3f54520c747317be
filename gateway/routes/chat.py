"""POST /v1/chat/completions."""

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
from gateway.schemas.chat import ChatCompletionRequest
from gateway.translate import text


class ChatController(Controller):
    path = "/v1/chat/completions"

    @post(status_code=200)
    async def create(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> Response[Any]:
        # Annotated as Response so that a stream keeps its own text/event-stream media type.
        body = decode_body(await request.body(), ChatCompletionRequest)
        limits.check_chat(body, manager.settings)
        config = await resolve_model(request, manager, body.model)
        keep_alive = keep_alive_of(body.keep_alive)
        generate = text.chat_request(body, config)
        generations = text.choices(generate, body.n)
        id_, created = new_id("chatcmpl"), now()
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = text.ChatChunks(
                id=id_,
                created=created,
                model=body.model,
                include_usage=include_usage,
                logprobs=bool(body.logprobs),
            )
            life = life_of(request)
            return await stream_text(life, manager, config, generations, chunks, keep_alive)
        responses = await generate_all(manager, config, generations, keep_alive)
        completion = text.chat_completion(
            responses, id=id_, created=created, model=body.model, logprobs=bool(body.logprobs)
        )
        return Response(completion)
