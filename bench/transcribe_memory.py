"""What transcribing long audio costs in memory: one faster-whisper call on all of it next to
the whisper backend's chunks (CHUNK_SECONDS at a time).

whisper-base (int8, beam 5, the backend's settings on both sides) transcribes the same audio, by
default 20 minutes of espeak-ng speech with pauses (a paragraph repeated), in turns, each time
in a fresh child process: (a) the backend with chunking off (options.chunk_seconds past the
audio's length: one `model.transcribe` call, as before chunking); (b) the backend as it ships.
Both decode the upload the same way. Prints each one's peak resident memory, how far the
transcription raised it above the loaded model's, its time, the peak ratio of (a) to (b), and
how far the two texts agree (words in common, difflib).

    .venv/bin/python bench/transcribe_memory.py [--minutes 20] [--silence] [--file talk.mp3]
"""

from __future__ import annotations

import argparse
import difflib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import ROOT, installed, interleaved
from transcribe import SCRIPT

MIB = 1024 * 1024
MODEL = "whisper-base"
MODES = ("one call", "chunked")
#: options.chunk_seconds that turns chunking off: longer than any audio.
NO_CHUNKS = 1e9


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise SystemExit(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def measure(mode: str, path: Path, model: Path, threads: int) -> None:
    """In a child: load the backend, transcribe `path` one way; print figures as JSON."""
    from google.protobuf import struct_pb2

    from backends.whisper.backend import SAMPLE_RATE, WhisperBackend, chunk_bounds, decode
    from protos.hearth.backend.v1 import backend_pb2 as pb

    options = struct_pb2.Struct()
    if mode == "one call":
        options.update({"chunk_seconds": NO_CHUNKS})
    backend = WhisperBackend()
    backend.load(pb.LoadRequest(model_path=str(model), threads=threads, options=options))
    audio = path.read_bytes()
    chunks = len(chunk_bounds(decode(audio), backend.chunk_seconds))
    before = status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    started = time.perf_counter()
    response = backend.transcribe(pb.TranscribeRequest(audio=audio), threading.Event())
    elapsed = time.perf_counter() - started
    report = {
        "peak": status_kib("VmHWM") * 1024,
        "before": before,
        "time": elapsed,
        "seconds": len(decode(audio)) / SAMPLE_RATE,
        "chunks": chunks,
        "segments": len(response.segments),
        "text": response.text,
    }
    print(json.dumps(report))


def child(mode: str, path: Path, model: Path, threads: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--measure", mode, "--file", str(path)]
    command += ["--model", str(model), "--threads", str(threads)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{mode} failed:\n{result.stderr}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def make_audio(directory: Path, minutes: float, silence: bool) -> Path:
    """`minutes` of speech (SCRIPT over and over, a second's pause between) or of silence."""
    sox = shutil.which("sox")
    espeak = shutil.which("espeak-ng")
    if sox is None or (espeak is None and not silence):
        sys.exit("needs sox and espeak-ng (apt-get install sox espeak-ng), or --file")
    path = directory / ("silence.flac" if silence else "speech.flac")
    length = str(minutes * 60)
    if silence:
        command = [sox, "-n", "-r", "16000", "-c", "1", str(path), "trim", "0", length]
    else:
        assert espeak is not None
        clip = directory / "clip.wav"
        subprocess.run([espeak, "-w", str(clip), SCRIPT], check=True)
        command = [sox, str(clip), "-r", "16000", str(path), "pad", "0", "1"]
        command += ["repeat", "999", "trim", "0", length]
    subprocess.run(command, check=True)
    return path


def agreement(first: str, second: str) -> float:
    """The share of words the two texts have in common, in order (1.0: the same words)."""
    matcher = difflib.SequenceMatcher(None, first.lower().split(), second.lower().split(), False)
    return matcher.ratio()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="audio to make")
    parser.add_argument("--silence", action="store_true", help="silence instead of speech")
    parser.add_argument("--file", type=Path, help="transcribe this file instead of making one")
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "bench-models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.file, args.model, args.threads)
        return

    model = args.models_dir / installed(MODEL, args.models_dir).model_path
    with tempfile.TemporaryDirectory(prefix="hearth-bench-") as scratch:
        path = args.file or make_audio(Path(scratch), args.minutes, args.silence)
        name, size = path.name, path.stat().st_size
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for mode in interleaved(args.rounds, MODES):
            runs[mode].append(child(mode, path, model, args.threads))

    first = runs[MODES[1]][0]
    print(f"{MODEL} int8, beam 5, {args.threads} threads: {name}, {first['seconds']:.0f} s of "
          f"audio in {size / 1024:.0f} KB; {args.rounds} round(s), each run in a fresh process, "
          "medians")  # fmt: skip
    print(f"  {'mode':<9} {'chunks':>6} {'peak RSS':>10} {'transcribing':>13} {'time':>8} "
          f"{'RTF':>6} {'segments':>9}")  # fmt: skip
    peaks, grown = {}, {}
    for mode, results in runs.items():
        peaks[mode] = statistics.median(r["peak"] for r in results)
        grown[mode] = statistics.median(r["peak"] - r["before"] for r in results)
        took = statistics.median(r["time"] for r in results)
        print(f"  {mode:<9} {results[0]['chunks']:>6} {peaks[mode] / MIB:6.0f} MiB "
              f"{grown[mode] / MIB:+9.0f} MiB {took:7.1f} s {took / first['seconds']:6.3f} "
              f"{results[0]['segments']:>9}")  # fmt: skip
    print(f"  peak ratio (one call / chunked): {peaks[MODES[0]] / peaks[MODES[1]]:.1f}x; "
          f"above the loaded model: {grown[MODES[0]] / grown[MODES[1]]:.1f}x")  # fmt: skip
    same = agreement(runs[MODES[0]][0]["text"], first["text"])
    print(f"  text agreement (words in common, in order): {same:.1%}")


if __name__ == "__main__":
    main()
