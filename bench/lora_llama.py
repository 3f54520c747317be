"""A PEFT LoRA converted to a GGUF LoRA and served on llama.cpp as a variant: what it answers,
what it costs per token, and the memory one shared process saves.

Model: the default SmolLM2-135M-Instruct (Q4_1 GGUF, from the test cache). The adapter is the
PEFT folder given with --adapter (trained on the Hugging Face copy of SmolLM2 in the test cache,
the default --base-config), or else one made here with peft (rank 8 on every projection, small
random updates). `hearth models convert ADAPTER --base smollm2-135m-instruct` makes the variant
`smollm2-lora`; the same GGUF LoRA is also named in `own-lora`, a model with `lora:` and a
process of its own. One `hearth run` gateway then:

- asks the base and the variant each --question (greedy chat) and prints the answers;
- times a greedy raw completion of `--tokens` tokens from the base and from the variant, in
  turns, `--rounds` times each (medians; both in the one process);
- reads the resident memory (RSS, and the private part of it: not the GGUF's pages or the
  libraries, which a second process shares) of the base's process before and after the
  variant used it, and of the second process `own-lora` needs.

    .venv/bin/python bench/lora_llama.py [--adapter DIR] [--rounds 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from harness import ROOT, gateway, interleaved, link, scratch_models

CACHE = ROOT / ".cache" / "test-models"
BASE = "smollm2-135m-instruct"
HF_COPY = CACHE / "smollm2-135m-instruct-transformers"
#: A raw prompt neither the base nor a chatty adapter ends early (the same token count for both).
PROMPT = "Here is a list of the fifty states of the United States:\n1. Alabama\n2."
MIB = 1024 * 1024


def make_adapter(directory: Path, base_config: Path) -> None:
    """A rank-8 PEFT LoRA of SmolLM2 with small random updates (no training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_config),
        LoraConfig(r=8, lora_alpha=16, target_modules=targets),
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 1e-3)
    model.save_pretrained(directory, safe_serialization=True)


def answer(http: httpx.Client, model: str, question: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 48,
    }
    response = http.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"])


def rate(http: httpx.Client, model: str, tokens: int) -> tuple[float, int]:
    """Tokens per second of one greedy raw completion, and how many tokens it made."""
    body = {"model": model, "prompt": PROMPT, "temperature": 0, "max_tokens": tokens}
    started = time.perf_counter()
    response = http.post("/v1/completions", json=body)
    response.raise_for_status()
    made = int(response.json()["usage"]["completion_tokens"])
    return made / (time.perf_counter() - started), made


def memory(http: httpx.Client) -> dict[str, tuple[int, int]]:
    """(RSS, private) in bytes of each loaded model's process: private is what it alone holds
    (not the GGUF's pages or libraries, which another process mapping them shares)."""
    found = {}
    for row in http.get("/backends").json()["data"]:
        private = 0
        for line in Path(f"/proc/{row['pid']}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1]) * 1024
        found[row["model"]] = (int(row["memory"]["rss_bytes"] or 0), private)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, help="a PEFT LoRA folder (default: made here)")
    parser.add_argument("--base-config", type=Path, default=HF_COPY)
    parser.add_argument(
        "--question",
        action="append",
        help="asked of both, greedy (repeatable; default: What is the capital of Italy?)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    gguf = CACHE / BASE / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file() or not args.base_config.is_dir():
        raise SystemExit(f"{gguf} or {args.base_config} is missing: run the real-model tests first")

    with scratch_models() as models:
        link(gguf, models / BASE / gguf.name)
        shutil.copy(CACHE / f"{BASE}.yaml", models)
        adapter = args.adapter
        if adapter is None:
            adapter = models.parent / "adapter"
            make_adapter(adapter, args.base_config)
        command = [sys.executable, "-m", "gateway", "models", "convert", str(adapter)]
        command += ["--base", BASE, "--base-config", str(args.base_config)]
        command += ["--name", "smollm2-lora", "--models-dir", str(models)]
        started = time.perf_counter()
        converted = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if converted.returncode != 0:
            raise SystemExit(converted.stderr)
        seconds = time.perf_counter() - started
        lora = models / "smollm2-lora" / "smollm2-lora.gguf"
        own = (CACHE / f"{BASE}.yaml").read_text().replace(f"name: {BASE}", "name: own-lora")
        own += "lora: [{path: smollm2-lora/smollm2-lora.gguf}]\n"
        (models / "own-lora.yaml").write_text(own)

        questions = args.question or ["What is the capital of Italy?"]
        with gateway(models, {"HEARTH_MAX_LOADED_MODELS": "4"}) as (http, _):
            rate(http, BASE, 8)  # loaded, without the adapter
            alone = memory(http)[BASE]
            answers = {
                (q, m): answer(http, m, q) for q in questions for m in (BASE, "smollm2-lora")
            }
            measured: dict[str, list[float]] = {BASE: [], "smollm2-lora": []}
            made: set[int] = set()
            for model in interleaved(args.rounds, (BASE, "smollm2-lora")):
                value, count = rate(http, model, args.tokens)
                measured[model].append(value)
                made.add(count)
            shared = memory(http)[BASE]
            rate(http, "own-lora", 8)  # its own process, loaded
            separate = memory(http)

    print(f"converted in {seconds:.1f} s: {lora.name} is {lora_size(converted.stdout)}")
    print()
    for (question, model), text in answers.items():
        if model == BASE:
            print(f"{question!r}")
        print(f"  {model:<24}{text!r}")
    print()
    tokens = "/".join(str(n) for n in sorted(made))  # one count, unless one stopped early
    print(f"greedy raw completion of {tokens} tokens, median of {args.rounds}    tokens/s")
    for model, values in measured.items():
        print(f"  {model:<24}{statistics.median(values):>30.1f}")
    print()
    print(f"{'resident memory':<48}{'RSS MiB':>9}{'private':>9}")
    total = [a + b for a, b in zip(separate[BASE], separate["own-lora"], strict=True)]
    rows = [
        ("one process, the base alone (no adapter yet)", alone),
        ("one process serving base and variant", shared),
        ("a second process for the variant alone", separate["own-lora"]),
        ("two processes, together", (total[0], total[1])),
    ]
    for label, (resident, private) in rows:
        print(f"  {label:<46}{resident / MIB:>9.0f}{private / MIB:>9.0f}")


def lora_size(output: str) -> str:
    """The 'X MB -> Y MB' the convert command printed."""
    for line in output.splitlines():
        if " -> " in line and " MB" in line:
            return line.split(": ", 1)[1]
    return "?"


if __name__ == "__main__":
    main()
