"""How well Hearth knows a model's memory before loading it: estimate vs measured RSS.

For each default model (and SmolLM2 at three context sizes), on a fresh models dir so that
nothing measured earlier is used: the gateway's estimate from the model's files (what it plans
with before the first load), the backend process's resident memory right after the load, and
its peak after one real request. The goal is an estimate within 25 % of the measured RSS.

    .venv/bin/python bench/footprint.py
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

import httpx
from harness import ROOT, gateway, installed, link, scratch_models
from transcribe import SCRIPT

MIB = 1024 * 1024

CASES = [
    # (name, gallery entry, extra YAML, a request that uses the model)
    ("smollm2 (context 4096)", "smollm2-135m-instruct", "context_size: 4096\n", "chat"),
    ("smollm2 (context 512)", "smollm2-135m-instruct", "context_size: 512\n", "chat"),
    ("smollm2 (context 16384)", "smollm2-135m-instruct", "context_size: 16384\n", "chat"),
    ("all-minilm-l6-v2", "all-minilm-l6-v2", "embeddings: true\n", "embed"),
    ("whisper-base (int8)", "whisper-base", "options: {compute_type: int8}\n", "transcribe"),
    ("whisper-tiny-en (int8)", "whisper-tiny-en", "options: {compute_type: int8}\n", "transcribe"),
]


def use(http: httpx.Client, kind: str, clip: bytes | None) -> None:
    if kind == "chat":
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "Tell me about the sea. " * 40}],
            "max_tokens": 64,
        }
        http.post("/v1/chat/completions", json=body).raise_for_status()
    elif kind == "embed":
        texts = [f"sentence {i} about lighthouses and storms at sea" for i in range(64)]
        http.post("/v1/embeddings", json={"model": "m", "input": texts}).raise_for_status()
    elif clip is not None:
        files = {"file": ("speech.wav", clip, "audio/wav")}
        http.post("/v1/audio/transcriptions", files=files, data={"model": "m"}).raise_for_status()


def row(http: httpx.Client) -> dict[str, object]:
    return next(r for r in http.get("/backends").json()["data"] if r["model"] == "m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "bench-models")
    args = parser.parse_args()
    espeak = shutil.which("espeak-ng")
    clip = None
    if espeak is not None:
        clip = subprocess.run([espeak, "--stdout", SCRIPT], capture_output=True, check=True).stdout

    header = ("model", "estimate", "after load", "ratio", "after use", "ratio")
    print("{:<26} {:>11} {:>11} {:>6} {:>10} {:>6}".format(*header))
    for label, name, extra, kind in CASES:
        if kind == "transcribe" and clip is None:
            print(f"{label:<26} skipped: needs espeak-ng")
            continue
        entry = installed(name, args.models_dir)
        backend = entry.config["backend"]
        with scratch_models() as models:
            link(args.models_dir / entry.model_path, models / entry.model_path)
            (models / "m.yaml").write_text(
                f"name: m\nbackend: {backend}\nmodel: {entry.model_path}\n{extra}"
            )
            # Preloaded: /backends shows the estimate the load was planned with and the RSS
            # measured right after it, before any request.
            with gateway(models, env={"HEARTH_PRELOAD": "m"}) as (http, _):
                deadline = time.monotonic() + 120
                while not any(r["state"] == "ready" for r in http.get("/backends").json()["data"]):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{label} did not load")
                    time.sleep(0.1)
                memory = row(http)["memory"]
                assert isinstance(memory, dict)
                estimate, after_load = memory["planned_bytes"], memory["peak_rss_bytes"]
                assert memory["planned_from"] == "estimate", memory
                for _ in range(3):
                    use(http, kind, clip)
                time.sleep(1.5)  # the gateway samples every second
                peak = row(http)["memory"]["peak_rss_bytes"]  # type: ignore[index]
        print(
            f"{label:<26} {estimate / MIB:7.0f} MiB {after_load / MIB:7.0f} MiB "
            f"{estimate / after_load:6.2f} {peak / MIB:6.0f} MiB {estimate / peak:6.2f}"
        )
    print("ratio: estimate / measured RSS; goal within 0.75-1.25 of the RSS after load")


if __name__ == "__main__":
    main()
