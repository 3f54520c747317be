"""faster-whisper (CTranslate2): transcription and translation of audio that arrives as bytes.

The upload is decoded in memory by PyAV (wav, mp3, flac, ogg, m4a, webm, ...), never written to a
shared path, so the backend can live on another host. Long audio is transcribed in chunks (see
CHUNK_SECONDS), so that what it takes beyond its samples is bounded by the chunk. Segments are
produced lazily by faster-whisper; a cancelled call stops between segments and between chunks.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import threading
import wave
from collections.abc import Generator, Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format

from backends.runtime import Backend, BackendError, Capability, invalid
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Reason

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

log = logging.getLogger("hearth.backend.whisper")

# Models are local directories: never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLE_RATE = 16000
#: Source samples resampled at once: large enough to keep the resampler's per-call cost small,
#: small enough that decoding stops within a few seconds of the limit.
_GROUP_SAMPLES = 65536
_COMPUTE_TYPES = ("int8", "int8_float32", "float32", "float16", "int8_float16", "default")

#: The most audio given to faster-whisper at once, in seconds (options.chunk_seconds overrides
#: it). faster-whisper computes the log-mel features of all the audio it is given before it
#: decodes the first window, with numpy's STFT, at a peak of about 0.9 MiB per second of audio: an
#: hour took the backend to 3.6 GB. A 240 s chunk peaks at about 230 MiB above the samples (300 s
#: at 280 MiB), and each chunk costs at most one short window more than a single call would.
CHUNK_SECONDS = 240.0
#: Shorter than one Whisper window would only add windows.
MIN_CHUNK_SECONDS = 30.0
#: A chunk ends at the quietest moment of its last few seconds, so that words are rarely cut.
_CUT_SEARCH_SECONDS = 5.0
_CUT_FRAME = 320  # 20 ms: energy is measured frame by frame
_CUT_SMOOTHING = 9  # frames summed: the quietest 180 ms, not the quietest instant
_HOP = 160  # faster-whisper's feature frame (10 ms): cuts fall on one, so `seek` shifts exactly
#: faster-whisper's own default: a window decoded above this temperature starts the text it
#: passes on to the next window afresh.
_PROMPT_RESET_ON_TEMPERATURE = 0.5


def decode(audio: bytes, max_seconds: float = 0.0) -> npt.NDArray[np.float32]:
    """The upload as 16 kHz mono float32 samples, the same as faster_whisper.decode_audio's.

    Decoded a group of frames at a time and stopped once past `max_seconds` (0: no limit) with
    audio_too_long, so memory is bounded by the limit, not by how well the upload compresses
    (25 MB of Opus silence is hours of audio, tens of GB as samples). Anything PyAV cannot read
    is invalid_audio.
    """
    import av
    import numpy as np

    if not audio:
        raise invalid("invalid_audio", "the audio file is empty", param="file")
    most = round(max_seconds * SAMPLE_RATE) if max_seconds > 0 else None
    # Kept as s16 until the end (half the bytes of float32), in one block that grows in place and
    # goes back to the system whole when freed: a list of small arrays stays resident once freed.
    pcm = bytearray()
    try:
        with closing(_resampled(audio)) as groups:
            for chunk in groups:
                pcm.extend(chunk)  # the array's bytes, through the buffer protocol
                if most is not None and len(pcm) > 2 * most:
                    pcm.clear()  # a traceback keeps this frame's locals alive
                    raise invalid(
                        Reason.AUDIO_TOO_LONG,
                        f"the audio is longer than this server's limit of {max_seconds:g} "
                        "seconds (the server setting HEARTH_MAX_AUDIO_SECONDS raises it)",
                        param="file",
                    )
    except (av.error.FFmpegError, ValueError, IndexError, StopIteration) as exc:
        raise invalid(
            "invalid_audio",
            f"cannot decode the audio (send wav, mp3, flac, ogg, m4a or webm): {exc}",
            param="file",
        ) from None
    if not pcm:
        raise invalid("invalid_audio", "the file holds no audio samples", param="file")
    # Exactly faster-whisper's astype(float32) / 32768: a power of two.
    samples = np.multiply(np.frombuffer(pcm, dtype=np.int16), np.float32(1 / 32768))
    return samples


def _resampled(audio: bytes) -> Generator[npt.NDArray[np.int16], None, None]:
    """The first audio stream as 16 kHz mono s16, in chunks of one resampled group each.

    faster-whisper's steps (frames grouped in a FIFO without their timestamps, then resampled;
    the resampler flushed at the end), in smaller groups so that the limit is checked often.
    """
    import av
    import numpy as np

    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    fifo = av.AudioFifo()

    def resample(group: av.AudioFrame | None) -> Iterator[npt.NDArray[np.int16]]:
        for out in resampler.resample(group):
            yield out.to_ndarray().reshape(-1).astype(np.int16, copy=False)

    with av.open(io.BytesIO(audio), mode="r", metadata_errors="ignore") as container:
        frames = container.decode(audio=0)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.error.InvalidDataError:
                break  # corrupt data ends the audio, as in faster-whisper
            frame.pts = None
            fifo.write(frame)
            if fifo.samples >= _GROUP_SAMPLES:
                yield from resample(fifo.read())
    if fifo.samples:
        yield from resample(fifo.read())
    yield from resample(None)  # flush the resampler


def chunk_bounds(samples: npt.NDArray[np.float32], chunk_seconds: float) -> list[tuple[int, int]]:
    """(start, end) sample indices of chunks of at most `chunk_seconds` that cover `samples`.

    As few chunks as that allows, about equally long (no short tail), each ending at the
    quietest moment of the last few seconds before where an equal split would end it.
    """
    most = round(chunk_seconds * SAMPLE_RATE)
    search = round(_CUT_SEARCH_SECONDS * SAMPLE_RATE)
    total = len(samples)
    if total <= most:
        return [(0, total)]
    # Equal parts of at most `most - search`: a part that starts up to `search` early still fits.
    count = math.ceil(total / (most - search))
    cuts = [0]
    for number in range(1, count):
        nominal = number * total // count
        cuts.append(_quietest(samples, math.ceil((nominal - search) / _HOP) * _HOP, nominal))
    cuts.append(total)
    return list(itertools.pairwise(cuts))


def _quietest(samples: npt.NDArray[np.float32], start: int, end: int) -> int:
    """The middle of the quietest stretch of `samples[start:end]`: the longest, and then the
    latest, of the equally quiet ones (digital silence ties)."""
    import numpy as np

    frames = (end - start) // _CUT_FRAME
    if frames < _CUT_SMOOTHING:
        return start
    window = samples[start : start + frames * _CUT_FRAME].reshape(frames, _CUT_FRAME)
    energy = np.einsum("ij,ij->i", window, window, dtype=np.float64)
    # smoothed[i] is the energy of frames i .. i + _CUT_SMOOTHING - 1.
    smoothed = np.convolve(energy, np.ones(_CUT_SMOOTHING), mode="valid")
    quiet = np.flatnonzero(smoothed <= smoothed.min())
    runs = np.split(quiet, np.flatnonzero(np.diff(quiet) > 1) + 1)
    run = max(reversed(runs), key=len)
    frame = int(run[len(run) // 2]) + _CUT_SMOOTHING // 2
    return start + frame * _CUT_FRAME + _CUT_FRAME // 2


def _chunk_seconds(value: object) -> float:
    """`options.chunk_seconds`, checked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        value = None
    if value is None or value < MIN_CHUNK_SECONDS:
        raise invalid(
            "invalid_option",
            f"options.chunk_seconds must be a number of seconds, at least {MIN_CHUNK_SECONDS:g}",
        )
    return float(value)


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
        self.chunk_seconds = CHUNK_SECONDS

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
        self.chunk_seconds = _chunk_seconds(options.get("chunk_seconds", CHUNK_SECONDS))
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
        samples = decode(request.audio, request.max_audio_seconds)
        # OpenAI: 0 (or unset) lets the model raise the temperature when decoding fails.
        temperature: Any = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if self.fallback else 0.0
        if request.HasField("temperature") and request.temperature > 0:
            temperature = request.temperature
        options = {
            "task": "translate" if translate else "transcribe",
            "beam_size": self.beam_size,
            "temperature": temperature,
            "word_timestamps": request.word_timestamps,
            "vad_filter": self.vad_filter,
            "max_new_tokens": int(self.max_new_tokens) if self.max_new_tokens else None,
            "prompt_reset_on_temperature": _PROMPT_RESET_ON_TEMPERATURE,
        }
        bounds = chunk_bounds(samples, self.chunk_seconds)
        if len(bounds) > 1:
            log.info(
                "transcribing %.0f s of audio in %d chunks", len(samples) / SAMPLE_RATE, len(bounds)
            )
        response = pb.TranscribeResponse(duration=len(samples) / SAMPLE_RATE)
        # What one faster-whisper call would pass on from window to window (the request's prompt,
        # then each window's tokens, afresh after a window decoded hot), carried into the next
        # chunk as its initial prompt, so that chunking changes the text as little as it can.
        context: list[int] = []
        if request.prompt and len(bounds) > 1:
            context = self.model.hf_tokenizer.encode(
                " " + request.prompt.strip(), add_special_tokens=False
            ).ids
        texts: list[str] = []
        for number, (start, end) in enumerate(bounds):
            if cancelled.is_set():
                log.info("transcription cancelled after %d of %d chunks", number, len(bounds))
                raise BackendError(grpc.StatusCode.CANCELLED, Reason.CANCELLED, "cancelled")
            first = number == 0
            segments, info = self.model.transcribe(
                samples[start:end],
                language=language,
                initial_prompt=(request.prompt or None) if first else (context or None),
                **options,
            )
            if first:
                response.language = language = info.language
            offset = start / SAMPLE_RATE
            for segment in segments:
                if cancelled.is_set():
                    log.info("transcription cancelled after %d segments", len(texts))
                    raise BackendError(grpc.StatusCode.CANCELLED, Reason.CANCELLED, "cancelled")
                texts.append(segment.text)
                if (segment.temperature or 0.0) > _PROMPT_RESET_ON_TEMPERATURE:
                    context = []
                else:
                    context = [*context, *segment.tokens][-(self.model.max_length // 2 - 1) :]
                response.segments.append(
                    pb.TranscriptionSegment(
                        id=len(response.segments),
                        seek=segment.seek + start // _HOP,
                        start=segment.start + offset,
                        end=segment.end + offset,
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
                            start=word.start + offset,
                            end=word.end + offset,
                            probability=word.probability,
                        )
                    )
            del segments, info  # this chunk's features go before the next chunk's are made
        response.text = "".join(texts).strip()
        return response
