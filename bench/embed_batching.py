"""Dynamic batching of embeddings: concurrent single-text requests, next to the same one by one.

all-MiniLM-L6-v2 through one `hearth run` gateway, every request one text (what a notes app or
a RAG indexer sends), measured in turns:
(a) serial: one client, one request after another;
(b) concurrent: CLIENTS clients at once, each sending its share of the texts one by one, which
    the backend gathers into shared forward passes;
(c) concurrent, batching off: the same clients on a copy of the model with `max_concurrency: 1`
    (requests queue in the gateway and reach the backend one at a time, as before batching).
Prints texts/s for each and the ratios to serial (the issue's goal: (b) >= 2x (a)).

    .venv/bin/python bench/embed_batching.py [--rounds 5] [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
from embeddings import sentences
from harness import ROOT, gateway, installed, link, scratch_models

MODEL = "all-minilm-l6-v2"
BATCHED = "minilm"
ONE_BY_ONE = "minilm-one-by-one"


async def serial(url: str, model: str, texts: list[str]) -> float:
    """Texts per second, one request after another."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        started = time.perf_counter()
        for text in texts:
            (
                await http.post("/v1/embeddings", json={"model": model, "input": text})
            ).raise_for_status()
        return len(texts) / (time.perf_counter() - started)


async def concurrent(url: str, model: str, texts: list[str], clients: int) -> float:
    """Texts per second with `clients` clients at once, each sending single texts."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client(share: list[str]) -> None:
            for text in share:
                response = await http.post("/v1/embeddings", json={"model": model, "input": text})
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(client(texts[i::clients]) for i in range(clients)))
        return len(texts) / (time.perf_counter() - started)


def vector(http: httpx.Client, model: str, text: str) -> np.ndarray:
    response = http.post("/v1/embeddings", json={"model": model, "input": text})
    response.raise_for_status()
    return np.array(response.json()["data"][0]["embedding"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "bench-models")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (YAML threads:)")
    args = parser.parse_args()

    entry = installed(MODEL, args.models_dir)
    source = args.models_dir / entry.model_path
    texts = sentences(args.texts)
    modes = ("serial", "concurrent", "concurrent, batching off")
    results: dict[str, list[float]] = {mode: [] for mode in modes}
    with scratch_models() as models:
        link(source, models / entry.model_path)
        common = (
            f"backend: transformers\nmodel: {entry.model_path}\nembeddings: true\n"
            f"threads: {args.threads}\n"
        )
        (models / f"{BATCHED}.yaml").write_text(f"name: {BATCHED}\n{common}")
        (models / f"{ONE_BY_ONE}.yaml").write_text(
            f"name: {ONE_BY_ONE}\n{common}max_concurrency: 1\n"
        )
        with gateway(models) as (http, _):
            url = str(http.base_url)
            # Load both and warm them; batched answers must be the ones given alone.
            alone = [vector(http, BATCHED, t) for t in texts[: args.clients]]
            vector(http, ONE_BY_ONE, texts[0])
            asyncio.run(concurrent(url, BATCHED, texts[: args.clients * 4], args.clients))

            async def together() -> list[np.ndarray]:
                async with httpx.AsyncClient(base_url=url, timeout=600) as client:
                    responses = await asyncio.gather(
                        *(
                            client.post("/v1/embeddings", json={"model": BATCHED, "input": t})
                            for t in texts[: args.clients]
                        )
                    )
                return [np.array(r.json()["data"][0]["embedding"]) for r in responses]

            difference = max(
                float(np.abs(a - b).max())
                for a, b in zip(alone, asyncio.run(together()), strict=True)
            )
            assert difference < 1e-5, f"batched and lone answers differ by {difference}"
            for index in range(args.rounds):
                order = modes if index % 2 == 0 else tuple(reversed(modes))
                for mode in order:
                    if mode == "serial":
                        rate = asyncio.run(serial(url, BATCHED, texts))
                    else:
                        model = BATCHED if mode == "concurrent" else ONE_BY_ONE
                        rate = asyncio.run(concurrent(url, model, texts, args.clients))
                    results[mode].append(rate)

    print(f"all-MiniLM-L6-v2 through Hearth, {args.texts} short sentences one per request, "
          f"{args.threads} torch threads, {args.clients} clients, {args.rounds} rounds in "
          f"turns, medians (batched and lone vectors differ by <= {difference:.1e})")  # fmt: skip
    base = results["serial"]
    for mode in modes:
        rate = statistics.median(results[mode])
        # Median of the ratios of neighbouring rounds: what the machine's drift disturbs least.
        ratio = statistics.median(m / s for m, s in zip(results[mode], base, strict=True))
        goal = "   goal >= 2.0" if mode == "concurrent" else ""
        print(f"  {mode:<25} {rate:7.1f} texts/s   x{ratio:.2f} serial{goal}")


if __name__ == "__main__":
    main()
