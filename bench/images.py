"""What image generation through Hearth costs, next to Diffusers in-process.

A tiny random Stable Diffusion pipeline (the one the tests build; no real text-to-image model is
small enough for PyPI), 64x64, 2 steps, measured in turns: (a) the pipeline in this process,
(b) `POST /v1/images/generations` (b64_json) on a `hearth run` gateway. Prints seconds per image
for each and the speed ratio (in-process time / Hearth time). With so small a model the fixed
cost of a request weighs as much as it ever will; a real model's seconds of denoising hide it.

    .venv/bin/python bench/images.py [--rounds 9]
"""

from __future__ import annotations

import argparse
import base64
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.tiny_models import write_tiny_stable_diffusion  # noqa: E402

PROMPT = "a lighthouse in a storm, oil painting"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--images", type=int, default=5, help="images per round")
    args = parser.parse_args()

    import diffusers
    import torch

    scratch = Path(tempfile.mkdtemp(prefix="hearth-bench-"))
    models = scratch / "models"
    pipeline_dir = write_tiny_stable_diffusion(models / "tiny-sd")
    (models / "tiny-sd.yaml").write_text(
        "name: tiny-sd\nbackend: diffusers\nmodel: tiny-sd\noptions: {steps: 2}\n"
    )
    local = diffusers.AutoPipelineForText2Image.from_pretrained(
        str(pipeline_dir), use_safetensors=True, local_files_only=True
    )
    local.set_progress_bar_config(disable=True)

    def in_process(seed: int) -> bytes:
        import io

        with torch.inference_mode():
            image = local(
                PROMPT,
                width=64,
                height=64,
                num_inference_steps=2,
                generator=[torch.Generator("cpu").manual_seed(seed)],
            ).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # the backend sends PNG bytes too
        return buffer.getvalue()

    port = free_port()
    log = (scratch / "gateway.log").open("wb")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--port", str(port), "--models-dir", str(models)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    times: dict[str, list[float]] = {"in-process": [], "hearth": []}
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
        deadline = time.monotonic() + 30
        while True:
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

        def through_hearth(seed: int) -> bytes:
            response = http.post(
                "/v1/images/generations",
                json={
                    "model": "tiny-sd",
                    "prompt": PROMPT,
                    "size": "64x64",
                    "seed": seed,
                    "response_format": "b64_json",
                },
            )
            response.raise_for_status()
            return base64.b64decode(response.json()["data"][0]["b64_json"])

        assert in_process(1) == through_hearth(1), "both sides should make the same image"
        for index in range(args.rounds):
            order = ["in-process", "hearth"] if index % 2 == 0 else ["hearth", "in-process"]
            for mode in order:
                make = in_process if mode == "in-process" else through_hearth
                started = time.perf_counter()
                for seed in range(args.images):
                    make(seed)
                times[mode].append((time.perf_counter() - started) / args.images)
    finally:
        gateway.terminate()
        gateway.wait(30)
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"tiny random SD pipeline, 64x64, 2 steps, {torch.get_num_threads()} torch threads, "
          f"{args.rounds} interleaved rounds of {args.images} images, medians")  # fmt: skip
    for mode, values in times.items():
        print(f"  {mode:<11} {statistics.median(values) * 1000:7.1f} ms per image")
    pairs = zip(times["in-process"], times["hearth"], strict=True)
    ratio = statistics.median(i / h for i, h in pairs)
    print(f"  speed ratio (in-process time / hearth time, median of pairs): {ratio:.3f}   "
          "goal >= 0.95")  # fmt: skip


if __name__ == "__main__":
    main()
