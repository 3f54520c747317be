"""Streaming audio encoders: 16-bit mono PCM in, the bytes of a speech format out, as they are made.

WAV and PCM are written here; MP3, FLAC and Ogg Opus by PyAV, whose container writes into a sink
that is drained after each piece of audio, so that a client can play the first sentence while the
next is synthesized. The sink cannot seek: the muxers then write what a stream needs (no sizes or
seek tables to patch at the end).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from protos.hearth.backend.v1 import backend_pb2 as pb

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

#: A streamed RIFF/data size: "unknown", as OpenAI streams WAV.
_UNKNOWN_SIZE = 0xFFFFFFFF
#: Ogg pages of 100 ms (the muxer's default is 1 s): the muxer holds back its last two pages,
#: so this bounds how much of a sentence arrives only with the next one.
_OGG_PAGE_MICROSECONDS = 100_000
#: OpenAI's `pcm`: 24 kHz 16-bit mono, whatever the voice's own rate (clients assume it).
PCM_SAMPLE_RATE = 24000
#: format → (container, codec, the codec's sample rate; 0: the input's).
_CODED: dict[int, tuple[str, str, int]] = {
    pb.AUDIO_FORMAT_MP3: ("mp3", "libmp3lame", 0),
    pb.AUDIO_FORMAT_FLAC: ("flac", "flac", 0),
    pb.AUDIO_FORMAT_OPUS: ("ogg", "libopus", 48000),  # Opus has no 22.05 kHz mode
    pb.AUDIO_FORMAT_AAC: ("adts", "aac", 0),
}
#: Bits per second of the lossy codecs: a voice at 64 kbit/s mono is clear (libmp3lame's
#: default for a 22 kHz mono stream is 32 kbit/s, which hisses).
_BIT_RATE = 64000


def wav_header(sample_rate: int) -> bytes:
    """The 44-byte header of a streamed 16-bit mono WAV whose length is not known."""
    return b"".join(
        (
            b"RIFF",
            struct.pack("<I", _UNKNOWN_SIZE),
            b"WAVE",
            b"fmt ",
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16),
            b"data",
            struct.pack("<I", _UNKNOWN_SIZE),
        )
    )


class _Sink:
    """A write-only, unseekable file that PyAV writes into and the encoder drains."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def drain(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class AudioEncoder:
    """Encode one stream of 16-bit mono PCM, piece by piece, into `audio_format` (pb.AudioFormat).

    `feed` returns the bytes that are ready (possibly none: an encoder may hold a frame back),
    `finish` the rest; `close` drops an unfinished stream.
    """

    def __init__(self, audio_format: int, sample_rate: int) -> None:
        self.format = audio_format
        #: Samples per second of the encoded stream (what a decoder will produce).
        self.sample_rate = sample_rate
        self._input_rate = sample_rate
        self._started = False
        self._container: Any = None
        self._stream: Any = None
        self._sink = _Sink()
        self._resampler: Any = None
        if audio_format == pb.AUDIO_FORMAT_PCM and sample_rate != PCM_SAMPLE_RATE:
            import av

            self.sample_rate = PCM_SAMPLE_RATE
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=PCM_SAMPLE_RATE)
        if audio_format in (pb.AUDIO_FORMAT_WAV, pb.AUDIO_FORMAT_PCM):
            return
        if audio_format not in _CODED:
            raise ValueError(f"unknown audio format {audio_format}")
        import av

        container_format, codec, rate = _CODED[audio_format]
        options = (
            {"page_duration": str(_OGG_PAGE_MICROSECONDS)} if container_format == "ogg" else {}
        )
        self._container = av.open(
            self._sink, "w", format=container_format, container_options=options
        )
        self.sample_rate = rate or sample_rate
        # PyAV's encoder converts each frame to the codec's sample format and rate (with its own
        # AudioResampler) and cuts it into the codec's frame size.
        self._stream = self._container.add_stream(codec, rate=self.sample_rate, layout="mono")
        if codec != "flac":
            self._stream.bit_rate = _BIT_RATE

    def feed(self, samples: npt.NDArray[np.int16]) -> bytes:
        """Encode `samples`; return the bytes of the stream that are ready now."""
        if self.format == pb.AUDIO_FORMAT_PCM:
            if self._resampler is None:
                return samples.astype("<i2", copy=False).tobytes()
            return self._resampled(self._frame(samples) if len(samples) else None)
        if self.format == pb.AUDIO_FORMAT_WAV:
            header = b"" if self._started else wav_header(self._input_rate)
            self._started = True
            return header + samples.astype("<i2", copy=False).tobytes()
        if len(samples) == 0:
            return self._sink.drain()
        self._container.mux(self._stream.encode(self._frame(samples)))
        return self._sink.drain()

    def _frame(self, samples: npt.NDArray[np.int16]) -> Any:
        import av

        frame = av.AudioFrame.from_ndarray(
            samples.astype("int16", copy=False).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = self._input_rate
        return frame

    def _resampled(self, frame: Any) -> bytes:
        """PCM at 24 kHz: what the resampler gives for `frame` (None: what it held back)."""
        out = self._resampler.resample(frame)
        return b"".join(bytes(f.planes[0])[: f.samples * 2] for f in out)

    def finish(self) -> bytes:
        """End the stream: the bytes the encoder and the container held back, and a trailer."""
        if self.format == pb.AUDIO_FORMAT_WAV and not self._started:
            self._started = True
            return wav_header(self._input_rate)  # no audio: still a valid (empty) file
        if self._resampler is not None:
            return self._resampled(None)
        if self._container is None:
            return b""
        self._container.mux(self._stream.encode(None))
        self.close()
        return self._sink.drain()

    def close(self) -> None:
        """Free the encoder (after `finish`, or instead of it when the stream is abandoned)."""
        if self._container is not None:
            container, self._container = self._container, None
            container.close()
