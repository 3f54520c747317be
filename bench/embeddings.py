"""What embedding through Hearth costs, next to Transformers in-process.

all-MiniLM-L6-v2, 256 short sentences, sent in requests of 1 and of 32, measured in turns:
(a) transformers in this process (tokenize, forward, mean pooling, L2 norm: what the backend
does), (b) `POST /v1/embeddings` on a `hearth run` gateway, base64 as the openai SDK asks.
Prints texts/s for each and the ratio.

    .venv/bin/python bench/embeddings.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import base64
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from harness import ROOT, gateway, installed, interleaved, link, scratch_models

MODEL = "all-minilm-l6-v2"
SUBJECTS = ["The cat", "A storm", "My neighbour", "The old train", "This recipe", "Our team"]
VERBS = ["waited for", "talked about", "changed", "remembered", "ignored", "painted"]
OBJECTS = ["the river", "a red door", "the last summer", "two small birds", "the night sky"]


def sentences(count: int) -> list[str]:
    return [
        f"{SUBJECTS[i % 6]} {VERBS[(i // 6) % 6]} {OBJECTS[(i // 36) % 5]} on day {i}."
        for i in range(count)
    ]


class InProcess:
    def __init__(self, directory: Path) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.model = AutoModel.from_pretrained(directory, local_files_only=True).eval()

    def embed(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            batch = self.tokenizer(
                texts, padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


def through_hearth(http: httpx.Client, texts: list[str]) -> np.ndarray:
    response = http.post(
        "/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "base64"}
    )
    response.raise_for_status()
    return np.stack(
        [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in response.json()["data"]]
    )


def timed(embed: Callable[[list[str]], object], texts: list[str], batch: int) -> float:
    """Texts per second for embedding `texts` in requests of `batch`."""
    started = time.perf_counter()
    for start in range(0, len(texts), batch):
        embed(texts[start : start + batch])
    return len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "bench-models")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--texts", type=int, default=256)
    args = parser.parse_args()

    entry = installed(MODEL, args.models_dir)
    source = args.models_dir / entry.model_path
    texts = sentences(args.texts)
    local = InProcess(source)
    results: dict[tuple[str, int], list[float]] = {}
    with scratch_models() as models:
        link(source, models / entry.model_path)
        (models / "model.yaml").write_text(
            f"name: {MODEL}\nbackend: transformers\nmodel: {entry.model_path}\nembeddings: true\n"
        )
        with gateway(models) as (http, _):
            # Warm both, and check they agree.
            difference = np.abs(local.embed(texts[:8]) - through_hearth(http, texts[:8])).max()
            assert difference < 1e-5, f"in-process and Hearth disagree by {difference}"
            for batch in (1, 32):
                for mode in interleaved(args.rounds, ("in-process", "hearth")):
                    embed: Callable[[list[str]], object] = local.embed
                    if mode == "hearth":
                        embed = lambda chunk: through_hearth(http, chunk)  # noqa: E731
                    results.setdefault((mode, batch), []).append(timed(embed, texts, batch))

    import torch

    print(f"all-MiniLM-L6-v2, {args.texts} short sentences, {torch.get_num_threads()} torch "
          f"threads, {args.rounds} interleaved rounds, medians")  # fmt: skip
    for batch in (1, 32):
        local_rate = statistics.median(results[("in-process", batch)])
        hearth_rate = statistics.median(results[("hearth", batch)])
        # Median of the ratios of neighbouring rounds: what the machine's drift disturbs least.
        pairs = zip(results[("hearth", batch)], results[("in-process", batch)], strict=True)
        ratio = statistics.median(h / i for h, i in pairs)
        print(f"  batch {batch:>2}: in-process {local_rate:7.1f} texts/s   hearth "
              f"{hearth_rate:7.1f} texts/s   ratio {ratio:.3f}"
              f"{'   goal >= 0.9' if batch == 32 else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
