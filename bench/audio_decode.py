"""What decoding a long compressed upload costs: faster_whisper.decode_audio next to Hearth's
bounded decoder (the whisper backend's `decode`).

A file that compresses far (by default two hours of silence as FLAC, about 400 KB, made with
sox) is decoded in turns, each time in a fresh child process: (a) faster_whisper.decode_audio,
which decodes all of it; (b) Hearth's decoder with the server's default limit (3600 s), which
stops at the limit and refuses the file; (c) Hearth's decoder with no limit, which decodes all
of it too. Prints each one's peak resident memory (the child's ru_maxrss), how far decoding
raised it above the child's own after its imports, its time, and the peak ratio of (a) to (b).

    .venv/bin/python bench/audio_decode.py [--hours 2] [--limit 3600] [--file upload.opus]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import ROOT, interleaved

MIB = 1024 * 1024
MODES = ("faster-whisper", "hearth, limit", "hearth, no limit")


def measure(mode: str, path: Path, limit: float) -> None:
    """In a child: decode `path` one way; print its peak memory and time as JSON."""
    from faster_whisper import decode_audio

    from backends.runtime import BackendError
    from backends.whisper.backend import decode

    audio = path.read_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    outcome = "decoded"
    if mode == "faster-whisper":
        seconds = len(decode_audio(io.BytesIO(audio), sampling_rate=16000)) / 16000
    else:
        try:
            seconds = len(decode(audio, limit if mode == "hearth, limit" else 0.0)) / 16000
        except BackendError as exc:
            outcome, seconds = exc.reason, limit
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {"peak": peak, "before": before, "time": elapsed, "outcome": outcome}
    print(json.dumps({**report, "seconds": seconds}))


def child(mode: str, path: Path, limit: float) -> dict[str, Any]:
    command = [sys.executable, __file__, "--measure", mode, "--file", str(path)]
    command += ["--limit", str(limit)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=2.0, help="silence to make, in hours")
    parser.add_argument("--limit", type=float, default=3600.0, help="seconds (the default's)")
    parser.add_argument("--file", type=Path, help="decode this file instead of making one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.file, args.limit)
        return

    with tempfile.TemporaryDirectory(prefix="hearth-bench-") as scratch:
        path = args.file
        if path is None:
            sox = shutil.which("sox")
            if sox is None:
                sys.exit("needs sox (apt-get install sox), or --file")
            path = Path(scratch) / "silence.flac"
            length = str(args.hours * 3600)
            command = [sox, "-n", "-r", "16000", "-c", "1", str(path), "trim", "0", length]
            subprocess.run(command, check=True)
        name, size = path.name, path.stat().st_size
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for index, mode in enumerate(interleaved(args.rounds, MODES[:2])):
            runs[mode].append(child(mode, path, args.limit))
            if index % 2 == 1:  # the unbounded decoder once a round, after the pair
                runs[MODES[2]].append(child(MODES[2], path, args.limit))

    seconds = runs[MODES[0]][0]["seconds"]
    print(f"{name}: {seconds:.0f} s of audio in {size / 1024:.0f} KB; limit {args.limit:g} s; "
          f"{args.rounds} rounds, each in a fresh process, medians")  # fmt: skip
    print(f"  {'decoder':<17} {'peak RSS':>10} {'decoding':>10} {'time':>8}  outcome")
    peaks = {}
    for mode, results in runs.items():
        peak = statistics.median(r["peak"] for r in results)
        grown = statistics.median(r["peak"] - r["before"] for r in results)
        took = statistics.median(r["time"] for r in results)
        peaks[mode] = peak
        print(f"  {mode:<17} {peak / MIB:6.0f} MiB {grown / MIB:+6.0f} MiB {took:7.2f} s  "
              f"{results[0]['outcome']}")  # fmt: skip
    print(f"  peak ratio (faster-whisper / hearth with the limit): "
          f"{peaks[MODES[0]] / peaks[MODES[1]]:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
