"""POST /v1/responses: OpenAI's Responses API, stateless."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency

from gateway import limits
from gateway.errors import OpenAIError
from gateway.lifetime import life_of
from gateway.manager import BackendManager
from gateway.routes.common import (
    decode_body,
    generate_all,
    keep_alive_of,
    now,
    resolve_model,
    stream_text,
)
from gateway.schemas.responses import ResponseCreateRequest
from gateway.translate import responses, text


class ResponsesController(Controller):
    path = "/v1/responses"

    @post(status_code=200)
    async def create(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> Response[Any]:
        # Annotated as Response so that a stream keeps its own text/event-stream media type.
        body = decode_body(await request.body(), ResponseCreateRequest)
        # Errors name this API's fields (input, text.format), not the chat request's.
        try:
            chat = responses.chat_request(body)
            limits.check_chat(chat, manager.settings)
            config = await resolve_model(request, manager, body.model)
            keep_alive = keep_alive_of(body.keep_alive)
            generate = text.chat_request(chat, config)
        except OpenAIError as exc:
            raise responses.for_responses(exc) from None
        started = responses.skeleton(body, config, id=responses.new_item_id("resp"), created=now())
        try:
            if body.stream:
                events = responses.ResponseEvents(started)
                life = life_of(request)
                return await stream_text(
                    life,
                    manager,
                    config,
                    [generate],
                    events,
                    keep_alive,
                    failure=events.failure,
                    done=False,
                )
            (answer,) = await generate_all(manager, config, [generate], keep_alive)
        except OpenAIError as exc:
            raise responses.for_responses(exc) from None
        return Response(responses.response(answer, started))
