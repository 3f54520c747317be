"""Speech to text through the gateway: real whisper-base on espeak-ng speech, and a tiny model."""

from __future__ import annotations

import io
import itertools
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Gateway, link_tree, write_model

FOX = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="session")
def espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        pytest.skip("espeak-ng is not installed and `make test` could not install it (apt-get)")
    return path


def speak(espeak: str, text: str, voice: str = "en") -> bytes:
    return subprocess.run(
        [espeak, "-v", voice, "--stdout", text], capture_output=True, check=True
    ).stdout


@pytest.fixture(scope="session")
def fox_wav(espeak: str) -> bytes:
    return speak(espeak, FOX)


def transcribe(
    client: openai.OpenAI, audio: bytes, name: str = "speech.wav", **kwargs: object
) -> object:
    return client.audio.transcriptions.create(
        model=kwargs.pop("model", "whisper-base"),  # type: ignore[arg-type]
        file=(name, audio),
        **kwargs,  # type: ignore[arg-type]
    )


def test_json_transcription_has_the_words(client: openai.OpenAI, fox_wav: bytes) -> None:
    result = transcribe(client, fox_wav)
    assert "quick brown fox" in result.text.lower()  # type: ignore[attr-defined]


def test_text_is_plain(client: openai.OpenAI, http: httpx.Client, fox_wav: bytes) -> None:
    text = transcribe(client, fox_wav, response_format="text")
    assert isinstance(text, str)
    assert "quick brown fox" in text.lower()
    raw = http.post(
        "/v1/audio/transcriptions",
        files={"file": ("a.wav", fox_wav)},
        data={"model": "whisper-base", "response_format": "text"},
    )
    assert raw.headers["content-type"] == "text/plain; charset=utf-8"
    assert not raw.text.lstrip().startswith("{")


def _times(text: str, separator: str) -> list[tuple[float, float]]:
    clock = rf"(\d\d):(\d\d):(\d\d){re.escape(separator)}(\d\d\d)"
    pattern = f"{clock} --> {clock}"
    spans = []
    for match in re.finditer(pattern, text):
        h1, m1, s1, ms1, h2, m2, s2, ms2 = (int(g) for g in match.groups())
        spans.append((h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000))
    return spans


def assert_increasing(spans: list[tuple[float, float]]) -> None:
    assert spans, "no cues"
    for start, end in spans:
        assert start <= end
    starts = [s for s, _ in spans]
    assert starts == sorted(starts)


def test_srt_and_vtt(client: openai.OpenAI, espeak: str, http: httpx.Client) -> None:
    audio = speak(espeak, f"{FOX}. Then it ran into the forest and was never seen again. The end.")
    srt = transcribe(client, audio, response_format="srt")
    assert isinstance(srt, str)
    assert srt.startswith("1\n")
    assert_increasing(_times(srt, ","))
    assert "lazy dog" in srt.lower()
    assert "forest" in srt.lower()
    vtt = transcribe(client, audio, response_format="vtt")
    assert isinstance(vtt, str)
    assert vtt.startswith("WEBVTT\n")
    assert_increasing(_times(vtt, "."))
    raw = http.post(
        "/v1/audio/transcriptions",
        files={"file": ("a.wav", audio)},
        data={"model": "whisper-base", "response_format": "vtt"},
    )
    assert raw.headers["content-type"] == "text/vtt; charset=utf-8"


def test_verbose_json_with_words(client: openai.OpenAI, fox_wav: bytes) -> None:
    result = transcribe(
        client, fox_wav, response_format="verbose_json", timestamp_granularities=["word", "segment"]
    )
    assert result.language == "en"  # type: ignore[attr-defined]
    assert result.duration == pytest.approx(len(fox_wav) / 2 / 22050, abs=0.3)  # type: ignore[attr-defined]
    segments = result.segments  # type: ignore[attr-defined]
    assert segments
    for segment in segments:
        assert segment.end >= segment.start
        assert segment.tokens
        assert segment.avg_logprob <= 0
        assert 0 <= segment.no_speech_prob <= 1
    words = result.words  # type: ignore[attr-defined]
    assert [w.word.strip().lower().strip(".") for w in words][:3] == ["the", "quick", "brown"]
    starts = [w.start for w in words]
    assert starts == sorted(starts)
    assert all(w.end >= w.start for w in words)
    plain = transcribe(client, fox_wav, response_format="verbose_json")
    assert plain.words is None  # type: ignore[attr-defined]


def test_other_containers(client: openai.OpenAI, fox_wav: bytes, tmp_path: Path) -> None:
    import av

    mp3 = io.BytesIO()
    source = av.open(io.BytesIO(fox_wav))
    with av.open(mp3, "w", format="mp3") as output:
        stream = output.add_stream("mp3", rate=22050)
        for frame in source.decode(audio=0):
            frame.pts = None
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    encoded = {"speech.mp3": mp3.getvalue()}
    sox = shutil.which("sox")
    if sox:  # PyAV's wheels carry no Vorbis encoder
        (tmp_path / "in.wav").write_bytes(fox_wav)
        subprocess.run([sox, str(tmp_path / "in.wav"), str(tmp_path / "out.ogg")], check=True)
        encoded["speech.ogg"] = (tmp_path / "out.ogg").read_bytes()
    for name, audio in encoded.items():
        # Lossy codecs blur a word now and then ("quick round fox"); the sentence survives.
        text = transcribe(client, audio, name=name).text.lower()  # type: ignore[attr-defined]
        assert "fox" in text, (name, text)
        assert "lazy dog" in text, (name, text)


def test_german_is_translated_to_english(client: openai.OpenAI, espeak: str) -> None:
    german = "Guten Morgen. Heute ist das Wetter sehr schön und die Sonne scheint."
    result = client.audio.translations.create(
        model="whisper-base", file=("de.wav", speak(espeak, german, "de"))
    )
    text = result.text.strip()
    assert text
    assert text.isascii()
    words = set(re.findall(r"[a-zäöüß]+", text.lower()))
    assert not words & {"guten", "morgen", "heute", "wetter", "sonne", "scheint", "sehr"}, text
    assert words & {"good", "morning", "today", "weather", "sun", "very", "beautiful", "nice"}, text


def test_tiny_whisper_serves_every_format(client: openai.OpenAI, fox_wav: bytes) -> None:
    result = transcribe(
        client, fox_wav, model="tiny-whisper", response_format="verbose_json", temperature=0
    )
    assert result.duration > 2  # type: ignore[attr-defined]
    for response_format in ("json", "text", "srt", "vtt"):
        transcribe(client, fox_wav, model="tiny-whisper", response_format=response_format)


@pytest.mark.parametrize(
    ("name", "payload", "status", "code"),
    [
        ("notes.wav", b"these are not the samples you are looking for" * 20, 400, "invalid_audio"),
        ("empty.wav", b"", 400, None),
        ("blob.xyz", bytes(range(256)) * 64, 400, "invalid_audio"),
    ],
)
def test_bad_audio_is_4xx_and_the_backend_lives_on(
    http: httpx.Client, fox_wav: bytes, name: str, payload: bytes, status: int, code: str | None
) -> None:
    response = http.post(
        "/v1/audio/transcriptions",
        files={"file": (name, payload)},
        data={"model": "tiny-whisper"},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == "file"
    if code:
        assert error["code"] == code
    again = http.post(
        "/v1/audio/transcriptions",
        files={"file": ("ok.wav", fox_wav)},
        data={"model": "tiny-whisper", "response_format": "json", "temperature": "0"},
    )
    assert again.status_code == 200


def test_uploads_over_the_limit_are_413(tmp_path: Path, gateway: Gateway) -> None:
    limited = Gateway(gateway.models_dir, env={"HEARTH_MAX_UPLOAD_BYTES": "100000"}).start()
    try:
        response = httpx.post(
            f"{limited.url}/v1/audio/transcriptions",
            files={"file": ("big.wav", b"\0" * 200_000)},
            data={"model": "tiny-whisper"},
        )
        assert response.status_code == 413
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        # The limit is the audio routes': a JSON body of the same size is fine elsewhere.
        chat = httpx.post(
            f"{limited.url}/v1/completions",
            json={"model": "echo", "prompt": "x " * 60_000, "max_tokens": 1},
            timeout=30,
        )
        assert chat.status_code == 200
    finally:
        limited.cleanup()


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({"response_format": "docx"}, "response_format"),
        ({"temperature": "hot"}, "temperature"),
        ({"timestamp_granularities[]": "word"}, "timestamp_granularities"),
        ({"model": ""}, "model"),
    ],
)
def test_bad_fields_are_400(http: httpx.Client, fox_wav: bytes, data: dict, param: str) -> None:
    response = http.post(
        "/v1/audio/transcriptions",
        files={"file": ("a.wav", fox_wav)},
        data={"model": "tiny-whisper", **data},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_missing_file_is_400(http: httpx.Client) -> None:
    form_without_file = {"model": (None, "tiny-whisper")}
    response = http.post("/v1/audio/transcriptions", files=form_without_file)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "file"
    # A urlencoded form (what any web page may post cross-site) is not an upload at all.
    response = http.post("/v1/audio/transcriptions", data={"model": "tiny-whisper"})
    assert response.status_code == 415


def test_a_chat_model_cannot_transcribe(http: httpx.Client, fox_wav: bytes) -> None:
    response = http.post(
        "/v1/audio/transcriptions", files={"file": ("a.wav", fox_wav)}, data={"model": "echo"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_supported"


# Audio longer than the server's limit (HEARTH_MAX_AUDIO_SECONDS) -------------------------------

LIMIT_SECONDS = 30
#: What the backend's memory may rise by on a refused upload: the limit's worth of samples
#: (30 s is under 3 MB) and the decoder's buffers, far below what decoding it all would take.
REFUSED_GROWTH_BYTES = 64 * 1024 * 1024


@pytest.fixture(scope="session")
def sox() -> str:
    path = shutil.which("sox")
    if path is None:
        pytest.skip("sox is not installed")
    return path


def padded(sox: str, wav: bytes, seconds: float, directory: Path) -> bytes:
    """`wav` with silence after it, to `seconds` in all, as FLAC."""
    (directory / "in.wav").write_bytes(wav)
    out = directory / f"padded-{seconds}.flac"
    subprocess.run(
        [sox, str(directory / "in.wav"), str(out), "pad", "0", "100", "trim", "0", str(seconds)],
        check=True,
    )
    return out.read_bytes()


@pytest.fixture(scope="module")
def short_limit(
    tmp_path_factory: pytest.TempPathFactory, real_models: Path, fox_wav: bytes
) -> Iterator[Gateway]:
    """A gateway serving whisper-base that accepts 30 s of audio, the model loaded."""
    models = tmp_path_factory.mktemp("short-limit")
    link_tree(real_models / "whisper-base", models / "whisper-base")
    write_model(models, "whisper-base", "backend: whisper\nmodel: whisper-base")
    running = Gateway(models, env={"HEARTH_MAX_AUDIO_SECONDS": str(LIMIT_SECONDS)}).start()
    try:
        post_audio(running, "fox.wav", fox_wav).raise_for_status()
        yield running
    finally:
        running.cleanup()


def post_audio(
    gateway: Gateway, name: str, audio: bytes, model: str = "whisper-base", **form: str
) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/audio/transcriptions",
        files={"file": (name, audio)},
        data={"model": model, **form},
        timeout=300,
    )


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def peak_growth(gateway: Gateway, send: Callable[[], httpx.Response]) -> tuple[httpx.Response, int]:
    """`send()`'s response, and how many bytes the backend's peak memory rose meanwhile."""
    (pid,) = gateway.backend_pids()
    before = _status_kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    response = send()
    return response, (_status_kib(pid, "VmHWM") - before) * 1024


def assert_too_long(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "audio_too_long"
    assert error["param"] == "file"
    assert f"{LIMIT_SECONDS} seconds" in error["message"]
    assert "HEARTH_MAX_AUDIO_SECONDS" in error["message"]


@pytest.mark.real_model
def test_audio_under_the_limit_transcribes(
    short_limit: Gateway, sox: str, fox_wav: bytes, tmp_path: Path
) -> None:
    response = post_audio(
        short_limit, "fox.flac", padded(sox, fox_wav, LIMIT_SECONDS - 1, tmp_path)
    )
    assert response.status_code == 200, response.text
    assert "quick brown fox" in response.json()["text"].lower()


@pytest.mark.real_model
def test_audio_just_past_the_limit_is_refused(
    short_limit: Gateway, sox: str, fox_wav: bytes, tmp_path: Path
) -> None:
    audio = padded(sox, fox_wav, LIMIT_SECONDS + 1, tmp_path)
    response, growth = peak_growth(short_limit, lambda: post_audio(short_limit, "fox.flac", audio))
    assert_too_long(response)
    assert growth < REFUSED_GROWTH_BYTES, f"the backend grew by {growth / 2**20:.0f} MiB"
    again = post_audio(short_limit, "fox.wav", fox_wav)  # the backend lives on
    assert again.status_code == 200, again.text


@pytest.mark.real_model
def test_hours_of_compressed_silence_are_refused_cheaply(
    short_limit: Gateway, sox: str, tmp_path: Path
) -> None:
    # Two hours in a few hundred KB: faster_whisper.decode_audio takes over a GB to decode it.
    path = tmp_path / "silence.flac"
    subprocess.run([sox, "-n", "-r", "8000", "-c", "1", str(path), "trim", "0", "7200"], check=True)
    audio = path.read_bytes()
    assert len(audio) < 1024 * 1024
    response, growth = peak_growth(
        short_limit, lambda: post_audio(short_limit, "quiet.flac", audio)
    )
    assert_too_long(response)
    assert growth < REFUSED_GROWTH_BYTES, f"the backend grew by {growth / 2**20:.0f} MiB"


def test_decoder_matches_faster_whisper(sox: str, fox_wav: bytes, tmp_path: Path) -> None:
    import numpy as np
    from faster_whisper import decode_audio

    from backends.runtime import BackendError
    from backends.whisper.backend import decode

    (tmp_path / "fox.wav").write_bytes(fox_wav)
    subprocess.run(
        [sox, str(tmp_path / "fox.wav"), "-r", "48000", "-c", "2", str(tmp_path / "fox.ogg")],
        check=True,
    )
    for audio in (fox_wav, (tmp_path / "fox.ogg").read_bytes()):  # 22.05 kHz mono, 48 kHz stereo
        expected = decode_audio(io.BytesIO(audio), sampling_rate=16000)
        np.testing.assert_array_equal(decode(audio), expected)
        seconds = len(expected) / 16000
        np.testing.assert_array_equal(decode(audio, max_seconds=seconds), expected)
        with pytest.raises(BackendError) as refused:
            decode(audio, max_seconds=seconds - 0.5)
        assert refused.value.reason == "audio_too_long"


# Long audio, transcribed in chunks --------------------------------------------------------------

#: Spoken by espeak-ng in about 40 s: with 30 s chunks, two of them.
STORY = (
    "The lighthouse keeper climbed the narrow stairs every evening at six. "
    "He lit the great lamp, wound the clockwork, and wrote the weather in his book. "
    "On stormy nights the waves reached the windows, and the whole tower hummed. "
    "Ships passed far out at sea, and none of them ever knew his name. "
    "In spring, the gulls came back, and he counted them from the gallery. "
    "When winter came, he wrote long letters to his sister in the city by the river. "
    "The baker on the corner sold bread with raisins and walnuts on Fridays. "
    "Children ran along the harbour wall, chasing the cats and the crabs. "
    "A red bicycle leaned against the post office all summer long. "
    "Nobody ever came to claim it, so the postman painted it blue."
)
#: A word of each sentence that whisper-base gets right.
STORY_WORDS = (
    "lighthouse clockwork stormy ships spring winter corner children summer postman".split()
)
#: What the backend's peak memory may rise by while it transcribes 25 minutes: the samples
#: (about 90 MiB) and one chunk's features, where one faster-whisper call on all of it took
#: about 1.5 GB.
CHUNKED_GROWTH_BYTES = 400 * 1024 * 1024


@pytest.fixture(scope="module")
def short_chunks(tmp_path_factory: pytest.TempPathFactory, real_models: Path) -> Iterator[Gateway]:
    """A gateway serving whisper-base in 30 s chunks, and a model whose chunks are too short."""
    models = tmp_path_factory.mktemp("short-chunks")
    link_tree(real_models / "whisper-base", models / "whisper-base")
    write_model(
        models,
        "whisper-base",
        "backend: whisper\nmodel: whisper-base\noptions: {chunk_seconds: 30}",
    )
    write_model(
        models,
        "whisper-tiny-chunks",
        "backend: whisper\nmodel: whisper-base\noptions: {chunk_seconds: 5}",
    )
    running = Gateway(models).start()
    try:
        yield running
    finally:
        running.cleanup()


@pytest.mark.real_model
def test_long_audio_is_transcribed_in_chunks_without_a_seam(
    short_chunks: Gateway, espeak: str
) -> None:
    story = speak(espeak, STORY)
    seconds = len(story) / 2 / 22050
    assert 30 < seconds < 60, seconds
    result = transcribe(
        short_chunks.client(timeout=120),
        story,
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    text = result.text.lower()  # type: ignore[attr-defined]
    assert [w for w in STORY_WORDS if w not in text] == [], text
    assert result.language == "en"  # type: ignore[attr-defined]
    assert result.duration == pytest.approx(seconds, abs=0.1)  # type: ignore[attr-defined]
    segments = result.segments  # type: ignore[attr-defined]
    assert [s.id for s in segments] == list(range(len(segments)))
    spans = [(s.start, s.end) for s in segments]
    assert_increasing(spans)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans)), spans
    # The second chunk's segments are on the whole audio's clock, to its end.
    assert spans[0][0] < 1
    assert seconds - 2 < spans[-1][1] <= seconds + 0.5, spans
    assert any(start > 30 for start, _ in spans), spans
    words = result.words  # type: ignore[attr-defined]
    starts = [w.start for w in words]
    assert starts == sorted(starts)
    assert words[-1].end > seconds - 2
    assert words[-1].word.strip(" .").lower() == "blue"


@pytest.mark.real_model
def test_chunks_shorter_than_a_window_are_refused(short_chunks: Gateway, fox_wav: bytes) -> None:
    response = httpx.post(
        f"{short_chunks.url}/v1/audio/transcriptions",
        files={"file": ("fox.wav", fox_wav)},
        data={"model": "whisper-tiny-chunks"},
        timeout=60,
    )
    # A mistake in the model YAML, not in the request: the load fails and says which option.
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "backend_start_failed"
    assert "options.chunk_seconds must be a number of seconds, at least 30" in error["message"]


@pytest.fixture(scope="module")
def tiny_only(
    tmp_path_factory: pytest.TempPathFactory, tiny_whisper: Path, fox_wav: bytes
) -> Iterator[Gateway]:
    """A gateway serving the tiny Whisper model alone, with the default chunks, loaded."""
    models = tmp_path_factory.mktemp("tiny-only")
    link_tree(tiny_whisper, models / "tiny-whisper")
    write_model(
        models,
        "tiny-whisper",
        "backend: whisper\nmodel: tiny-whisper\n"
        "options: {beam_size: 1, max_new_tokens: 8, temperature_fallback: false}",
    )
    running = Gateway(models).start()
    try:
        post_tiny(running, "fox.wav", fox_wav).raise_for_status()
        yield running
    finally:
        running.cleanup()


def post_tiny(gateway: Gateway, name: str, audio: bytes) -> httpx.Response:
    return post_audio(
        gateway, name, audio, "tiny-whisper", response_format="verbose_json", temperature="0"
    )


def test_long_audio_takes_one_chunks_memory(tiny_only: Gateway, sox: str, tmp_path: Path) -> None:
    # 25 minutes in under 100 KB: one faster-whisper call computes the features of all of it at
    # once, about 1.5 GB.
    path = tmp_path / "silence.flac"
    subprocess.run(
        [sox, "-n", "-r", "16000", "-c", "1", str(path), "trim", "0", "1500"], check=True
    )
    audio = path.read_bytes()
    response, growth = peak_growth(tiny_only, lambda: post_tiny(tiny_only, "quiet.flac", audio))
    assert response.status_code == 200, response.text
    assert response.json()["duration"] == pytest.approx(1500)
    assert growth < CHUNKED_GROWTH_BYTES, f"the backend grew by {growth / 2**20:.0f} MiB"


def test_chunks_end_in_the_pauses() -> None:
    import numpy as np

    from backends.whisper.backend import SAMPLE_RATE, chunk_bounds

    # 100 s of steady noise with two short pauses, where 30 s chunks should end.
    samples = np.random.default_rng(0).uniform(-0.1, 0.1, 100 * SAMPLE_RATE).astype(np.float32)
    pauses = [(23.0, 23.4), (46.0, 46.4)]
    for start, end in pauses:
        samples[round(start * SAMPLE_RATE) : round(end * SAMPLE_RATE)] = 0
    bounds = chunk_bounds(samples, 30)
    assert bounds[0][0] == 0
    assert bounds[-1][1] == len(samples)
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(bounds))
    assert all(0 < end - start <= 30 * SAMPLE_RATE for start, end in bounds)
    assert len(bounds) == 4  # as many as 30 s chunks need: no short tail
    cuts = [end / SAMPLE_RATE for _, end in bounds[:2]]
    for cut, (start, end) in zip(cuts, pauses, strict=True):
        assert start + 0.1 < cut < end - 0.1, cuts  # well inside the pause
    assert chunk_bounds(samples[: 30 * SAMPLE_RATE], 30) == [(0, 30 * SAMPLE_RATE)]
