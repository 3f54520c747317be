"""Several models computing at once on one machine: aggregate throughput, and nobody starves.

Models: two SmolLM2-135M llama models (`threads:` = every core in their YAML, as a user sizing
a model for the machine writes), whisper-base, all-MiniLM-L6-v2. Each model's rate is measured
alone, then in these mixes at once, on one `hearth run` gateway:

    llama+llama             two chat streams on two models
    llama+whisper           a chat stream while audio is transcribed
    llama+embeddings        a chat stream while batches of 32 texts are embedded
    llama+llama+embeddings  three models at once

For a mix, the aggregate is the sum of each model's rate together / the best rate it reached
alone in the whole run: 1.0 means the machine does as much work as with one model at a time at
its best (the goal is >= 0.9). Every stream's
time to its first token and its longest wait between two tokens show whether anyone starves.
The whole run is made once per way of sharing the cores, side by side:

    shared   Hearth divides the cores among the models computing (the default)
    fixed    HEARTH_SHARE_CORES=0: each backend keeps the threads it loaded with (as before)
    passive  fixed, with OpenMP told not to spin while it waits (OMP_WAIT_POLICY=PASSIVE)
    halves   fixed, every model's YAML `threads:` set to half the cores (a static partition)

    .venv/bin/python bench/sharing.py [--window 15] [--modes shared,fixed,passive,halves]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import ROOT, chat_pieces, gateway, installed, link, scratch_models
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
        for _ in chat_pieces(http, body):
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


MODES = {
    "shared": "cores divided among the models computing",
    "fixed": "threads fixed at load (HEARTH_SHARE_CORES=0)",
    "passive": "threads fixed at load, OpenMP waits without spinning (OMP_WAIT_POLICY=PASSIVE)",
    "halves": "threads fixed at half the cores each (a static partition)",
}


def write_models(models: Path, entries: dict[str, Any], threads: int) -> None:
    llama, whisper, minilm = entries["llama"], entries["whisper"], entries["minilm"]
    for name in ("llama-a", "llama-b"):
        (models / f"{name}.yaml").write_text(
            f"name: {name}\nbackend: llama\nmodel: {llama.model_path}\ncontext_size: 2048\n"
            f"threads: {threads}\n"
        )
    (models / "whisper.yaml").write_text(
        f"name: whisper\nbackend: whisper\nmodel: {whisper.model_path}\nthreads: {threads}\n"
        "options: {compute_type: int8, beam_size: 5}\n"
    )
    (models / "embeddings.yaml").write_text(
        f"name: embeddings\nbackend: transformers\nmodel: {minilm.model_path}\nembeddings: true\n"
        f"threads: {threads}\n"
    )


@dataclass
class Result:
    """One way of sharing: each model's rate alone, and every mix's rates together."""

    alone: dict[str, float] = field(default_factory=dict)
    together: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: dict[str, dict[str, str]] = field(default_factory=dict)


def measure(
    models: Path,
    mode: str,
    window: float,
    clip: bytes,
    clip_seconds: float,
    entries: dict[str, Any],
) -> Result:
    cores = os.cpu_count() or 2
    write_models(models, entries, max(1, cores // 2) if mode == "halves" else cores)
    env = {"HEARTH_SHARE_CORES": "1" if mode == "shared" else "0"}
    if mode == "passive":
        env.update(OMP_WAIT_POLICY="PASSIVE", GOMP_SPINCOUNT="0")
    clients: dict[str, Callable[..., None]] = {
        "llama-a": lambda h, s, r: stream(h, "llama-a", s, r),
        "llama-b": lambda h, s, r: stream(h, "llama-b", s, r),
        "whisper": lambda h, s, r: transcribe(h, clip, clip_seconds, s, r),
        "embeddings": lambda h, s, r: embed(h, s, r),
    }
    result = Result()
    with gateway(models, env=env) as (http, _):
        url = str(http.base_url)
        for name in clients:  # load every model before measuring anything
            run_clients(url, {name: clients[name]}, 0.0, 0.5)
        for name in ("llama-a", "whisper", "embeddings"):
            records, start, end = run_clients(url, {name: clients[name]}, 2.0, window)
            result.alone[name] = records[name].rate(start, end)
        result.alone["llama-b"] = result.alone["llama-a"]  # the same model and settings
        for mix, names in MIXES.items():
            records, start, end = run_clients(url, {n: clients[n] for n in names}, 2.0, window)
            result.together[mix], result.notes[mix] = {}, {}
            for name in names:
                result.together[mix][name] = records[name].rate(start, end)
                if records[name].token_times:
                    first = records[name].first_token[0] * 1000
                    gap = records[name].longest_gap(start, end) * 1000
                    result.notes[mix][name] = (
                        f"first token {first:.0f} ms, longest gap {gap:.0f} ms"
                    )
    return result


def report(results: dict[str, Result]) -> None:
    """Every mode's figures, each against the best single-model figure of the whole run."""
    best = {name: max(r.alone[name] for r in results.values()) for name in UNITS}
    print(
        "\nbest single-model figures: " + ", ".join(f"{n} {best[n]:.1f} {UNITS[n]}" for n in best)
    )
    for mode, result in results.items():
        print(f"\n== {mode}: {MODES[mode]}")
        alone = ", ".join(
            f"{n} {result.alone[n]:.1f} ({result.alone[n] / best[n]:.2f}x best)"
            for n in ("llama-a", "whisper", "embeddings")
        )
        print(f"   alone: {alone}")
        for mix, rates in result.together.items():
            total = sum(rate / best[name] for name, rate in rates.items())
            print(f"   {mix:<24} aggregate {total:.2f}x the best single-model figures")
            for name, rate in rates.items():
                note = result.notes[mix].get(name)
                extra = f", {note}" if note else ""
                print(
                    f"      {name} {rate:.1f} {UNITS[name]} ({rate / best[name]:.2f}x best{extra})"
                )
    print("\naggregate (goal >= 0.9)   " + "  ".join(f"{m:>8}" for m in results))
    print(
        f"{'alone, llama':<26}"
        + "  ".join(f"{r.alone['llama-a'] / best['llama-a']:8.2f}" for r in results.values())
    )
    for mix in MIXES:
        cells = []
        for result in results.values():
            rates = result.together[mix]
            cells.append(f"{sum(rate / best[n] for n, rate in rates.items()):8.2f}")
        print(f"{mix:<26}" + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "bench-models")
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured per case")
    parser.add_argument("--modes", default=",".join(MODES))
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
    entries = {"llama": llama, "whisper": whisper, "minilm": minilm}
    with scratch_models() as models:
        for entry in entries.values():
            link(args.models_dir / entry.model_path, models / entry.model_path)
        print(f"{cores} CPU(s); {args.window:g} s measured per case; clip {clip_seconds:.1f} s")
        results = {
            mode: measure(models, mode, args.window, clip, clip_seconds, entries)
            for mode in args.modes.split(",")
        }
    report(results)


if __name__ == "__main__":
    main()
