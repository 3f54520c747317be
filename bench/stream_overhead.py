"""What streaming through Hearth costs, next to llama.cpp in-process.

The same GGUF (SmolLM2-135M-Instruct), prompt, greedy sampling, context and thread count,
measured in turns: (a) llama-cpp-python in this process, (b) a `hearth run` gateway streaming
over HTTP/SSE from its llama backend process. For each it prints generation tokens/s and the
time to the first content token, then the ratios, then the gateway process's own RSS when idle.

    .venv/bin/python bench/stream_overhead.py [--runs 11] [--max-tokens 128] [--threads N]

Tokens are counted the same way for both: the streamed text, re-tokenized by the model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from harness import ROOT, chat_pieces, gateway, installed, interleaved, link, scratch_models

from gateway.manager.budget import process_memory

PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."
MODEL = "smollm2-135m-instruct"


@dataclass
class Run:
    first_token_s: float  # request sent → first content token
    tokens: int
    generation_s: float  # first content token → last

    @property
    def tokens_per_second(self) -> float:
        return (self.tokens - 1) / self.generation_s if self.generation_s > 0 else 0.0


def rss_mb(pid: int) -> float:
    return process_memory(pid).total / (1024 * 1024)


def in_process(llm: Any, max_tokens: int, count: Any) -> Run:
    started = time.perf_counter()
    first = last = 0.0
    pieces = []
    for chunk in llm.create_chat_completion(
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
    ):
        content = chunk["choices"][0]["delta"].get("content")
        if content:
            last = time.perf_counter()
            first = first or last
            pieces.append(content)
    return Run(first - started, count("".join(pieces)), last - first)


def through_hearth(http: httpx.Client, max_tokens: int, count: Any) -> Run:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    started = time.perf_counter()
    first = last = 0.0
    pieces = []
    for content in chat_pieces(http, body):
        last = time.perf_counter()
        first = first or last
        pieces.append(content)
    return Run(first - started, count("".join(pieces)), last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "bench-models")
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--context-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = parser.parse_args()

    entry = installed(MODEL, args.models_dir)
    source = args.models_dir / entry.model_path

    from llama_cpp import Llama

    llm = Llama(
        model_path=str(source),
        n_ctx=args.context_size,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )

    def count(text: str) -> int:
        return len(llm.tokenize(text.encode(), add_bos=False, special=True))

    results: dict[str, list[Run]] = {"in-process": [], "hearth": []}
    with scratch_models() as models:
        link(source, models / entry.model_path)
        (models / "model.yaml").write_text(
            f"name: {MODEL}\nbackend: llama\nmodel: {entry.model_path}\n"
            f"context_size: {args.context_size}\nthreads: {args.threads}\n"
        )
        with gateway(models) as (http, pid):
            time.sleep(1.0)
            idle_before_load = rss_mb(pid)
            # Warm both: the backend loads its model, both fill their caches.
            in_process(llm, 8, count)
            through_hearth(http, 8, count)
            for mode in interleaved(args.runs, ("in-process", "hearth")):
                if mode == "in-process":
                    results[mode].append(in_process(llm, args.max_tokens, count))
                else:
                    results[mode].append(through_hearth(http, args.max_tokens, count))
            time.sleep(1.0)
            idle_after = rss_mb(pid)

    print(f"model {entry.model}, {args.max_tokens} tokens greedy, context {args.context_size}, "
          f"{args.threads} thread(s), {args.runs} interleaved runs each, medians")  # fmt: skip
    summary = {}
    for mode, runs in results.items():
        tps = statistics.median(r.tokens_per_second for r in runs)
        ttft = statistics.median(r.first_token_s for r in runs) * 1000
        tokens = statistics.median(r.tokens for r in runs)
        summary[mode] = (tps, ttft)
        print(f"  {mode:<11} {tps:7.1f} tok/s   first token {ttft:6.1f} ms   ({tokens:.0f} tokens)")
    # Each run of one is next to a run of the other: the median of those pairs' ratios is what
    # the machine's drift disturbs least.
    pairs = zip(results["hearth"], results["in-process"], strict=True)
    ratio = statistics.median(h.tokens_per_second / i.tokens_per_second for h, i in pairs)
    print(f"  ratio (hearth / in-process tok/s, median of pairs): {ratio:.3f}   goal >= 0.97")
    print(f"  first-token overhead: {summary['hearth'][1] - summary['in-process'][1]:+.1f} ms")
    print(f"  gateway RSS idle: {idle_before_load:.0f} MB before any model, "
          f"{idle_after:.0f} MB after the runs   goal <= 100 MB")  # fmt: skip


if __name__ == "__main__":
    main()
