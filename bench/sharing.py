"""Several models computing at once on one machine: aggregate throughput, and nobody starves.

Models: two SmolLM2-135M llama models (`threads:` = every core in their YAML, as a user sizing
a model for the machine writes), whisper-base, all-MiniLM-L6-v2. Each model's rate is measured
alone, then in these mixes at once, on one `hearth run` gateway:

    llama+llama             two chat streams on two models
    llama+whisper           a chat stream while audio is transcribed
    llama+embeddings        a chat stream while batches of 32 texts are embedded
    llama+llama+embeddings  three models at once

For a mix, the aggregate is the sum of each model's rate together / its rate alone: 1.0 means
the machine does as much work as with one model at a time (the goal is >= 0.9). Every stream's
time to its first token and its longest wait between two tokens show whether anyone starves.
The whole run is made twice, side by side: with Hearth dividing the cores among the models
computing (the default), and with HEARTH_SHARE_CORES=0 (each backend keeps the threads it loaded
with, as before).

    .venv/bin/python bench/sharing.py [--window 15] [--modes shared,fixed]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from harness import ROOT, gateway, installed, link, scratch_models
from transcribe import SCRIPT

PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."
TEXTS = [f"Sentence number {i} about the sea, the keeper and the storm." for i in range(32)]
MIXES = {
    "llama+llama": ["llama-a", "llama-b"],
    "llama+whisper": ["llama-a", "whisper"],
    "llama+embeddings": ["llama-a", "embeddings"],
    "llama+llama+embeddings": ["llama-a", "llama-b", "embeddings"],
}
UNITS = {"llama-a": "tok/s", "llama-b": "tok/s", "whisper": "audio s/s", "embeddings": "texts/s"}


@dataclass
class Record:
    """What one client did: (start, end, units) spans, and for streams the token times."""

    spans: list[tuple[float, float, float]] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)

    def rate(self, start: float, end: float) -> float:
        """Units per second inside [start, end], each span's units spread over the span."""
        total = 0.0
        for begin, finish, units in self.spans:
            if begin == finish:  # a token: a point in time
                total += units if start <= begin <= end else 0.0
                continue
            overlap = min(finish, end) - max(begin, start)
            if overlap > 0:
                total += units * overlap / (finish - begin)
        return total / (end - start)

    def longest_gap(self, start: float, end: float) -> float:
        times = [start] + [t for t in self.token_times if start <= t <= end] + [end]
        return max(b - a for a, b in itertools.pairwise(times))


def stream(http: httpx.Client, model: str, stop: threading.Event, record: Record) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 200,
        "temperature": 0.0,
        "stream": True,
    }
    while not stop.is_set():
        sent = time.perf_counter()
        first = True
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    now = time.perf_counter()
                    if first:
                        record.first_token.append(now - sent)
                        first = False
                    record.token_times.append(now)
                    record.spans.append((now, now, 1.0))
                if stop.is_set():
                    break


def transcribe(
    http: httpx.Client, clip: bytes, seconds: float, stop: threading.Event, record: Record
) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        response = http.post(
            "/v1/audio/transcriptions",
            files={"file": ("speech.wav", clip, "audio/wav")},
            data={"model": "whisper"},
        )
        response.raise_for_status()
        record.spans.append((began, time.perf_counter(), seconds))


def embed(http: httpx.Client, stop: threading.Event, record: Record) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        response = http.post("/v1/embeddings", json={"model": "embeddings", "input": TEXTS})
        response.raise_for_status()
        record.spans.append((began, time.perf_counter(), float(len(TEXTS))))


def run_clients(
    url: str, clients: dict[str, Callable[..., None]], warm: float, window: float
) -> tuple[dict[str, Record], float, float]:
    """Run every client at once; return their records and the measured window."""
    stop = threading.Event()
    records = {name: Record() for name in clients}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            with httpx.Client(base_url=url, timeout=600) as http:
                clients[name](http, stop, records[name])
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=run, args=(name,)) for name in clients]
    for thread in threads:
        thread.start()
    start = time.perf_counter() + warm
    time.sleep(warm + window)
    stop.set()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return records, start, start + window


def measure(models: Path, mode: str, window: float, clip: bytes, clip_seconds: float) -> None:
    env = {"HEARTH_SHARE_CORES": "1" if mode == "shared" else "0"}
    clients: dict[str, Callable[..., None]] = {
        "llama-a": lambda h, s, r: stream(h, "llama-a", s, r),
        "llama-b": lambda h, s, r: stream(h, "llama-b", s, r),
        "whisper": lambda h, s, r: transcribe(h, clip, clip_seconds, s, r),
        "embeddings": lambda h, s, r: embed(h, s, r),
    }
    with gateway(models, env=env) as (http, _):
        url = str(http.base_url)
        for name in clients:  # load every model before measuring anything
            run_clients(url, {name: clients[name]}, 0.0, 0.5)
        alone = {}
        for name in ("llama-a", "whisper", "embeddings"):
            records, start, end = run_clients(url, {name: clients[name]}, 2.0, window)
            alone[name] = records[name].rate(start, end)
        alone["llama-b"] = alone["llama-a"]  # the same model and settings
        how = "divided among the models computing" if mode == "shared" else "fixed at load"
        print(f"\n== cores {how} (HEARTH_SHARE_CORES={env['HEARTH_SHARE_CORES']})")
        print("   alone: " + ", ".join(f"{n} {alone[n]:.1f} {UNITS[n]}" for n in alone))
        for mix, names in MIXES.items():
            records, start, end = run_clients(url, {n: clients[n] for n in names}, 2.0, window)
            parts, total = [], 0.0
            for name in names:
                together = records[name].rate(start, end)
                share = together / alone[name] if alone[name] else 0.0
                total += share
                detail = f"{name} {together:.1f} {UNITS[name]} ({share:.2f}x alone"
                if records[name].token_times:
                    first = records[name].first_token[0] * 1000
                    gap = records[name].longest_gap(start, end) * 1000
                    detail += f", first token {first:.0f} ms, longest gap {gap:.0f} ms"
                parts.append(detail + ")")
            print(f"   {mix:<24} aggregate {total:.2f}x   goal >= 0.9")
            for part in parts:
                print(f"      {part}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "bench-models")
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured per case")
    parser.add_argument("--modes", default="shared,fixed")
    args = parser.parse_args()
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        sys.exit("needs espeak-ng (apt-get install espeak-ng)")
    clip = subprocess.run([espeak, "--stdout", SCRIPT], capture_output=True, check=True).stdout
    clip_seconds = (len(clip) - 44) / (22050 * 2)  # espeak-ng writes 22.05 kHz 16-bit mono WAV
    cores = os.cpu_count() or 2

    llama = installed("smollm2-135m-instruct", args.models_dir)
    whisper = installed("whisper-base", args.models_dir)
    minilm = installed("all-minilm-l6-v2", args.models_dir)
    with scratch_models() as models:
        for entry in (llama, whisper, minilm):
            link(args.models_dir / entry.model, models / entry.model)
        for name in ("llama-a", "llama-b"):
            (models / f"{name}.yaml").write_text(
                f"name: {name}\nbackend: llama\nmodel: {llama.model}\ncontext_size: 2048\n"
                f"threads: {cores}\n"
            )
        (models / "whisper.yaml").write_text(
            f"name: whisper\nbackend: whisper\nmodel: {whisper.model}\n"
            "options: {compute_type: int8, beam_size: 5}\n"
        )
        (models / "embeddings.yaml").write_text(
            f"name: embeddings\nbackend: transformers\nmodel: {minilm.model}\nembeddings: true\n"
        )
        print(f"{cores} CPU(s); {args.window:g} s measured per case; clip {clip_seconds:.1f} s")
        for mode in args.modes.split(","):
            measure(models, mode, args.window, clip, clip_seconds)


if __name__ == "__main__":
    main()
