"""Piper voices (VITS models in ONNX) run by onnxruntime: text to speech, sentence by sentence.

A voice is a `<name>.onnx` file with its `<name>.onnx.json` beside it (sample rate, the espeak-ng
voice, the phoneme→id table, default scales). Text becomes phonemes through the `espeak-ng`
program, run as a separate process (so this backend neither links nor imports espeak-ng's GPL
code), once per sentence, its clauses on lines of their own: the program drops punctuation, which
Piper voices were trained to hear, so each clause's mark is put back after its phonemes. The text
is spoken a sentence at a time, a long one in several model calls (each of a bounded number of
phoneme ids, which bounds the audio, and so the memory, of one call), and each call's audio is
encoded and sent as soon as it is made, so that a client hears the first sentence while the rest
is being synthesized.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format

from backends.runtime import Backend, BackendError, Capability, invalid
from backends.runtime.audio_out import AudioEncoder
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Reason

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

log = logging.getLogger("hearth.backend.piper")

#: The voices of OpenAI's speech API. Clients send one of them by default (the openai SDK's
#: examples say "alloy"), so each means this model's default voice, unless the model has a
#: voice of that name.
OPENAI_VOICES = frozenset(
    {
        "alloy",
        "ash",
        "ballad",
        "coral",
        "echo",
        "fable",
        "onyx",
        "nova",
        "sage",
        "shimmer",
        "verse",
        "marin",
        "cedar",
    }
)
MIN_SPEED = 0.25
MAX_SPEED = 4.0
#: Seconds of silence between two sentences (options.sentence_silence).
SENTENCE_SILENCE = 0.2
#: A piece shorter than this ("Hi.", "Dr.") is spoken with the next one, in the same model call:
#: a lone word or abbreviation is then read in the flow of what follows it.
_MIN_SENTENCE_CHARS = 12
#: A longer sentence is phonemized (and its progress reported) in pieces of at most this many
#: characters, cut at a comma, else a space. This bounds one espeak-ng run, not the memory.
_MAX_SENTENCE_CHARS = 1000
#: The most phoneme ids (with ^ _ $) in one model call at the voice's normal pace; slower speech
#: gets fewer. onnxruntime's buffers grow with the audio of one call and stay at the largest
#: size they reached, and the audio an id makes depends on what it is: measured on
#: en_US-joe-medium, 300 ids are 7.6 s of prose, 5.4 s of "77, 77, ...", and 15 s of "s: s: ...",
#: the most audio per id found (20 ids a second; prose is 40, a comma's pause 80). A sentence
#: over the limit is cut at a clause's end, else between words.
_MAX_CALL_IDS = 300
_MIN_CALL_IDS = 20
_ESPEAK_PROGRAM = "espeak-ng"
_ESPEAK_TIMEOUT_SECONDS = 30.0
#: A line of raw phonemes espeak-ng is given between two clauses, to find where each clause's
#: output ends (the input's own [[ ]] are neutralised first, so no text can make it).
_SEPARATOR = "[[zZzZ]]"
_ESPEAK_MISSING = "the piper backend needs the espeak-ng program: apt-get install espeak-ng"
#: The scales a voice's JSON (inference) and the options may set: default, lowest, highest.
_SCALES = (
    ("noise_scale", 0.667, 0.0, 10.0),
    ("length_scale", 1.0, 0.05, 20.0),
    ("noise_w", 0.8, 0.0, 10.0),
)
_FORMATS = frozenset(
    {
        pb.AUDIO_FORMAT_WAV,
        pb.AUDIO_FORMAT_MP3,
        pb.AUDIO_FORMAT_FLAC,
        pb.AUDIO_FORMAT_OPUS,
        pb.AUDIO_FORMAT_AAC,
        pb.AUDIO_FORMAT_PCM,
    }
)
# Piper's phoneme ids: the start, the end, and the pad placed after every phoneme.
_BOS, _EOS, _PAD = "^", "$", "_"

#: Closing quotes and brackets, which stay with the mark before them.
_CLOSERS = "\"'\u201d\u2019)\\]"
#: A full stop, except the last of an abbreviation's ("e.g.", "U.S."): espeak-ng reads those as
#: words only when it sees what follows them.
_STOP = r"(?<!\.\w)\."
#: Where a sentence ends: . ! ? (with any more marks and closing quotes or brackets) before a
#: space, or a line break.
_SENTENCE_END = re.compile(rf"(?:[!?]|{_STOP})[.!?]*[{_CLOSERS}]*(?=\s)|\n")
#: A clause: text up to a punctuation mark before a space (the mark is kept, as Piper's
#: training text had it), a line break, or the end.
_CLAUSE = re.compile(rf"\s*(.*?)\s*(?:([,;:!?]|{_STOP})[.,;:!?{_CLOSERS}]*(?=\s|$)|(\n)|$)", re.S)
#: Where a long sentence may be cut, best first: after a clause mark, then at a space.
_CUT_POINTS = (re.compile(r"[,;:]\s"), re.compile(r"\s"))
#: What `prepare` changes, character for character: control characters but the line break
#: become spaces, a carriage return a line break, and square brackets round ones (espeak-ng reads
#: the text inside [[ ]] as its own phoneme codes; it reads round brackets as it reads square).
_PREPARED = str.maketrans(
    {**{c: " " for c in [*range(0x20), 0x7F] if c != 0x0A}, 0x0D: "\n", "[": "(", "]": ")"}
)


@dataclass
class PiperVoice:
    """One loaded voice: its ONNX session and what its config file says."""

    name: str
    #: The short name ("joe" for en_US-joe-medium), when no other voice has it.
    short_name: str | None
    #: BCP-47 ("en-US").
    language: str
    espeak_voice: str
    sample_rate: int
    phoneme_ids: dict[str, list[int]]
    noise_scale: float
    length_scale: float
    noise_w: float
    multi_speaker: bool
    session: Any

    @property
    def listed_name(self) -> str:
        """The name ListVoices shows (both names are accepted)."""
        return self.short_name or self.name


def prepare(text: str) -> str:
    """`text` as it is split and phonemized, as long as it (so that its offsets are the input's):
    line breaks kept ("\\r\\n" is two, and the empty line between them is dropped), other control
    characters spaces, and no [[ ]] that espeak-ng would read as phoneme codes."""
    return text.translate(_PREPARED)


def sentences(text: str, longest: int = _MAX_SENTENCE_CHARS) -> list[tuple[int, int]]:
    """(start, end) of the pieces of `text` phonemized one espeak-ng run each (and spoken in as
    many model calls as their phoneme ids need): its sentences (ending at . ! ? or a line break,
    the mark kept), a short one joined to the next, one longer than `longest` characters cut."""
    spans: list[tuple[int, int]] = []
    start = 0
    for end in [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]:
        span = _stripped(text, start, end)
        start = end
        if span is None:
            continue
        if spans and spans[-1][1] - spans[-1][0] < _MIN_SENTENCE_CHARS:
            spans[-1] = (spans[-1][0], span[1])
        else:
            spans.append(span)
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < _MIN_SENTENCE_CHARS:
        last = spans.pop()
        spans[-1] = (spans[-1][0], last[1])
    return [piece for span in spans for piece in _cut(text, *span, longest)]


def _stripped(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _cut(text: str, start: int, end: int, longest: int) -> Iterator[tuple[int, int]]:
    """`text[start:end]` in pieces of at most `longest` characters, cut where a reader pauses."""
    while end - start > longest:
        window = text[start : start + longest]
        cut = longest
        for pattern in _CUT_POINTS:
            found = [m.start() + 1 for m in pattern.finditer(window)]
            if found:
                cut = found[-1]
                break
        piece = _stripped(text, start, start + cut)
        if piece is not None:
            yield piece
        start += cut
    rest = _stripped(text, start, end)
    if rest is not None:
        yield rest


def clauses(sentence: str) -> list[tuple[str, str]]:
    """The clauses of a sentence, each with the punctuation mark that ends it ("" for none; a
    line break without a mark is a comma's pause)."""
    found = []
    for match in _CLAUSE.finditer(sentence):
        text, mark, line_break = match.groups()
        if text or mark:
            found.append((text, mark or ("," if line_break else "")))
    return found


def to_int16(audio: npt.NDArray[np.float32]) -> npt.NDArray[np.int16]:
    """Float samples as 16-bit ones. Scaled down only where they overshoot full scale: scaling
    every sentence up to full scale (as piper-tts does) makes the volume pump between sentences."""
    import numpy as np

    peak = float(np.abs(audio).max(initial=0.0))
    if peak > 1.0:
        audio = audio / peak
    return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)


def _language(config: dict[str, Any], espeak_voice: str) -> str:
    """BCP-47 from the config's language.code ("en_US" → "en-US"), else the espeak voice's."""
    language = config.get("language")
    code = language.get("code") if isinstance(language, dict) else None
    return str(code or espeak_voice).replace("_", "-")


def _short_name(stem: str) -> str | None:
    """The speaker's part of a Piper file name: <language>-<name>-<quality>."""
    first, last = stem.find("-"), stem.rfind("-")
    if not 0 <= first < last - 1:
        return None
    return stem[first + 1 : last]


def _number(
    options: dict[str, Any],
    key: str,
    default: float,
    low: float,
    high: float,
    where: str = "options.",
    reason: str = "invalid_option",
) -> float:
    """`options[key]`, a number within [low, high]; `where` names the dict in the error."""
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        value = None
    if value is None or not low <= value <= high:
        raise invalid(reason, f"{where}{key} must be a number from {low:g} to {high:g}")
    return float(value)


def _section(config: dict[str, Any], key: str, name: str, required: bool = True) -> dict[str, Any]:
    """`config[key]`, a JSON object (an absent optional one is empty)."""
    value = config.get(key, None if required else {})
    if not isinstance(value, dict):
        what = "missing" if value is None else f"a {type(value).__name__}, not an object"
        raise invalid("invalid_model", f"{name}: {key} is {what}")
    return value


def _read_config(config_path: Path) -> dict[str, Any]:
    """A voice's JSON config, its shape checked: what a Piper voice's needs to be."""
    name = config_path.name
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise invalid("invalid_model", f"{name} is not a Piper voice config ({exc})") from None
    if not isinstance(config, dict):
        raise invalid("invalid_model", f"{name}: the config is not a JSON object")
    sample_rate = _section(config, "audio", name).get("sample_rate")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise invalid("invalid_model", f"{name}: audio.sample_rate is not a positive integer")
    voice = _section(config, "espeak", name).get("voice")
    if not isinstance(voice, str) or not voice or voice.startswith("-"):
        raise invalid("invalid_model", f"{name}: espeak.voice is not an espeak-ng voice name")
    for phoneme, ids in _section(config, "phoneme_id_map", name).items():
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        ):
            raise invalid(
                "invalid_model", f"{name}: phoneme_id_map[{phoneme!r}] is not a list of ids"
            )
    _section(config, "inference", name, required=False)
    speakers = config.get("num_speakers", 1)
    if isinstance(speakers, bool) or not isinstance(speakers, int) or speakers < 1:
        raise invalid("invalid_model", f"{name}: num_speakers is not a positive integer")
    return config


def _voice_files(path: Path) -> list[Path]:
    """The .onnx files a model path names: the file itself, or every one in the folder."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no Piper voice at {path}")
    files = sorted(p for p in path.glob("*.onnx") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no Piper voice (.onnx and .onnx.json) in {path}")
    return files


class PiperBackend(Backend):
    """One or more Piper voices, each an ONNX model and its JSON config."""

    name = "piper"

    def __init__(self) -> None:
        self.voices: list[PiperVoice] = []
        self._by_name: dict[str, PiperVoice] = {}
        self.default_voice: PiperVoice | None = None
        self.sentence_silence = SENTENCE_SILENCE
        self._espeak = _ESPEAK_PROGRAM
        self._separators: dict[str, str | None] = {}

    # Lifecycle --------------------------------------------------------------------------------

    def load(self, request: pb.LoadRequest) -> pb.LoadResponse:
        import onnxruntime

        if not request.model_path:
            raise invalid("model_missing", "the model YAML names no voice file or folder")
        espeak = shutil.which(_ESPEAK_PROGRAM)
        if espeak is None:
            raise BackendError(
                grpc.StatusCode.FAILED_PRECONDITION, Reason.LOAD_FAILED, _ESPEAK_MISSING
            )
        self._espeak = espeak
        options = json_format.MessageToDict(request.options)
        self.sentence_silence = _number(options, "sentence_silence", SENTENCE_SILENCE, 0.0, 10.0)
        threads = request.threads or min(4, os.cpu_count() or 1)
        settings = onnxruntime.SessionOptions()
        settings.intra_op_num_threads = threads
        settings.inter_op_num_threads = 1
        # Threads that spin after each run burn the cores other models compute on; measured on
        # this model, not spinning was as fast.
        settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # A memory pattern is planned per input shape, and every model call has a shape of its own:
        # measured over 140 calls of up to 7 s of audio, the process grew to 476 MiB with
        # patterns, 344 MiB without, at the same speed.
        settings.enable_mem_pattern = False
        voices = [
            self._read_voice(onnx, options, settings)
            for onnx in _voice_files(Path(request.model_path))
        ]
        self._name_voices(voices)
        wanted = str(options.get("default_voice") or "")
        self.default_voice = self._by_name.get(wanted.casefold()) if wanted else voices[0]
        if self.default_voice is None:
            known = ", ".join(v.listed_name for v in voices)
            raise invalid(
                "invalid_option", f"options.default_voice {wanted!r} is none of the voices: {known}"
            )
        for voice in voices:
            try:
                self._warm_up(voice)
            except BackendError as exc:  # espeak-ng lacks the voice's language, say
                raise invalid(
                    "invalid_model", f"{voice.name} cannot speak: {exc.message}"
                ) from None
        log.info(
            "loaded %s; default voice %s, %g s between sentences, %d thread(s)",
            ", ".join(f"{v.listed_name} ({v.language}, {v.sample_rate} Hz)" for v in voices),
            self.default_voice.listed_name,
            self.sentence_silence,
            threads,
        )
        return pb.LoadResponse(threads=threads)

    def _read_voice(self, onnx: Path, options: dict[str, Any], settings: Any) -> PiperVoice:
        import onnxruntime

        config_path = onnx.with_name(onnx.name + ".json")
        if not config_path.is_file():
            raise FileNotFoundError(f"no {config_path.name} beside {onnx.name}")
        config = _read_config(config_path)
        espeak_voice = config["espeak"]["voice"]
        ids: dict[str, list[int]] = config["phoneme_id_map"]
        # The voice's own scales, checked as the JSON's; options may then override them.
        inference = config.get("inference", {})
        json_scales = {
            key: _number(
                inference,
                key,
                default,
                low,
                high,
                where=f"{config_path.name}: inference.",
                reason="invalid_model",
            )
            for key, default, low, high in _SCALES
        }
        scales = {
            key: _number(options, key, json_scales[key], low, high) for key, _, low, high in _SCALES
        }
        phoneme_type = config.get("phoneme_type", "espeak")
        if phoneme_type != "espeak":
            raise invalid(
                "invalid_model",
                f"{onnx.name} uses {phoneme_type!r} phonemes; this backend speaks espeak voices",
            )
        if not {_BOS, _EOS, _PAD} <= ids.keys():
            raise invalid("invalid_model", f"{config_path.name} has no ^ $ _ phoneme ids")
        try:
            session = onnxruntime.InferenceSession(
                str(onnx), settings, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own types, not exported stably
            raise invalid("invalid_model", f"onnxruntime cannot load {onnx.name}: {exc}") from None
        return PiperVoice(
            name=onnx.stem,
            short_name=_short_name(onnx.stem),
            language=_language(config, espeak_voice),
            espeak_voice=espeak_voice,
            sample_rate=config["audio"]["sample_rate"],
            phoneme_ids=ids,
            noise_scale=scales["noise_scale"],
            length_scale=scales["length_scale"],
            noise_w=scales["noise_w"],
            multi_speaker=config.get("num_speakers", 1) > 1,
            session=session,
        )

    def _name_voices(self, voices: list[PiperVoice]) -> None:
        """Each voice by its file's stem, and by its short name where that is unambiguous."""
        stems = {v.name.casefold() for v in voices}
        shorts = [v.short_name.casefold() for v in voices if v.short_name]
        for voice in voices:
            short = voice.short_name
            if short and (shorts.count(short.casefold()) > 1 or short.casefold() in stems):
                voice.short_name = None
        self.voices = voices
        self._by_name = {v.name.casefold(): v for v in voices}
        self._by_name.update({v.short_name.casefold(): v for v in voices if v.short_name})

    def _warm_up(self, voice: PiperVoice) -> None:
        """Speak a word in Ogg Opus, as a request would: onnxruntime's buffers, espeak-ng's
        data and PyAV's encoders are set up now, not in the first request (which is then
        faster, and the memory measured after load is what serving takes)."""
        request = pb.SynthesizeRequest(
            input="Hello.", voice=voice.name, format=pb.AUDIO_FORMAT_OPUS
        )
        for _ in self.synthesize(request, threading.Event()):
            pass

    def unload(self) -> None:
        self.voices = []
        self._by_name = {}
        self.default_voice = None

    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.SPEECH})

    # Speech -----------------------------------------------------------------------------------

    def list_voices(self, request: pb.ListVoicesRequest) -> pb.ListVoicesResponse:
        return pb.ListVoicesResponse(
            voices=[pb.Voice(name=v.listed_name, language=v.language) for v in self.voices],
            default_voice=self.default_voice.listed_name if self.default_voice else "",
        )

    def _voice(self, name: str) -> PiperVoice:
        """The voice `name` means: one of ours (by either name, in any case), else the default
        for an empty name or one of OpenAI's voices."""
        voice = self._by_name.get(name.casefold())
        if voice is not None:
            return voice
        if self.default_voice is not None and (not name or name.casefold() in OPENAI_VOICES):
            return self.default_voice
        known = ", ".join(v.listed_name for v in self.voices)
        raise invalid(
            Reason.VOICE_NOT_FOUND,
            f"this model has no voice {name!r}; its voices are: {known}",
            "voice",
        )

    def synthesize(
        self, request: pb.SynthesizeRequest, cancelled: threading.Event
    ) -> Iterator[pb.SynthesizeResponse]:
        import numpy as np

        voice = self._voice(request.voice)
        text = prepare(request.input)
        if not text.strip():
            raise invalid("empty_input", "the input is empty", param="input")
        speed = request.speed or 1.0
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise invalid(
                "invalid_speed",
                f"speed must be from {MIN_SPEED:g} to {MAX_SPEED:g}, not {speed:g}",
                param="speed",
            )
        if request.format not in _FORMATS:
            raise invalid(
                "invalid_format", "the audio format is unspecified or unknown", "response_format"
            )
        slowness = voice.length_scale / speed  # 1: the voice's normal pace
        most_ids = max(_MIN_CALL_IDS, round(_MAX_CALL_IDS / max(1.0, slowness)))
        pieces = sentences(text)
        silence = np.zeros(round(self.sentence_silence * voice.sample_rate), dtype=np.int16)
        encoder = AudioEncoder(request.format, voice.sample_rate)
        spoken = 0  # characters of the input reported so far
        try:
            for number, (start, end) in enumerate(pieces):
                if cancelled.is_set():
                    log.info("speech cancelled after %d of %d sentences", number, len(pieces))
                    return
                calls = self.model_calls(voice, text[start:end], most_ids)
                for call, ids in enumerate(calls):
                    if call and cancelled.is_set():
                        log.info("speech cancelled in sentence %d of %d", number + 1, len(pieces))
                        return
                    samples = self._speak(voice, ids, speed)
                    last = call + 1 == len(calls)
                    if last and number + 1 < len(pieces):
                        samples = np.concatenate([samples, silence])
                    audio = encoder.feed(samples)
                    if audio:
                        spoken = end if last else spoken
                        yield pb.SynthesizeResponse(
                            audio=audio, sample_rate=encoder.sample_rate, characters=spoken
                        )
            audio = encoder.finish()
            if audio or spoken < len(text):
                yield pb.SynthesizeResponse(
                    audio=audio, sample_rate=encoder.sample_rate, characters=len(text)
                )
        finally:
            encoder.close()

    def _speak(self, voice: PiperVoice, ids: list[int], speed: float) -> npt.NDArray[np.int16]:
        """One model call's audio."""
        import numpy as np

        feeds = {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            "scales": np.array(
                [voice.noise_scale, voice.length_scale / speed, voice.noise_w], dtype=np.float32
            ),
        }
        if voice.multi_speaker:
            feeds["sid"] = np.array([0], dtype=np.int64)  # the first speaker
        audio = voice.session.run(None, feeds)[0]
        return to_int16(audio.reshape(-1))

    def model_calls(self, voice: PiperVoice, sentence: str, most_ids: int) -> list[list[int]]:
        """A sentence's phoneme ids as model calls of at most `most_ids` ids each: whole
        clauses while they fit, a clause too long for one call cut between words (a word too long,
        between phonemes). A sentence with nothing to say has none."""
        table = voice.phoneme_ids
        pad = len(table[_PAD])
        room = max(1, most_ids - len(table[_BOS]) - len(table[_EOS]) - pad)

        def cost(phonemes: str) -> int:
            return sum(len(table[p]) + pad for p in phonemes if p in table)

        space = cost(" ")
        # What a call may be cut between (phonemes, their cost), none over `room`: clauses, the
        # words of a longer one, the phonemes of a longer word.
        parts: list[tuple[str, int]] = []
        for clause in self.clause_phonemes(voice, sentence):
            for word in [clause] if cost(clause) <= room else clause.split(" "):
                while cost(word) > room:
                    used, cut = cost(word[0]), 1
                    while used + cost(word[cut]) <= room:
                        used += cost(word[cut])
                        cut += 1
                    parts.append((word[:cut], used))
                    word = word[cut:]
                if word:
                    parts.append((word, cost(word)))
        calls: list[str] = []
        current, used = "", 0
        for phonemes, part_cost in parts:
            if current and used + space + part_cost <= room:
                current, used = f"{current} {phonemes}", used + space + part_cost
            else:
                if current:
                    calls.append(current)
                current, used = phonemes, part_cost
        if current:
            calls.append(current)
        found = [self._ids(table, phonemes) for phonemes in calls]
        nothing = len(self._ids(table, ""))  # ^ _ $
        return [ids for ids in found if len(ids) > nothing]

    @staticmethod
    def _ids(table: dict[str, list[int]], phonemes: str) -> list[int]:
        """The model's input for phonemes: ^ _, each phoneme's ids then _, $ (phonemes the voice
        has no id for are skipped, as piper-tts does)."""
        ids = [*table[_BOS], *table[_PAD]]
        for phoneme in phonemes:
            if phoneme in table:
                ids.extend(table[phoneme])
                ids.extend(table[_PAD])
        ids.extend(table[_EOS])
        return ids

    def phoneme_ids(self, voice: PiperVoice, sentence: str) -> list[int]:
        """The model's input for a whole sentence, uncut."""
        return self._ids(voice.phoneme_ids, self.phonemes(voice, sentence))

    def phonemes(self, voice: PiperVoice, sentence: str) -> str:
        """A sentence's IPA phonemes as Piper's training made them: each clause's, followed by
        its punctuation mark, clauses joined by a space; Unicode NFD (stress marks and
        diacritics as characters of their own)."""
        return " ".join(self.clause_phonemes(voice, sentence))

    def clause_phonemes(self, voice: PiperVoice, sentence: str) -> list[str]:
        """Each clause's phonemes (NFD) and mark, from one espeak-ng run for the sentence."""
        found = clauses(prepare(sentence))
        said = [text for text, _ in found if text]
        ipa = iter(self._espeak_clauses(said, voice.espeak_voice) if said else [])
        spoken = []
        for text, mark in found:
            phonemes = next(ipa) if text else ""
            if phonemes or mark:
                spoken.append(unicodedata.normalize("NFD", phonemes + mark))
        return spoken

    def _espeak_clauses(self, texts: list[str], espeak_voice: str) -> list[str]:
        """Each clause's IPA, in one espeak-ng run: the clauses on lines of their own (a line
        break ends a clause for espeak-ng), a separator line of raw phonemes between two. Where
        the output does not split into as many clauses (an espeak-ng that joins lines, a voice
        without the separator's phonemes), each clause is phonemized by a run of its own."""
        lines = [" ".join(text.split()) for text in texts]  # no line break within a clause
        if len(lines) == 1:
            return [" ".join(self._espeak_lines(lines[0], espeak_voice))]
        separator = self._separator(espeak_voice)
        if separator:
            output = self._espeak_lines(f"\n{_SEPARATOR}\n".join(lines), espeak_voice)
            found: list[list[str]] = [[]]
            for line in output:
                if line == separator:
                    found.append([])
                else:
                    found[-1].append(line)
            if len(found) == len(lines):
                return [" ".join(clause) for clause in found]
            log.warning(
                "espeak-ng (voice %s) made %d clauses of %d; phonemizing them one by one",
                espeak_voice,
                len(found),
                len(lines),
            )
        return [" ".join(self._espeak_lines(line, espeak_voice)) for line in lines]

    def _separator(self, espeak_voice: str) -> str | None:
        """The line espeak-ng makes of the separator in this voice (once per voice), or None
        where that is not one line of phonemes."""
        if espeak_voice not in self._separators:
            lines = [line for line in self._espeak_lines(_SEPARATOR, espeak_voice) if line]
            self._separators[espeak_voice] = lines[0] if len(lines) == 1 else None
        return self._separators[espeak_voice]

    def _espeak_lines(self, text: str, espeak_voice: str) -> list[str]:
        """The lines of IPA espeak-ng makes of `text` (one per clause it found: it ends clauses
        at abbreviations and line breaks too), each one's spaces normalised, empty ones left
        out. The text goes through stdin, so that no text can be read as an option, and no
        length of it meets the limit on arguments."""
        try:
            done = subprocess.run(
                [self._espeak, "-q", "--ipa", "-b", "1", "-v", espeak_voice],
                input=text.encode(),
                capture_output=True,
                timeout=_ESPEAK_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BackendError(
                grpc.StatusCode.INTERNAL,
                Reason.INTERNAL,
                f"espeak-ng took more than {_ESPEAK_TIMEOUT_SECONDS:g} s to phonemize a sentence",
            ) from None
        except OSError as exc:
            raise BackendError(
                grpc.StatusCode.INTERNAL, Reason.INTERNAL, f"cannot run espeak-ng: {exc}"
            ) from None
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
            raise BackendError(
                grpc.StatusCode.INTERNAL,
                Reason.INTERNAL,
                f"espeak-ng (voice {espeak_voice!r}) failed: {why}",
            )
        output = done.stdout.decode(errors="replace")
        return [" ".join(line.split()) for line in output.split("\n") if line.strip()]
