"""POST /v1/audio/speech (text to speech, streamed) and GET /v1/audio/voices."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.response import Stream

from gateway.client import BackendClient
from gateway.config import ModelConfig
from gateway.errors import OpenAIError, invalid_request, model_not_found
from gateway.lifetime import life_of
from gateway.manager import BackendManager
from gateway.routes.common import (
    decode_body,
    keep_alive_of,
    models_of,
    require_kind,
    resolve_model,
)
from gateway.schemas.speech import SpeechRequest, VoiceInfo, VoiceList
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Capability

log = logging.getLogger("hearth.speech")

_FORMATS = {
    "mp3": (pb.AUDIO_FORMAT_MP3, "audio/mpeg"),
    "wav": (pb.AUDIO_FORMAT_WAV, "audio/wav"),
    "flac": (pb.AUDIO_FORMAT_FLAC, "audio/flac"),
    "opus": (pb.AUDIO_FORMAT_OPUS, "audio/ogg"),
    "aac": (pb.AUDIO_FORMAT_AAC, "audio/aac"),
    "pcm": (pb.AUDIO_FORMAT_PCM, "audio/pcm"),
}
#: OpenAI's speech models, which clients (Open WebUI, Home Assistant) send by default: they
#: mean the models dir's one speech model, as OpenAI's voice names mean a model's default voice.
_OPENAI_MODELS = frozenset({"tts-1", "tts-1-hd", "gpt-4o-mini-tts"})
#: A sentence of WAV can be half a megabyte: sent in pieces, so that no single write waits on
#: a slow client for long (the read timeout applies to each).
_PIECE_BYTES = 64 * 1024


class SpeechController(Controller):
    path = "/v1/audio"

    @post("/speech", status_code=200)
    async def speech(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> Stream:
        """The text read aloud, streamed as it is made: the first sentence's audio is sent
        while the next is being spoken."""
        body = decode_body(await request.body(), SpeechRequest)
        if not body.input.strip():
            raise invalid_request("input is empty: give the text to read aloud", param="input")
        if body.stream_format == "sse":
            raise invalid_request(
                "stream_format 'sse' is not supported: the audio itself is streamed (the "
                "default, stream_format 'audio')",
                param="stream_format",
            )
        audio_format, media_type = _FORMATS[str(body.response_format)]
        config = await _speech_model(request, manager, body.model)
        call = pb.SynthesizeRequest(
            input=body.input, voice=body.voice or "", format=audio_format, speed=body.speed or 1.0
        )

        async def start(
            client: BackendClient,
        ) -> tuple[AsyncGenerator[pb.SynthesizeResponse], pb.SynthesizeResponse | None]:
            stream = client.synthesize(call)
            try:
                # The first piece before answering: a bad voice is a 400, not a cut stream.
                return stream, await anext(stream, None)
            except BaseException:
                await stream.aclose()
                raise

        keep_alive = keep_alive_of(body.keep_alive)
        lease, (stream, first) = await manager.open(config, Capability.SPEECH, start, keep_alive)
        life = life_of(request)
        life.on_end(lease.release)
        life.on_end(stream.aclose)  # closed first: the backend stops speaking
        headers = {}
        if first is not None and audio_format == pb.AUDIO_FORMAT_PCM:
            headers["X-Sample-Rate"] = str(first.sample_rate)
        # The backend's audio is taken as it is made, whatever the client's pace: its slot goes
        # back when the backend is done, not when a slow client has read the last byte.
        pieces: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def take() -> None:
            item = first
            try:
                while item is not None:
                    for at in range(0, len(item.audio), _PIECE_BYTES):
                        pieces.put_nowait(item.audio[at : at + _PIECE_BYTES])
                    item = await anext(stream, None)
                lease.release()
            except OpenAIError as exc:
                # The status went out with the first bytes: the stream ends short. A backend
                # that died must be known dead before its slot goes back.
                error = await manager.failed(lease, exc)
                log.warning("speech for %s ended early: %s", config.name, error.message)
            finally:
                pieces.put_nowait(None)

        taking = asyncio.create_task(take())

        def stop_taking() -> None:
            taking.cancel()

        life.on_end(stop_taking)

        async def audio() -> AsyncIterator[bytes]:
            while (piece := await pieces.get()) is not None:
                yield piece

        return Stream(audio(), media_type=media_type, headers=headers)

    @get("/voices")
    async def voices(
        self,
        request: Request[Any, Any, Any],
        manager: NamedDependency[BackendManager],
        model: str | None = None,
    ) -> VoiceList:
        """The voices of a speech model (`?model=`), or of every speech model. Answered from
        what the model's backend said when it was last asked, without waiting for a slot
        while it speaks."""
        if model:
            configs = [await _speech_model(request, manager, model)]
        else:
            names = await models_of(manager, "speech")
            configs = [await resolve_model(request, manager, name) for name in names]
        data = []
        for config in configs:
            answer = await manager.voices(config)
            data += [
                VoiceInfo(
                    id=voice.name,
                    name=voice.name,
                    model=config.name,
                    language=voice.language,
                    default=voice.name == answer.default_voice,
                )
                for voice in answer.voices
            ]
        return VoiceList(data=data, voices=data)


async def _speech_model(
    request: Request[Any, Any, Any], manager: BackendManager, name: str
) -> ModelConfig:
    """The speech model `name`; OpenAI's own model names mean the models dir's only one."""
    try:
        config = await resolve_model(request, manager, name)
    except OpenAIError as exc:
        if exc.status != 404 or name not in _OPENAI_MODELS:
            raise
        speaking = await models_of(manager, "speech")
        if len(speaking) != 1:
            raise model_not_found(name) from None
        config = await resolve_model(request, manager, speaking[0])
    require_kind(config, {"speech"}, "speech (text to speech)")
    return config
