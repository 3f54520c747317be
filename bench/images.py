"""What image generation through Hearth costs, next to Diffusers in-process.

A tiny random Stable Diffusion pipeline (the one the tests build; no real text-to-image model is
small enough for PyPI), 64x64, 2 steps, measured in turns: (a) the pipeline in this process,
(b) `POST /v1/images/generations` (b64_json) on a `hearth run` gateway. Prints milliseconds per
image for each and the speed ratio (in-process time / Hearth time). With so small a model the
fixed cost of a request weighs as much as it ever will; a real model's denoising hides it.

    .venv/bin/python bench/images.py [--rounds 9]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import time

from harness import gateway, interleaved, scratch_models  # also puts the project on sys.path

from tests.tiny_models import write_tiny_stable_diffusion

PROMPT = "a lighthouse in a storm, oil painting"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--images", type=int, default=5, help="images per round")
    args = parser.parse_args()

    import diffusers
    import torch

    times: dict[str, list[float]] = {"in-process": [], "hearth": []}
    with scratch_models() as models:
        pipeline_dir = write_tiny_stable_diffusion(models / "tiny-sd")
        (models / "tiny-sd.yaml").write_text(
            "name: tiny-sd\nbackend: diffusers\nmodel: tiny-sd\noptions: {steps: 2}\n"
        )
        local = diffusers.AutoPipelineForText2Image.from_pretrained(
            str(pipeline_dir), use_safetensors=True, local_files_only=True
        )
        local.set_progress_bar_config(disable=True)

        def in_process(seed: int) -> bytes:
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

        with gateway(models) as (http, _):

            def through_hearth(seed: int) -> bytes:
                body = {"model": "tiny-sd", "prompt": PROMPT, "size": "64x64", "seed": seed}
                response = http.post(
                    "/v1/images/generations", json={**body, "response_format": "b64_json"}
                )
                response.raise_for_status()
                return base64.b64decode(response.json()["data"][0]["b64_json"])

            assert in_process(1) == through_hearth(1), "both sides should make the same image"
            for mode in interleaved(args.rounds, ("in-process", "hearth")):
                make = in_process if mode == "in-process" else through_hearth
                started = time.perf_counter()
                for seed in range(args.images):
                    make(seed)
                times[mode].append((time.perf_counter() - started) / args.images)

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
