"""The streaming speech encoders: what each format's bytes decode to, and when they come out."""

from __future__ import annotations

import io
import struct
import wave

import av
import numpy as np
import numpy.typing as npt
import pytest

from backends.runtime.audio_out import AudioEncoder
from protos.hearth.backend.v1 import backend_pb2 as pb

CODED = [pb.AUDIO_FORMAT_MP3, pb.AUDIO_FORMAT_FLAC, pb.AUDIO_FORMAT_OPUS, pb.AUDIO_FORMAT_AAC]
#: An MP3 stream cannot say how much its encoder added (that goes in a Xing/LAME header, which a
#: stream has no way to patch at the end): LAME's 1105 samples of priming, and the last frame's
#: padding (576 samples at 22.05 and 16 kHz).
MP3_EXTRA_SECONDS = (1105 + 576) / 16000
#: AAC's priming (1024 samples) and its last frame's padding.
AAC_EXTRA_SECONDS = 0.12


def tone(seconds: float, rate: int, frequency: float = 220.0) -> npt.NDArray[np.int16]:
    t = np.arange(round(seconds * rate)) / rate
    return (np.sin(2 * np.pi * frequency * t) * 8000).astype(np.int16)


def decode(data: bytes) -> tuple[float, int]:
    """Seconds of audio and samples per second, as a player (FFmpeg) reads `data`."""
    samples = 0
    rate = 0
    with av.open(io.BytesIO(data), "r") as container:
        for frame in container.decode(audio=0):
            samples += frame.samples
            rate = frame.sample_rate
    return samples / rate, rate


def encode(audio_format: int, rate: int, pieces: list[float]) -> tuple[list[bytes], AudioEncoder]:
    encoder = AudioEncoder(audio_format, rate)
    out = [encoder.feed(tone(seconds, rate)) for seconds in pieces]
    out.append(encoder.finish())
    return out, encoder


@pytest.mark.parametrize("rate", [22050, 16000])
@pytest.mark.parametrize("audio_format", [pb.AUDIO_FORMAT_WAV, *CODED])
def test_each_format_decodes_to_the_audio_fed(audio_format: int, rate: int) -> None:
    pieces, encoder = encode(audio_format, rate, [1.5, 0.25, 0.8])
    seconds, decoded_rate = decode(b"".join(pieces))
    assert decoded_rate == encoder.sample_rate
    # MP3 and AAC decoders cannot trim the encoder's start-up padding in a stream.
    extra = {pb.AUDIO_FORMAT_MP3: MP3_EXTRA_SECONDS, pb.AUDIO_FORMAT_AAC: AAC_EXTRA_SECONDS}
    extra = extra.get(audio_format, 0.0)
    assert 2.55 - 0.05 <= seconds <= 2.55 + 0.05 + extra


def test_opus_is_48_khz_pcm_24_khz_and_other_formats_keep_the_voice_rate() -> None:
    expected = {pb.AUDIO_FORMAT_OPUS: 48000, pb.AUDIO_FORMAT_PCM: 24000}
    for audio_format in (pb.AUDIO_FORMAT_WAV, pb.AUDIO_FORMAT_PCM, *CODED):
        rate = AudioEncoder(audio_format, 22050).sample_rate
        assert rate == expected.get(audio_format, 22050)


def test_pcm_is_24_khz_samples_little_endian_with_no_header() -> None:
    # OpenAI's pcm is 24 kHz: clients play it at that rate, whatever the voice's own.
    samples = tone(1.5, 22050)
    encoder = AudioEncoder(pb.AUDIO_FORMAT_PCM, 22050)
    pieces = [encoder.feed(samples[:22050]), encoder.feed(samples[22050:]), encoder.finish()]
    assert pieces[0], "the first second comes out at once"
    data = b"".join(pieces)
    assert len(data) == 2 * 36000, "1.5 s at 24 kHz, 16-bit"
    as_is = AudioEncoder(pb.AUDIO_FORMAT_PCM, 24000)
    assert as_is.feed(samples) == samples.astype("<i2").tobytes(), "24 kHz in: unchanged"
    assert as_is.finish() == b""


def test_wav_is_streamed_with_unknown_sizes() -> None:
    samples = tone(0.5, 22050)
    encoder = AudioEncoder(pb.AUDIO_FORMAT_WAV, 22050)
    first = encoder.feed(samples)
    second = encoder.feed(samples)
    data = first + second + encoder.finish()
    assert second == samples.astype("<i2").tobytes()  # the header only once
    riff, riff_size, wave_id = struct.unpack("<4sI4s", data[:12])
    assert (riff, riff_size, wave_id) == (b"RIFF", 0xFFFFFFFF, b"WAVE")
    fmt = struct.unpack("<4sIHHIIHH", data[12:36])
    assert fmt == (b"fmt ", 16, 1, 1, 22050, 44100, 2, 16)
    assert struct.unpack("<4sI", data[36:44]) == (b"data", 0xFFFFFFFF)
    # Python's own reader takes the unknown size and reads to the end.
    with wave.open(io.BytesIO(data)) as reader:
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (
            1,
            2,
            22050,
        )
        assert reader.readframes(10**9) == data[44:]
    seconds, _ = decode(data)
    assert seconds == pytest.approx(1.0, abs=1e-3)


def test_wav_without_audio_is_still_a_header() -> None:
    data = AudioEncoder(pb.AUDIO_FORMAT_WAV, 22050).finish()
    assert len(data) == 44
    assert data.startswith(b"RIFF")


@pytest.mark.parametrize("audio_format", CODED)
def test_most_of_a_sentence_comes_out_before_the_next(audio_format: int) -> None:
    """A client can play a sentence while the next is synthesized: the bytes out after feeding
    two seconds decode to nearly all of them (encoders hold back a frame or a page)."""
    encoder = AudioEncoder(audio_format, 22050)
    first = encoder.feed(tone(2.0, 22050))
    seconds, _ = decode(first)
    assert seconds >= 1.7
    rest = encoder.feed(tone(1.0, 22050)) + encoder.finish()
    assert rest
    encoder.close()  # after finish: nothing left to free


@pytest.mark.parametrize("audio_format", CODED)
def test_an_abandoned_stream_closes_quietly(audio_format: int) -> None:
    encoder = AudioEncoder(audio_format, 22050)
    encoder.feed(tone(0.3, 22050))
    encoder.close()
    encoder.close()


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown audio format"):
        AudioEncoder(pb.AUDIO_FORMAT_UNSPECIFIED, 22050)
