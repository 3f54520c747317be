"""/v1/audio/speech and /v1/audio/voices wire types."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from gateway.schemas.common import KeepAlive

#: OpenAI's limit on the text of one request.
MAX_SPEECH_CHARACTERS = 4096

SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]


class SpeechRequest(msgspec.Struct, kw_only=True):
    model: str
    input: Annotated[str, msgspec.Meta(max_length=MAX_SPEECH_CHARACTERS)]
    # OpenAI requires a voice; a client that sends none gets the model's default.
    voice: str | None = None
    # OpenAI's spec lets these be null, meaning their defaults (set in __post_init__).
    response_format: SpeechFormat | None = "mp3"
    speed: Annotated[float, msgspec.Meta(ge=0.25, le=4.0)] | None = 1.0
    # OpenAI's: "sse" streams base64 events; "audio" (the default) the file's bytes.
    stream_format: Literal["audio", "sse"] | None = None
    # OpenAI's gpt-4o-mini-tts reads these as a style prompt; a Piper voice cannot: ignored.
    instructions: str | None = None
    keep_alive: KeepAlive = None

    def __post_init__(self) -> None:
        if self.response_format is None:
            self.response_format = "mp3"
        if self.speed is None:
            self.speed = 1.0


class VoiceInfo(msgspec.Struct):
    id: str
    name: str
    model: str
    language: str
    default: bool
    object: str = "voice"


class VoiceList(msgspec.Struct):
    data: list[VoiceInfo]
    #: The same list under the key Open WebUI (and Kokoro-FastAPI's clients) read.
    voices: list[VoiceInfo]
    object: str = "list"
