"""Continuous batching in the llama backend: 1, 2, 4 and 8 concurrent streams, next to the engine.

SmolLM2-135M-Instruct (Q4_1), greedy, up to --max-tokens tokens per stream, each stream its own
prompt. Measured in turns, in one run:
(a) engine: llama.cpp's batched decode driven directly in this process (N sequences in one
    context with a cache share each, one `llama_decode` per step for all of them, greedy), the
    rate the engine itself reaches;
(b) hearth: N clients streaming /v1/completions at once through one `hearth run` gateway, from
    a model with `parallel: 8`;
(c) hearth, batching off: the same clients on a copy of the model with `parallel: 1` (requests
    are served one after another, as before batching).
For each N it prints the aggregate tokens/s and its ratio to one stream of the same kind, hearth's
ratio and rate next to the engine's, and the slowest client's first token next to the goal: within
2x the single client's first token plus its own prompt's prefill, and plus the prefill of all N
prompts (N clients arriving at once wait for each other's prompts: the engine reads them no faster
together than one by one, measured). Prefills are timed in-process by (a).

    .venv/bin/python bench/llama_batching.py [--rounds 3] [--max-tokens 96] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from harness import ROOT, gateway, installed, link, scratch_models

MODEL = "smollm2-135m-instruct"
BATCHED = "smollm2-batched"
ONE_AT_A_TIME = "smollm2-one-at-a-time"
STREAMS = (1, 2, 4, 8)
CONTEXT = 1024
PROMPTS = [
    "The old lighthouse keeper climbed the stairs one last time, and",
    "Here is a recipe for a simple bread that anyone can bake at home:",
    "In the year 2150, the first city on Mars",
    "The history of the bicycle begins",
    "A letter to my younger self: Dear me,",
    "The most important lesson I learned from my grandmother was",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "To repair a leaking tap, you first need to",
]


@dataclass
class Run:
    tokens: int
    seconds: float
    #: Each client's time to its first token (hearth) or each prompt's prefill (engine).
    first: list[float]

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


# (a) the engine in this process -------------------------------------------------------------


class Engine:
    """llama.cpp's batched decode, as its own `batched` example drives it: greedy, each prompt
    read on its own (as Hearth does), then one decode per step for every sequence."""

    def __init__(self, path: Path, threads: int, sequences: int) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        self.lib = llama_cpp
        self.model = LlamaModel(
            path_model=str(path), params=llama_cpp.llama_model_default_params(), verbose=False
        )
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = CONTEXT * sequences
        params.n_seq_max = sequences
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False
        params.no_perf = True
        self.ctx = LlamaContext(model=self.model, params=params, verbose=False)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        self.vocabulary = self.model.n_vocab()

    def _decode(self, entries: list[tuple[int, int, int]]) -> None:
        batch = self.batch
        for i, (token, position, seq) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0], batch.logits[i] = seq, True
        batch.n_tokens = len(entries)
        assert self.lib.llama_decode(self.ctx.ctx, batch) == 0

    def _argmax(self, index: int) -> int:
        import numpy as np

        logits = self.lib.llama_get_logits_ith(self.ctx.ctx, index)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.vocabulary,))))

    def run(self, prompts: list[str], max_tokens: int) -> Run:
        self.lib.llama_memory_clear(self.ctx.memory, True)
        started = time.perf_counter()
        first, pending, positions = [], [], []
        for seq, prompt in enumerate(prompts):
            began = time.perf_counter()
            tokens = self.model.tokenize(prompt.encode(), add_bos=True, special=True)
            batch = self.batch
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                batch.seq_id[i][0], batch.logits[i] = seq, i == len(tokens) - 1
            batch.n_tokens = len(tokens)
            assert self.lib.llama_decode(self.ctx.ctx, batch) == 0
            pending.append(self._argmax(len(tokens) - 1))
            positions.append(len(tokens))
            first.append(time.perf_counter() - began)
        produced = [1] * len(prompts)
        live = [not self.lib.llama_vocab_is_eog(self.model.vocab, t) for t in pending]
        while True:
            running = [s for s in range(len(prompts)) if live[s] and produced[s] < max_tokens]
            if not running:
                break
            self._decode([(pending[s], positions[s], s) for s in running])
            for index, s in enumerate(running):
                positions[s] += 1
                token = self._argmax(index)
                if self.lib.llama_vocab_is_eog(self.model.vocab, token):
                    live[s] = False
                else:
                    pending[s] = token
                    produced[s] += 1
        return Run(sum(produced), time.perf_counter() - started, first)


# (b), (c) hearth ----------------------------------------------------------------------------


async def streams(url: str, model: str, prompts: list[str], max_tokens: int) -> Run:
    """All prompts streamed at once, one client each; tokens as the usage counts them."""
    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()

        async def one(prompt: str) -> tuple[int, float]:
            body: dict[str, Any] = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            first, tokens = 0.0, 0
            async with http.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if not first and chunk["choices"] and chunk["choices"][0]["text"]:
                        first = time.perf_counter() - started
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            return tokens, first

        done = await asyncio.gather(*(one(p) for p in prompts))
        return Run(sum(t for t, _ in done), time.perf_counter() - started, [f for _, f in done])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "bench-models")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    entry = installed(MODEL, args.models_dir)
    source = args.models_dir / entry.model_path
    kinds = ("engine", "hearth", "hearth, batching off")
    results: dict[tuple[str, int], list[Run]] = {(k, n): [] for k in kinds for n in STREAMS}
    engine = Engine(source, args.threads, max(STREAMS))
    with scratch_models() as models:
        link(source, models / entry.model_path)
        common = (
            f"backend: llama\nmodel: {entry.model_path}\nthreads: {args.threads}\n"
            f"context_size: {CONTEXT}\nmax_queue: 16\n"
        )
        (models / f"{BATCHED}.yaml").write_text(f"name: {BATCHED}\n{common}parallel: 8\n")
        (models / f"{ONE_AT_A_TIME}.yaml").write_text(
            f"name: {ONE_AT_A_TIME}\n{common}parallel: 1\n"
        )
        with gateway(models) as (http, _):
            url = str(http.base_url)
            for model in (BATCHED, ONE_AT_A_TIME):  # load both, and warm them
                asyncio.run(streams(url, model, PROMPTS[:2], 8))
            engine.run(PROMPTS[:2], 8)
            for index in range(args.rounds):
                order = kinds if index % 2 == 0 else tuple(reversed(kinds))
                for kind in order:
                    for n in STREAMS:
                        # A new beginning each run: no prompt is found in a slot's cache
                        # (Hearth reuses a cached prefix; the in-process side has none).
                        prompts = [f"({index}.{n}) {p}" for p in PROMPTS[:n]]
                        if kind == "engine":
                            run = engine.run(prompts, args.max_tokens)
                        else:
                            model = BATCHED if kind == "hearth" else ONE_AT_A_TIME
                            run = asyncio.run(streams(url, model, prompts, args.max_tokens))
                        results[(kind, n)].append(run)

    print(f"SmolLM2-135M-Instruct Q4_1, greedy, up to {args.max_tokens} tokens a stream, "
          f"{args.threads} threads, {args.rounds} rounds in turns; medians. Ratios: aggregate "
          "tok/s / one stream of the same kind, median over rounds")  # fmt: skip

    def ratio(kind: str, n: int) -> float:
        pairs = zip(results[(kind, n)], results[(kind, 1)], strict=True)
        return statistics.median(r.rate / one.rate for r, one in pairs)

    for kind in kinds:
        print(f"  {kind}")
        for n in STREAMS:
            rate = statistics.median(r.rate for r in results[(kind, n)])
            line = f"    {n} stream(s) {rate:7.1f} tok/s   x{ratio(kind, n):.2f}"
            if kind == "hearth":
                engine_rate = statistics.median(r.rate for r in results[("engine", n)])
                share = ratio("hearth", n) / ratio("engine", n)
                line += (
                    f"   = {share:.2f} of the engine's x{ratio('engine', n):.2f},"
                    f" rate {rate / engine_rate:.2f} of its"
                )
            if kind != "engine":
                slowest = statistics.median(max(r.first) for r in results[(kind, n)])
                line += f"   slowest first token {slowest * 1000:6.0f} ms"
                if kind == "hearth" and n > 1:
                    alone = statistics.median(r.first[0] for r in results[("hearth", 1)])
                    own = statistics.median(max(r.first) for r in results[("engine", n)])
                    every = statistics.median(sum(r.first) for r in results[("engine", n)])
                    line += (
                        f"; 2 x alone + own prefill {(2 * alone + own) * 1000:.0f} ms,"
                        f" + all {n} prefills {(2 * alone + every) * 1000:.0f} ms"
                    )
            print(line)
    print("  goal at 4 streams: hearth x>= 1.3, and >= 0.9 of the engine's own")


if __name__ == "__main__":
    main()
