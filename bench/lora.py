"""LoRA variants on the Transformers backend: the memory they share and what they cost per token.

Model: SmolLM2-135M-Instruct as Hugging Face safetensors (the test cache's
smollm2-135m-instruct-transformers), with two LoRA adapters made here with peft (rank 8 on every
attention and MLP projection, about 10 MB each in float32; small random updates, so the text stays
the model's). One `hearth run` gateway serves it two ways at once:

    shared     the base `smol` and its variants `smol-a`, `smol-b` (`base: smol`): one process
    separate   `own`, `own-a`, `own-b`: the same three, each a model of its own with its own process

Prints each way's resident memory (GET /backends, `memory.rss_bytes`, after every model answered),
then tokens per second of greedy chat answers (`--tokens` long) in turns, medians of `--rounds`:
the base before any adapter was loaded into its process, the base with both loaded, a variant
(one adapter), and three at once (base, a, b in one batch) next to three requests of the base at
once. The first answer of a variant also times loading its adapter.

    .venv/bin/python bench/lora.py [--rounds 5] [--tokens 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time
from pathlib import Path

import httpx
from harness import ROOT, gateway, link, scratch_models

SOURCE = ROOT / ".cache" / "test-models" / "smollm2-135m-instruct-transformers"
PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."
MIB = 1024 * 1024


def make_adapter(directory: Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(SOURCE),
        LoraConfig(r=8, lora_alpha=16, target_modules=targets),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 1e-3)
    model.save_pretrained(directory, safe_serialization=True)


def chat(http: httpx.Client, model: str, tokens: int) -> tuple[int, float]:
    """Tokens generated and seconds taken by one greedy chat answer."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": tokens,
    }
    started = time.perf_counter()
    response = http.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"], time.perf_counter() - started


def rate(http: httpx.Client, models: list[str], tokens: int) -> float:
    """Tokens per second of `models` answering at once (all their tokens / the wall time)."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(lambda m: chat(http, m, tokens), models))
    return sum(count for count, _ in results) / (time.perf_counter() - started)


def rss(http: httpx.Client) -> dict[str, int]:
    rows = http.get("/backends").json()["data"]
    return {row["model"]: row["memory"]["rss_bytes"] or 0 for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not SOURCE.is_dir():
        raise SystemExit(f"{SOURCE} is missing: run the test suite's real-model tests first")

    with scratch_models() as models:
        link(SOURCE, models / "smol")
        for name, seed in (("a", 1), ("b", 2)):
            make_adapter(models / "adapters" / name, seed)
        size = sum(f.stat().st_size for f in (models / "adapters" / "a").iterdir())
        base = f"backend: transformers\nmodel: smol\nthreads: {args.threads}\nkeep_alive: -1"
        configs = {
            "smol": base,
            "smol-a": "base: smol\nlora: [{path: adapters/a}]",
            "smol-b": "base: smol\nlora: [{path: adapters/b}]",
            "own": base,
            "own-a": f"{base}\nlora: [{{path: adapters/a}}]",
            "own-b": f"{base}\nlora: [{{path: adapters/b}}]",
        }
        for name, body in configs.items():
            (models / f"{name}.yaml").write_text(f"name: {name}\n{body}\n")

        env = {"HEARTH_MAX_LOADED_MODELS": "8"}
        with gateway(models, env) as (http, _):
            chat(http, "smol", 8)  # loaded
            before = [rate(http, ["smol"], args.tokens) for _ in range(args.rounds)]
            first_load = chat(http, "smol-a", args.tokens)[1]
            steady = chat(http, "smol-a", args.tokens)[1]
            chat(http, "smol-b", 8)
            measured: dict[str, list[float]] = {}
            ways = {
                "base, adapters loaded": ["smol"],
                "variant (one adapter)": ["smol-a"],
                "3 at once: base, a, b": ["smol", "smol-a", "smol-b"],
                "3 at once: base x3": ["smol", "smol", "smol"],
            }
            for index in range(args.rounds):
                order = list(ways.items())
                for label, names in order if index % 2 == 0 else reversed(order):
                    measured.setdefault(label, []).append(rate(http, names, args.tokens))
            for name in ("own", "own-a", "own-b"):
                chat(http, name, 8)
            memory = rss(http)

    print(f"SmolLM2-135M (float32), adapters of {size / MIB:.1f} MiB, {args.threads} threads")
    print()
    shared = memory.get("smol", 0)
    separate = sum(memory.get(n, 0) for n in ("own", "own-a", "own-b"))
    print(f"{'resident memory':<34}{'MiB':>8}")
    print(f"{'shared: one process, base + 2':<34}{shared / MIB:>8.0f}")
    print(f"{'separate: three processes':<34}{separate / MIB:>8.0f}")
    print()
    print(f"{'greedy chat, ' + str(args.tokens) + ' tokens':<34}{'tokens/s':>10}")
    print(f"{'base, no adapter loaded yet':<34}{statistics.median(before):>10.1f}")
    for label, values in measured.items():
        print(f"{label:<34}{statistics.median(values):>10.1f}")
    print()
    print(f"first answer of a variant {first_load:.2f} s (adapter loaded), then {steady:.2f} s")


if __name__ == "__main__":
    main()
