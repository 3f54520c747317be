"""POST /v1/audio/transcriptions and POST /v1/audio/translations (multipart uploads)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency

from gateway.errors import OpenAIError, invalid_request
from gateway.manager import BackendManager
from gateway.routes.common import keep_alive_of, resolve_model
from gateway.translate import audio
from protos.hearth.backend.v1.contract import Capability


async def _transcribe(
    request: Request[Any, Any, Any], manager: NamedDependency[BackendManager], *, translate: bool
) -> Response[Any]:
    form = await request.form()
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise invalid_request("file is required: upload the audio as a multipart file", "file")
    model = form.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("model is required", param="model")
    # An unknown model is a 404 before anything else.
    config = await resolve_model(request, manager, model)
    keep_alive = keep_alive_of(_text(form.get("keep_alive")))
    data = await upload.read()
    limit = manager.settings.max_upload_bytes
    if len(data) > limit:
        raise OpenAIError(
            413, f"the file is larger than this server's limit of {limit} bytes", param="file"
        )
    if not data:
        raise invalid_request("the file is empty", param="file")
    granularities = [
        str(v)
        for key in ("timestamp_granularities[]", "timestamp_granularities")
        for v in form.getall(key, [])
    ]
    response_format = str(form.get("response_format") or "json")
    call = audio.transcribe_request(
        audio=data,
        filename=upload.filename or "",
        translate=translate,
        language=None if translate else _text(form.get("language")),
        prompt=_text(form.get("prompt")),
        temperature=_text(form.get("temperature")),
        response_format=response_format,
        granularities=granularities,
        max_audio_seconds=manager.settings.max_audio_seconds,
    )
    answer = await manager.call(
        config, Capability.TRANSCRIPTION, lambda client: client.transcribe(call), keep_alive
    )
    body, media_type = audio.render(
        answer,
        response_format=response_format,
        translate=translate,
        words="word" in granularities,
    )
    return Response(body, media_type=media_type)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


class AudioController(Controller):
    path = "/v1/audio"

    @post("/transcriptions", status_code=200)
    async def transcriptions(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> Response[Any]:
        return await _transcribe(request, manager, translate=False)

    @post("/translations", status_code=200)
    async def translations(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> Response[Any]:
        return await _transcribe(request, manager, translate=True)
