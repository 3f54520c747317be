"""Audio form fields to TranscribeRequest, and its answer in the five OpenAI response formats."""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.errors import invalid_request
from gateway.schemas.audio import (
    Transcription,
    TranscriptionSegment,
    TranscriptionVerbose,
    TranscriptionWord,
)
from protos.hearth.backend.v1 import backend_pb2 as pb

RESPONSE_FORMATS = {
    "json": "application/json",
    "verbose_json": "application/json",
    # Litestar adds "; charset=utf-8" to text/* types itself.
    "text": "text/plain",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt",
}
GRANULARITIES = frozenset({"segment", "word"})


def transcribe_request(
    *,
    audio: bytes,
    filename: str,
    translate: bool,
    language: str | None,
    prompt: str | None,
    temperature: str | None,
    response_format: str,
    granularities: list[str],
    max_audio_seconds: float,
) -> pb.TranscribeRequest:
    """Checked form fields as the backend's request; the backend refuses audio past the limit."""
    if response_format not in RESPONSE_FORMATS:
        raise invalid_request(
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}",
            param="response_format",
        )
    unknown = set(granularities) - GRANULARITIES
    if unknown:
        raise invalid_request(
            f"timestamp_granularities may hold 'segment' and 'word', not {sorted(unknown)}",
            param="timestamp_granularities",
        )
    if granularities and response_format != "verbose_json":
        raise invalid_request(
            "timestamp_granularities needs response_format verbose_json",
            param="timestamp_granularities",
        )
    request = pb.TranscribeRequest(
        audio=audio,
        filename=filename,
        task=pb.TRANSCRIPTION_TASK_TRANSLATE if translate else pb.TRANSCRIPTION_TASK_TRANSCRIBE,
        language=(language or "").strip().lower(),
        prompt=prompt or "",
        word_timestamps="word" in granularities,
        max_audio_seconds=max_audio_seconds,
    )
    if temperature not in (None, ""):
        try:
            value = float(temperature)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise invalid_request("temperature must be a number from 0 to 1", param="temperature")
        request.temperature = value
    return request


def _clock(seconds: float, separator: str) -> str:
    millis = round(max(seconds, 0.0) * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt(response: pb.TranscribeResponse) -> str:
    blocks = [
        f"{index}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n"
        for index, s in enumerate(response.segments, start=1)
    ]
    return "\n".join(blocks)


def vtt(response: pb.TranscribeResponse) -> str:
    blocks = [
        f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n"
        for s in response.segments
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render(
    response: pb.TranscribeResponse, *, response_format: str, translate: bool, words: bool
) -> tuple[Any, str]:
    """The body and media type for `response_format`."""
    media_type = RESPONSE_FORMATS[response_format]
    if response_format == "text":
        return response.text + "\n", media_type
    if response_format == "srt":
        return srt(response), media_type
    if response_format == "vtt":
        return vtt(response), media_type
    if response_format == "json":
        return msgspec.json.encode(Transcription(text=response.text)), media_type
    verbose = TranscriptionVerbose(
        task="translate" if translate else "transcribe",
        language="en" if translate else response.language,
        duration=response.duration,
        text=response.text,
        segments=[
            TranscriptionSegment(
                id=s.id,
                seek=s.seek,
                start=s.start,
                end=s.end,
                text=s.text,
                tokens=list(s.tokens),
                temperature=s.temperature,
                avg_logprob=s.avg_logprob,
                compression_ratio=s.compression_ratio,
                no_speech_prob=s.no_speech_prob,
            )
            for s in response.segments
        ],
        words=[TranscriptionWord(word=w.word, start=w.start, end=w.end) for w in response.words]
        if words
        else None,
    )
    return msgspec.json.encode(verbose), media_type
