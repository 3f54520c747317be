"""POST /v1/images/generations, and GET /generated/{name} for `response_format: url`."""

from __future__ import annotations

import base64
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency

from gateway import limits
from gateway.errors import OpenAIError
from gateway.generated import GeneratedImages
from gateway.manager import BackendManager
from gateway.routes.common import decode_body, keep_alive_of, now, only_model, resolve_model
from gateway.schemas.images import Image, ImageGenerationRequest, ImagesResponse
from gateway.translate.images import generate_image_request
from protos.hearth.backend.v1.contract import Capability


class ImagesController(Controller):
    path = "/v1/images"

    @post("/generations", status_code=200)
    async def generations(
        self,
        request: Request[Any, Any, Any],
        manager: NamedDependency[BackendManager],
        generated: NamedDependency[GeneratedImages],
    ) -> ImagesResponse:
        body = decode_body(await request.body(), ImageGenerationRequest)
        # OpenAI's default is its own model: here, the models dir's one image model.
        name = body.model or await only_model(manager, ["image"], "an image model")
        config = await resolve_model(request, manager, name)
        limits.check_images(body, config, manager.settings)
        keep_alive = keep_alive_of(body.keep_alive)
        call = generate_image_request(body)
        answer = await manager.call(
            config, Capability.IMAGES, lambda client: client.generate_image(call), keep_alive
        )
        images = []
        for image in answer.images:
            if body.response_format == "b64_json":
                images.append(Image(b64_json=base64.b64encode(image.png).decode()))
            else:
                name = await generated.store(image.png)
                images.append(Image(url=f"{str(request.base_url).rstrip('/')}/generated/{name}"))
        return ImagesResponse(created=now(), data=images)


@get("/generated/{name:str}", media_type="image/png")
async def generated_image(
    name: str, generated: NamedDependency[GeneratedImages]
) -> Response[bytes]:
    data = await generated.read(name)
    if data is None:
        raise OpenAIError(404, "no such image (they expire)", code="image_not_found")
    return Response(data, media_type="image/png")
