"""The piper backend in-process: a real Piper voice, heard back by whisper-base; and its text
handling, which needs no voice."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from backends.piper import backend as piper
from backends.piper.backend import PiperBackend, PiperVoice, clauses, prepare, sentences, to_int16
from backends.runtime import BackendError
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Reason
from tests.conftest import CACHE

FOX = "The quick brown fox jumps over the lazy dog."
TWO_SENTENCES = "The kettle sang on the stove. Outside, the rain had finally stopped."
VOICE_FILE = "en_US-joe-medium.onnx"


@pytest.fixture(scope="module")
def voice_dir() -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed and `make test` could not install it (apt-get)")
    from gateway.gallery import install_named

    install_named(["joe-us-piper"], CACHE)
    return CACHE / "joe-us-piper"


@pytest.fixture(scope="module")
def backend(voice_dir: Path) -> Iterator[PiperBackend]:
    loaded = PiperBackend()
    loaded.load(pb.LoadRequest(model_name="joe-us-piper", model_path=str(voice_dir), threads=2))
    yield loaded
    loaded.unload()


def speak(backend: PiperBackend, text: str, **fields: object) -> list[pb.SynthesizeResponse]:
    fields.setdefault("format", pb.AUDIO_FORMAT_WAV)
    request = pb.SynthesizeRequest(input=text, **fields)  # type: ignore[arg-type]
    return list(backend.synthesize(request, threading.Event()))


def pcm_seconds(messages: list[pb.SynthesizeResponse]) -> float:
    return sum(len(m.audio) for m in messages) / 2 / messages[0].sample_rate


def refusal(backend: PiperBackend, text: str, **fields: object) -> BackendError:
    with pytest.raises(BackendError) as caught:
        speak(backend, text, **fields)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


# The real voice ---------------------------------------------------------------------------------


@pytest.mark.real_model
def test_the_fox_is_heard_back_by_whisper(backend: PiperBackend, real_models: Path) -> None:
    from faster_whisper import WhisperModel

    messages = speak(backend, FOX)
    assert {m.sample_rate for m in messages} == {22050}
    assert messages[-1].characters == len(FOX)
    wav = b"".join(m.audio for m in messages)
    whisper = WhisperModel(
        str(real_models / "whisper-base"), device="cpu", compute_type="int8", cpu_threads=2
    )
    segments, _ = whisper.transcribe(io.BytesIO(wav), language="en", beam_size=1)
    heard = words(" ".join(s.text for s in segments))
    expected = words(FOX)
    # One mishearing allowed: the voice's noise is drawn afresh each time (see HEARD_ENOUGH).
    assert sum(word in heard for word in expected) >= len(expected) - 1, heard


@pytest.mark.real_model
def test_the_first_sentence_is_sent_before_the_second_is_spoken(
    backend: PiperBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    spoken: list[str] = []
    calls_of = backend.model_calls

    def counting(voice: PiperVoice, sentence: str, most_ids: int) -> list[list[int]]:
        spoken.append(sentence)
        return calls_of(voice, sentence, most_ids)

    monkeypatch.setattr(backend, "model_calls", counting)
    request = pb.SynthesizeRequest(input=TWO_SENTENCES, format=pb.AUDIO_FORMAT_MP3)
    stream = backend.synthesize(request, threading.Event())
    first = next(stream)
    assert spoken == ["The kettle sang on the stove."]
    assert first.audio
    assert 0 < first.characters < len(TWO_SENTENCES)
    rest = list(stream)
    assert len(spoken) == 2
    assert rest[-1].characters == len(TWO_SENTENCES)


@pytest.mark.real_model
def test_a_cancelled_call_stops_after_the_sentence_it_is_speaking(
    backend: PiperBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    spoken: list[str] = []
    calls_of = backend.model_calls

    def counting(voice: PiperVoice, sentence: str, most_ids: int) -> list[list[int]]:
        spoken.append(sentence)
        return calls_of(voice, sentence, most_ids)

    monkeypatch.setattr(backend, "model_calls", counting)
    cancelled = threading.Event()
    request = pb.SynthesizeRequest(
        input=f"{TWO_SENTENCES} A third sentence follows here.", format=pb.AUDIO_FORMAT_PCM
    )
    stream = backend.synthesize(request, cancelled)
    next(stream)
    cancelled.set()
    assert list(stream) == []
    assert len(spoken) == 1


@pytest.mark.real_model
def test_a_cancelled_call_stops_between_the_model_calls_of_a_sentence(
    backend: PiperBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    voice = backend.voices[0]
    ids = backend.phoneme_ids(voice, FOX)
    monkeypatch.setattr(backend, "model_calls", lambda voice, sentence, most_ids: [ids] * 3)
    spoken: list[list[int]] = []
    speak_one = backend._speak

    def counting(voice: PiperVoice, ids: list[int], speed: float) -> np.ndarray:
        spoken.append(ids)
        return speak_one(voice, ids, speed)

    monkeypatch.setattr(backend, "_speak", counting)
    cancelled = threading.Event()
    stream = backend.synthesize(
        pb.SynthesizeRequest(input=FOX, format=pb.AUDIO_FORMAT_PCM), cancelled
    )
    first = next(stream)
    assert first.characters == 0  # the sentence is not spoken yet
    cancelled.set()
    assert list(stream) == []
    assert len(spoken) == 1


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["", "alloy", "Nova", "joe", "JOE", "en_US-joe-medium"])
def test_openai_voices_and_both_of_the_voice_names_speak(backend: PiperBackend, name: str) -> None:
    assert pcm_seconds(speak(backend, "Hello there.", voice=name, format=pb.AUDIO_FORMAT_PCM)) > 0.3


@pytest.mark.real_model
def test_an_unknown_voice_names_the_voices_there_are(backend: PiperBackend) -> None:
    error = refusal(backend, FOX, voice="bob")
    assert (error.reason, error.param) == (Reason.VOICE_NOT_FOUND, "voice")
    assert "'bob'" in error.message
    assert "joe" in error.message


@pytest.mark.real_model
def test_requests_out_of_range_are_refused_with_their_field(backend: PiperBackend) -> None:
    assert refusal(backend, "  \n").param == "input"
    assert refusal(backend, FOX, speed=4.5).param == "speed"
    assert refusal(backend, FOX, speed=0.2).param == "speed"
    assert refusal(backend, FOX, format=pb.AUDIO_FORMAT_UNSPECIFIED).param == "response_format"


@pytest.mark.real_model
def test_faster_speech_is_shorter(backend: PiperBackend) -> None:
    normal = pcm_seconds(speak(backend, FOX, format=pb.AUDIO_FORMAT_PCM))
    fast = pcm_seconds(speak(backend, FOX, format=pb.AUDIO_FORMAT_PCM, speed=2.0))
    assert fast < 0.7 * normal


@pytest.mark.real_model
def test_every_format_streams_audio_at_its_rate(backend: PiperBackend) -> None:
    for audio_format, rate in [
        (pb.AUDIO_FORMAT_MP3, 22050),
        (pb.AUDIO_FORMAT_FLAC, 22050),
        (pb.AUDIO_FORMAT_OPUS, 48000),
    ]:
        messages = speak(backend, TWO_SENTENCES, format=audio_format)
        assert len(messages) >= 2
        assert {m.sample_rate for m in messages} == {rate}


@pytest.mark.real_model
def test_voices_are_listed_with_their_language(backend: PiperBackend) -> None:
    voices = backend.list_voices(pb.ListVoicesRequest())
    assert [(v.name, v.language) for v in voices.voices] == [("joe", "en-US")]
    assert voices.default_voice == "joe"


@pytest.mark.real_model
def test_a_folder_of_voices_is_one_model(voice_dir: Path, tmp_path: Path) -> None:
    """Every .onnx + .onnx.json pair is a voice; a short name two voices share is neither's."""
    for stem in ("en_US-joe-medium", "en_US-joe-low", "en_GB-ann-medium"):
        for suffix in (".onnx", ".onnx.json"):
            os.link(voice_dir / f"en_US-joe-medium{suffix}", tmp_path / f"{stem}{suffix}")
    two = PiperBackend()
    request = pb.LoadRequest(model_path=str(tmp_path), threads=1)
    request.options.update({"default_voice": "ann", "sentence_silence": 0.5})
    two.load(request)
    voices = two.list_voices(pb.ListVoicesRequest())
    assert [v.name for v in voices.voices] == ["ann", "en_US-joe-low", "en_US-joe-medium"]
    assert voices.default_voice == "ann"
    assert refusal(two, FOX, voice="joe").reason == Reason.VOICE_NOT_FOUND
    assert (
        pcm_seconds(speak(two, "Hi there.", voice="en_US-joe-low", format=pb.AUDIO_FORMAT_PCM))
        > 0.3
    )


@pytest.mark.real_model
def test_a_line_break_is_a_pause_through_synthesize(
    backend: PiperBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[list[int]] = []
    speak_one = backend._speak

    def recording(voice: PiperVoice, ids: list[int], speed: float) -> np.ndarray:
        sent.append(ids)
        return speak_one(voice, ids, speed)

    monkeypatch.setattr(backend, "_speak", recording)
    speak(backend, "A title\r\nand a line", format=pb.AUDIO_FORMAT_PCM)
    voice = backend.voices[0]
    assert sent == [backend.phoneme_ids(voice, "A title, and a line")]
    assert sent != [backend.phoneme_ids(voice, "A title and a line")]


@pytest.mark.real_model
def test_a_sentence_is_phonemized_by_one_espeak_run_as_clause_by_clause(
    backend: PiperBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    voice = backend.voices[0]
    texts = [
        FOX,
        "Outside, the rain had finally stopped; the sky: clear!",
        "Dr. Smith paid $5.50, e.g. on Monday, for the U.S. army zZzZ, fine?",
    ]
    runs: list[str] = []
    run = backend._espeak_lines

    def counting(text: str, espeak_voice: str) -> list[str]:
        runs.append(text)
        return run(text, espeak_voice)

    backend._separator(voice.espeak_voice)  # found once per voice, by a run of its own
    monkeypatch.setattr(backend, "_espeak_lines", counting)
    batched = [backend.phonemes(voice, text) for text in texts]
    assert len(runs) == len(texts)
    monkeypatch.setattr(backend, "_separator", lambda espeak_voice: None)  # a run per clause
    assert [backend.phonemes(voice, text) for text in texts] == batched
    assert len(runs) == len(texts) + sum(len(clauses(t)) for t in texts)
    assert batched[0] == "ðə kwˈɪk bɹˈaʊn fˈɑːks dʒˈʌmps ˌoʊvɚ ðə lˈeɪzi dˈɑːɡ."  # noqa: RUF001
    assert batched[2].count(",") == 3


@pytest.mark.real_model
def test_double_square_brackets_are_not_read_as_phoneme_codes(backend: PiperBackend) -> None:
    voice = backend.voices[0]
    raw = backend.phonemes(voice, "[[h@'loU]] there.")
    assert "həloʊ" not in raw
    assert raw == backend.phonemes(voice, "h@'loU there.")


@pytest.mark.real_model
def test_no_model_call_has_more_phoneme_ids_than_the_limit(
    backend: PiperBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    voice = backend.voices[0]
    numbers = "77, " * 60 + "77."
    calls = backend.model_calls(voice, numbers, 300)
    assert len(calls) > 1
    assert all(len(ids) <= 300 for ids in calls)
    comma = voice.phoneme_ids[","] + voice.phoneme_ids["_"] + voice.phoneme_ids["$"]
    assert all(ids[-3:] == comma for ids in calls[:-1])  # cut where a clause ends
    whole = backend.phoneme_ids(voice, numbers)
    assert sum(len(ids) for ids in calls) > len(whole)  # ^ _ $ for each, no space at the cuts
    # Slower speech: fewer ids a call.
    limits: list[int] = []
    calls_of = backend.model_calls

    def recording(voice: PiperVoice, sentence: str, most_ids: int) -> list[list[int]]:
        limits.append(most_ids)
        return calls_of(voice, sentence, most_ids)

    monkeypatch.setattr(backend, "model_calls", recording)
    speak(backend, "Hello there.", format=pb.AUDIO_FORMAT_PCM, speed=0.5)
    speak(backend, "Hello there.", format=pb.AUDIO_FORMAT_PCM, speed=2.0)
    assert limits == [piper._MAX_CALL_IDS // 2, piper._MAX_CALL_IDS]


# Without the voice --------------------------------------------------------------------------------


def test_without_espeak_ng_the_load_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(piper.shutil, "which", lambda name: None)
    with pytest.raises(BackendError, match="apt-get install espeak-ng"):
        PiperBackend().load(pb.LoadRequest(model_path=str(tmp_path), threads=1))


def test_a_voice_without_its_config_is_not_found(tmp_path: Path) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    (tmp_path / VOICE_FILE).write_bytes(b"not a model")
    with pytest.raises(FileNotFoundError, match=r"en_US-joe-medium\.onnx\.json"):
        PiperBackend().load(pb.LoadRequest(model_path=str(tmp_path), threads=1))
    with pytest.raises(FileNotFoundError, match="no Piper voice"):
        PiperBackend().load(pb.LoadRequest(model_path=str(tmp_path / "missing"), threads=1))


def test_text_is_spoken_sentence_by_sentence() -> None:
    text = "Hi. How are you today?\nDr. Smith paid $5.50, e.g. on Monday!  Fine."
    pieces = [text[start:end] for start, end in sentences(text)]
    # Short pieces join the next (or the last joins the one before); a stop inside a number or
    # ending an abbreviation is no sentence end.
    assert pieces == ["Hi. How are you today?", "Dr. Smith paid $5.50, e.g. on Monday!  Fine."]
    assert clauses(pieces[1]) == [
        ("Dr", "."),
        ("Smith paid $5.50", ","),
        ("e.g. on Monday", "!"),
        ("Fine", "."),
    ]
    assert clauses('He said "Go."') == [('He said "Go', ".")]


def test_text_is_prepared_character_for_character() -> None:
    text = "A title\r\nand\tit\x00s [[h@'loU]] line"
    prepared = prepare(text)
    assert len(prepared) == len(text)  # the input's offsets still hold (characters spoken)
    assert prepared == "A title\n\nand it s ((h@'loU)) line"
    # Line breaks reach the clause splitting: a short line is spoken with the next, after a pause.
    assert [prepared[a:b] for a, b in sentences(prepared)] == [
        "A title\n\nand it s ((h@'loU)) line"
    ]
    assert clauses(prepared) == [("A title", ","), ("and it s ((h@'loU)) line", "")]


def test_a_long_sentence_is_cut_at_a_pause() -> None:
    text = ("word " * 40).strip() + ", " + ("more " * 40).strip() + "."
    pieces = [text[start:end] for start, end in sentences(text, longest=300)]
    assert len(pieces) == 2
    assert pieces[0].endswith(",")
    assert pieces[1].startswith("more")
    cut = sentences("x" * 3000)
    assert cut[-1][1] == 3000
    assert all(end - start <= 1000 for start, end in cut)


def test_quiet_audio_keeps_its_level_and_overshoot_is_scaled_down() -> None:
    quiet = np.array([0.0, 0.25, -0.5], dtype=np.float32)
    assert to_int16(quiet).tolist() == [0, 8191, -16383]
    loud = np.array([0.0, 1.0, -2.0], dtype=np.float32)
    assert to_int16(loud).tolist() == [0, 16383, -32767]


def test_a_piper_model_has_a_memory_estimate(tmp_path: Path) -> None:
    from gateway.config import load_model_file
    from gateway.manager.footprint import RUNTIME_BYTES, estimate

    (tmp_path / "voice").mkdir()
    (tmp_path / "voice" / VOICE_FILE).write_bytes(bytes(1_000_000))
    (tmp_path / "voice.yaml").write_text("name: voice\nbackend: piper\nmodel: voice\n")
    footprint = estimate(load_model_file(tmp_path / "voice.yaml", tmp_path), tmp_path)
    assert footprint.source == "estimate"
    # The weights as onnxruntime holds them, and its buffers for the longest model call.
    assert RUNTIME_BYTES["piper"] + 8_000_000 < footprint.bytes < RUNTIME_BYTES["piper"] + 8_500_000


def a_voice(clause_phonemes: list[str]) -> tuple[PiperBackend, PiperVoice]:
    """A backend whose phonemizer gives `clause_phonemes`, and a voice of one id a phoneme."""
    table = {p: [i] for i, p in enumerate("^$_ abcdefgh,.")}
    voice = PiperVoice("v", None, "en", "en-us", 22050, table, 0.667, 1.0, 0.8, False, None)
    backend = PiperBackend()
    backend.clause_phonemes = lambda voice, sentence: clause_phonemes  # type: ignore[method-assign]
    return backend, voice


def spelled(voice: PiperVoice, ids: list[int]) -> str:
    names = {i[0]: p for p, i in voice.phoneme_ids.items()}
    return "".join(names[i] for i in ids[2:-1:2])  # no ^ _ ... $, no pad after each


def test_model_calls_are_cut_at_clauses_then_words_then_phonemes() -> None:
    backend, voice = a_voice(["abc,", "de fgh ab.", "abcdefghabcdefgh"])
    # At most 11 ids: ^ _ $ and 4 phonemes each with its pad.
    calls = [spelled(voice, ids) for ids in backend.model_calls(voice, "", 11)]
    assert calls == ["abc,", "de", "fgh", "ab.", "abcd", "efgh", "abcd", "efgh"]
    calls = [spelled(voice, ids) for ids in backend.model_calls(voice, "", 23)]
    assert calls == ["abc,", "de fgh ab.", "abcdefghab", "cdefgh"]
    calls = [spelled(voice, ids) for ids in backend.model_calls(voice, "", 35)]
    assert calls == ["abc, de fgh ab.", "abcdefghabcdefgh"]
    assert [spelled(voice, ids) for ids in backend.model_calls(voice, "", 1000)] == [
        "abc, de fgh ab. abcdefghabcdefgh"
    ]
    backend, voice = a_voice([])
    assert backend.model_calls(voice, "", 100) == []


def write_voice(directory: Path, config: object) -> None:
    (directory / VOICE_FILE).write_bytes(b"not read: the config is checked first")
    (directory / f"{VOICE_FILE}.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inference": [0.667]}, "inference is a list, not an object"),
        ({"audio": {"sample_rate": 0}}, "audio.sample_rate is not a positive integer"),
        ({"espeak": "en-us"}, "espeak is a str, not an object"),
        ({"phoneme_id_map": {"a": "1"}}, "phoneme_id_map['a'] is not a list of ids"),
        ({"inference": {"noise_scale": 99}}, "inference.noise_scale must be a number from 0 to 10"),
    ],
)
def test_a_malformed_voice_config_names_its_file_and_what_is_wrong(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    config = {
        "audio": {"sample_rate": 22050},
        "espeak": {"voice": "en-us"},
        "phoneme_id_map": {"^": [1], "$": [2], "_": [0]},
        **change,
    }
    write_voice(tmp_path, config)
    with pytest.raises(BackendError) as caught:
        PiperBackend().load(pb.LoadRequest(model_path=str(tmp_path), threads=1))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message == f"{VOICE_FILE}.json: {message}"
