"""/v1/audio/transcriptions and /v1/audio/translations wire types (the JSON answers)."""

from __future__ import annotations

import msgspec


class Transcription(msgspec.Struct):
    text: str


class TranscriptionSegment(msgspec.Struct):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionWord(msgspec.Struct):
    word: str
    start: float
    end: float


class TranscriptionVerbose(msgspec.Struct, omit_defaults=True):
    task: str
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment] = msgspec.field(default_factory=list)
    words: list[TranscriptionWord] | None = None
