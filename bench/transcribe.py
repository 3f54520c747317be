"""What transcribing through Hearth costs, next to faster-whisper in-process.

whisper-base (int8, beam 5, the same settings on both sides), a ~25 s clip spoken by espeak-ng,
measured in turns: (a) faster-whisper in this process, (b) `POST /v1/audio/transcriptions` on a
`hearth run` gateway. Prints the real-time factor (seconds of compute per second of audio; lower
is faster) of each and the speed ratio (in-process time / Hearth time).

    .venv/bin/python bench/transcribe.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import ROOT, gateway, installed, interleaved, link, scratch_models

MODEL = "whisper-base"
SCRIPT = (
    "The lighthouse keeper climbed the narrow stairs every evening at six. "
    "He lit the great lamp, wound the clockwork, and wrote the weather in his book. "
    "On stormy nights the waves reached the windows, and the whole tower hummed. "
    "Ships passed far out at sea, and none of them ever knew his name. "
    "In spring, the gulls came back, and he counted them from the gallery. "
    "When winter came, he wrote long letters to his sister in the city by the river."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "bench-models")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        sys.exit("needs espeak-ng (apt-get install espeak-ng)")
    clip = subprocess.run([espeak, "--stdout", SCRIPT], capture_output=True, check=True).stdout

    entry = installed(MODEL, args.models_dir)
    source = args.models_dir / entry.model_path
    from faster_whisper import WhisperModel, decode_audio

    duration = len(decode_audio(io.BytesIO(clip))) / 16000
    local = WhisperModel(str(source), device="cpu", compute_type="int8", local_files_only=True)

    def in_process() -> str:
        segments, _ = local.transcribe(decode_audio(io.BytesIO(clip)), beam_size=5)
        return "".join(s.text for s in segments)

    times: dict[str, list[float]] = {"in-process": [], "hearth": []}
    with scratch_models() as models:
        link(source, models / entry.model_path)
        (models / "model.yaml").write_text(
            f"name: {MODEL}\nbackend: whisper\nmodel: {entry.model_path}\n"
            "options: {compute_type: int8, beam_size: 5}\n"
        )
        with gateway(models) as (http, _):

            def through_hearth() -> str:
                response = http.post(
                    "/v1/audio/transcriptions",
                    files={"file": ("clip.wav", clip)},
                    data={"model": MODEL},
                )
                response.raise_for_status()
                return str(response.json()["text"])

            in_process()
            text = through_hearth()  # warm: the backend loads its model
            for mode in interleaved(args.rounds, ("in-process", "hearth")):
                started = time.perf_counter()
                in_process() if mode == "in-process" else through_hearth()
                times[mode].append(time.perf_counter() - started)

    print(f"whisper-base int8, beam 5, {duration:.1f} s of espeak-ng speech, "
          f"{args.rounds} interleaved rounds, medians")  # fmt: skip
    for mode, values in times.items():
        print(f"  {mode:<11} RTF {statistics.median(values) / duration:.3f}")
    pairs = zip(times["in-process"], times["hearth"], strict=True)
    ratio = statistics.median(i / h for i, h in pairs)
    print(f"  speed ratio (in-process time / hearth time, median of pairs): {ratio:.3f}   "
          "goal >= 0.95")  # fmt: skip
    print(f"  text: {text[:80]}...")


if __name__ == "__main__":
    main()
