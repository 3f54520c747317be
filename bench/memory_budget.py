"""Three models under a memory budget that fits two: LRU eviction, no failed request, and the
backends' resident memory never above the budget.

The default models (SmolLM2 chat, all-MiniLM embeddings, whisper-base transcription) are used
in turns for a few minutes, first one request at a time (chat, embeddings, transcription, chat,
...), then by three clients at once, each on its own model. A sampler reads the resident
memory of every backend process 20 times a second. The same load runs side by side on a gateway
without a budget (HEARTH_MEMORY unset: the machine's own), which keeps all three loaded.

    .venv/bin/python bench/memory_budget.py [--budget 850M] [--seconds 90]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from harness import ROOT, gateway, installed, link, scratch_models
from transcribe import SCRIPT

from gateway.manager.budget import process_memory, resident_memory
from gateway.units import parse_size

MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2", "whisper-base")
MIB = 1024 * 1024


def backends_rss(gateway: int) -> int:
    """Resident bytes of every process the gateway started (its descendants)."""
    return resident_memory([gateway])[gateway].total - process_memory(gateway).total


class Sampler:
    """The most the backends held at once, and the gateway itself, sampled every 50 ms."""

    def __init__(self, parent: int) -> None:
        self.parent = parent
        self.peak = 0
        self.gateway_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, backends_rss(self.parent))
            self.gateway_peak = max(self.gateway_peak, process_memory(self.parent).total)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def requests_for(clip: bytes) -> dict[str, Callable[[httpx.Client], httpx.Response]]:
    return {
        "smollm2-135m-instruct": lambda http: http.post(
            "/v1/chat/completions",
            json={
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "Name three birds."}],
                "max_tokens": 32,
            },
        ),
        "all-minilm-l6-v2": lambda http: http.post(
            "/v1/embeddings",
            json={"model": "all-minilm-l6-v2", "input": [f"text {i}" for i in range(32)]},
        ),
        "whisper-base": lambda http: http.post(
            "/v1/audio/transcriptions",
            files={"file": ("speech.wav", clip, "audio/wav")},
            data={"model": "whisper-base"},
        ),
    }


def run(models: Path, env: dict[str, str], seconds: float, clip: bytes) -> dict[str, object]:
    calls = requests_for(clip)
    failures: list[str] = []
    counts = {"alternating": 0, "concurrent": 0}
    with gateway(models, env=env) as (http, pid), Sampler(pid) as sampler:
        deadline = time.monotonic() + seconds
        for name in itertools.cycle(MODELS):
            if time.monotonic() > deadline:
                break
            answer = calls[name](http)
            counts["alternating"] += 1
            if answer.status_code != 200:
                failures.append(f"{name}: {answer.status_code} {answer.text[:200]}")

        lock = threading.Lock()

        def client(name: str, until: float) -> None:
            with httpx.Client(base_url=str(http.base_url), timeout=600) as own:
                while time.monotonic() < until:
                    answer = calls[name](own)
                    with lock:
                        counts["concurrent"] += 1
                        if answer.status_code != 200:
                            failures.append(f"{name}: {answer.status_code} {answer.text[:200]}")

        until = time.monotonic() + seconds / 2
        threads = [threading.Thread(target=client, args=(name, until)) for name in MODELS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        view = http.get("/backends").json()
    log = (models.parent / "gateway.log").read_text()
    return {
        "peak": sampler.peak,
        "gateway": sampler.gateway_peak,
        "failures": failures,
        "counts": counts,
        "evictions": log.count("to make room for"),
        "drains": log.count("draining "),
        "budget": view["budget"]["memory_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "bench-models")
    parser.add_argument("--budget", default="850M", help="HEARTH_MEMORY for the budgeted run")
    parser.add_argument("--seconds", type=float, default=90.0, help="of alternating requests")
    args = parser.parse_args()
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        sys.exit("needs espeak-ng (apt-get install espeak-ng)")
    clip = subprocess.run([espeak, "--stdout", SCRIPT], capture_output=True, check=True).stdout
    entries = [installed(name, args.models_dir) for name in MODELS]
    with scratch_models() as models:
        for entry in entries:
            link(args.models_dir / entry.model_path, models / entry.model_path)
            shutil.copy(args.models_dir / f"{entry.name}.yaml", models / f"{entry.name}.yaml")
        # Footprints measured in one run are what the next plans with: start both runs fresh.
        for label, env in (("budget", {"HEARTH_MEMORY": args.budget}), ("no budget", {})):
            shutil.rmtree(models / ".hearth", ignore_errors=True)
            result = run(models, env, args.seconds, clip)
            counts = result["counts"]
            assert isinstance(counts, dict)
            failures = result["failures"]
            assert isinstance(failures, list)
            peak, budget = int(result["peak"]), int(result["budget"])  # type: ignore[call-overload]
            print(f"== {label} ({budget / MIB:.0f} MiB for models)")
            print(
                f"   {counts['alternating']} requests in turns, {counts['concurrent']} by three "
                f"clients at once: {len(failures)} failed"
            )
            for failure in failures[:5]:
                print(f"      {failure}")
            print(
                f"   unloads to make room: {result['evictions']} ({result['drains']} of them "
                "after draining a busy model)"
            )
            verdict = "under" if peak <= parse_size(args.budget) else "OVER"
            print(
                f"   peak RSS of all backends: {peak / MIB:.0f} MiB "
                f"({verdict} the {args.budget} budget); the gateway itself "
                f"{int(result['gateway']) / MIB:.0f} MiB (outside the budget, in the reserve)"  # type: ignore[call-overload]
            )


if __name__ == "__main__":
    main()
