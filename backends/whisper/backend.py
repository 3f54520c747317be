"""faster-whisper (CTranslate2): transcription and translation of audio that arrives as bytes.

The upload is decoded in memory by PyAV (wav, mp3, flac, ogg, m4a, webm, ...), never written to a
shared path, so the backend can live on another host. Segments are produced lazily by
faster-whisper; a cancelled call stops between segments.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import wave
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from backends.runtime import Backend, BackendError, Capability, invalid
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Reason

log = logging.getLogger("hearth.backend.whisper")

# Models are local directories: never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLE_RATE = 16000
_COMPUTE_TYPES = ("int8", "int8_float32", "float32", "float16", "int8_float16", "default")


def decode(audio: bytes) -> Any:
    """The upload as 16 kHz mono float32 samples; anything PyAV cannot read is invalid_audio."""
    import av
    from faster_whisper import decode_audio

    if not audio:
        raise invalid("invalid_audio", "the audio file is empty", param="file")
    try:
        samples = decode_audio(io.BytesIO(audio), sampling_rate=SAMPLE_RATE)
    except (av.error.FFmpegError, ValueError, IndexError, StopIteration) as exc:
        raise invalid(
            "invalid_audio",
            f"cannot decode the audio (send wav, mp3, flac, ogg, m4a or webm): {exc}",
            param="file",
        ) from None
    if len(samples) == 0:
        raise invalid("invalid_audio", "the file holds no audio samples", param="file")
    return samples


class WhisperBackend(Backend):
    """One CTranslate2 Whisper model directory."""

    name = "whisper"

    def __init__(self) -> None:
        self.model: Any = None
        self.beam_size = 5
        self.vad_filter = False
        self.fallback = True
        self.max_new_tokens: Any = None
        self.multilingual = True

    def load(self, request: pb.LoadRequest) -> pb.LoadResponse:
        from faster_whisper import WhisperModel

        path = Path(request.model_path)
        if not request.model_path:
            raise invalid("model_missing", "the model YAML names no model directory")
        if not (path / "model.bin").is_file():
            raise FileNotFoundError(f"no CTranslate2 model.bin in {path}")
        options = json_format.MessageToDict(request.options)
        compute_type = str(options.get("compute_type", "int8"))
        if compute_type not in _COMPUTE_TYPES:
            raise invalid(
                "invalid_option",
                f"options.compute_type must be one of {', '.join(_COMPUTE_TYPES)}",
            )
        self.beam_size = int(options.get("beam_size", 5))
        self.vad_filter = bool(options.get("vad_filter", False))
        self.fallback = bool(options.get("temperature_fallback", True))
        self.max_new_tokens = options.get("max_new_tokens")
        try:
            self.model = WhisperModel(
                str(path),
                device=str(options.get("device", "cpu")),
                compute_type=compute_type,
                cpu_threads=request.threads or 0,
                local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise invalid(
                "invalid_model", f"faster-whisper cannot load {path.name}: {exc}"
            ) from None
        self.multilingual = bool(self.model.model.is_multilingual)
        self._warm_up()
        log.info(
            "loaded %s (%s, %s, beam %d%s)",
            path.name,
            compute_type,
            "multilingual" if self.multilingual else "English only",
            self.beam_size,
            ", VAD" if self.vad_filter else "",
        )
        return pb.LoadResponse(threads=request.threads or 4)  # faster-whisper's own default

    def _warm_up(self) -> None:
        """Transcribe a second of quiet, as a request would: the audio decoder's libraries and
        the engine's buffers are set up now, not in the first request (which is then faster,
        and the memory measured after load is what serving takes)."""
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            out.writeframes(bytes(2 * SAMPLE_RATE))
        segments, _ = self.model.transcribe(
            decode(buffer.getvalue()), beam_size=self.beam_size, max_new_tokens=4
        )
        for _ in segments:
            pass

    def unload(self) -> None:
        self.model = None

    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.TRANSCRIPTION})

    def transcribe(
        self, request: pb.TranscribeRequest, cancelled: threading.Event
    ) -> pb.TranscribeResponse:
        translate = request.task == pb.TRANSCRIPTION_TASK_TRANSLATE
        if translate and not self.multilingual:
            raise invalid(
                Reason.UNSUPPORTED,
                "this is an English-only Whisper model: it cannot translate",
                param="model",
            )
        language = request.language or None
        if language and language not in self.model.supported_languages:
            raise invalid(
                "invalid_language",
                f"'{language}' is not a language this model knows (use ISO-639-1, e.g. 'en')",
                param="language",
            )
        samples = decode(request.audio)
        # OpenAI: 0 (or unset) lets the model raise the temperature when decoding fails.
        temperature: Any = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if self.fallback else 0.0
        if request.HasField("temperature") and request.temperature > 0:
            temperature = request.temperature
        segments, info = self.model.transcribe(
            samples,
            language=language,
            task="translate" if translate else "transcribe",
            beam_size=self.beam_size,
            initial_prompt=request.prompt or None,
            temperature=temperature,
            word_timestamps=request.word_timestamps,
            vad_filter=self.vad_filter,
            max_new_tokens=int(self.max_new_tokens) if self.max_new_tokens else None,
        )
        response = pb.TranscribeResponse(language=info.language, duration=info.duration)
        texts = []
        for index, segment in enumerate(segments):
            if cancelled.is_set():
                log.info("transcription cancelled after %d segments", index)
                raise BackendError(grpc.StatusCode.CANCELLED, Reason.CANCELLED, "cancelled")
            texts.append(segment.text)
            response.segments.append(
                pb.TranscriptionSegment(
                    id=index,
                    seek=segment.seek,
                    start=segment.start,
                    end=segment.end,
                    text=segment.text,
                    tokens=segment.tokens,
                    temperature=segment.temperature or 0.0,
                    avg_logprob=segment.avg_logprob,
                    compression_ratio=segment.compression_ratio,
                    no_speech_prob=segment.no_speech_prob,
                )
            )
            for word in segment.words or ():
                response.words.append(
                    pb.TranscriptionWord(
                        word=word.word,
                        start=word.start,
                        end=word.end,
                        probability=word.probability,
                    )
                )
        response.text = "".join(texts).strip()
        return response
