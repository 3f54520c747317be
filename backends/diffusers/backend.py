"""Diffusers text-to-image: a local pipeline directory (safetensors only), PNGs back as bytes.

Each image of a request gets its own seed (the request's seed plus its index, or random), so one
image of a batch can be made again alone. A cancelled call stops between denoising steps.
"""

from __future__ import annotations

import io
import logging
import os
import random
import threading
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from backends.runtime import Backend, BackendError, Capability, invalid
from backends.runtime.files import require_safetensors
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Reason

log = logging.getLogger("hearth.backend.diffusers")

# Models are local directories: never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_DTYPES = ("float32", "bfloat16", "float16")


class _Cancelled(Exception):
    pass


class DiffusersBackend(Backend):
    """One text-to-image pipeline."""

    name = "diffusers"
    adjustable_threads = True  # torch.set_num_threads between denoising steps

    def __init__(self) -> None:
        self.pipeline: Any = None
        self.steps = 25
        self.guidance_scale: float | None = None
        self.max_size = 1024
        self.default_size = 512

    def load(self, request: pb.LoadRequest) -> pb.LoadResponse:
        import diffusers
        import torch
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        path = Path(request.model_path)
        if not request.model_path:
            raise invalid("model_missing", "the model YAML names no pipeline directory")
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"no diffusers pipeline (model_index.json) in {path}")
        require_safetensors(path)
        options = json_format.MessageToDict(request.options)
        dtype_name = str(options.get("dtype", "float32"))
        if dtype_name not in _DTYPES:
            raise invalid("invalid_option", f"options.dtype must be one of {', '.join(_DTYPES)}")
        if request.threads:
            torch.set_num_threads(request.threads)
        self.threads.loaded = torch.get_num_threads()
        loader: Any = diffusers.AutoPipelineForText2Image
        if options.get("pipeline"):
            loader = getattr(diffusers, str(options["pipeline"]), None)
            if loader is None or not hasattr(loader, "from_pretrained"):
                raise invalid(
                    "invalid_option", f"diffusers has no pipeline class {options['pipeline']!r}"
                )
        try:
            pipeline = loader.from_pretrained(
                str(path),
                torch_dtype=getattr(torch, dtype_name),
                use_safetensors=True,
                local_files_only=True,
            )
        except (OSError, ValueError) as exc:
            raise invalid("invalid_model", f"diffusers cannot load {path.name}: {exc}") from None
        if options.get("scheduler"):
            scheduler = getattr(diffusers, str(options["scheduler"]), None)
            if scheduler is None or not hasattr(scheduler, "from_config"):
                raise invalid(
                    "invalid_option", f"diffusers has no scheduler {options['scheduler']!r}"
                )
            pipeline.scheduler = scheduler.from_config(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline.to(str(options.get("device", "cpu")))
        self.steps = int(options.get("steps", 25))
        guidance = options.get("guidance_scale")
        self.guidance_scale = float(guidance) if guidance is not None else None
        unet = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
        sample = getattr(getattr(unet, "config", None), "sample_size", None)
        scale = getattr(pipeline, "vae_scale_factor", 8)
        if isinstance(sample, int):
            self.default_size = sample * scale
        self.max_size = int(options.get("max_size", max(1024, self.default_size)))
        log.info(
            "loaded %s (%s, %s, %s, default %dx%d, %d steps)",
            path.name,
            type(pipeline).__name__,
            type(pipeline.scheduler).__name__,
            dtype_name,
            self.default_size,
            self.default_size,
            self.steps,
        )
        return pb.LoadResponse()

    def apply_threads(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)

    def unload(self) -> None:
        self.pipeline = None

    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.IMAGES})

    def generate_image(
        self, request: pb.GenerateImageRequest, cancelled: threading.Event
    ) -> pb.GenerateImageResponse:
        import torch

        width = request.width or self.default_size
        height = request.height or self.default_size
        if max(width, height) > self.max_size:
            raise invalid(
                "size_too_large",
                f"this model makes images up to {self.max_size}x{self.max_size}",
                param="size",
            )
        count = request.n or 1
        first = request.seed if request.HasField("seed") else random.getrandbits(31)
        seeds = [first + index for index in range(count)]
        steps = request.steps if request.HasField("steps") else self.steps

        def watch(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            if cancelled.is_set():
                raise _Cancelled(step)
            self.follow_threads()
            return tensors

        options: dict[str, Any] = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or None,
            "width": width,
            "height": height,
            "num_inference_steps": steps,
            "num_images_per_prompt": count,
            "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            "callback_on_step_end": watch,
        }
        guidance = request.guidance_scale if request.HasField("guidance_scale") else None
        guidance = guidance if guidance is not None else self.guidance_scale
        if guidance is not None:
            options["guidance_scale"] = guidance
        self.follow_threads()
        try:
            with torch.inference_mode():
                images = self.pipeline(**options).images
        except _Cancelled as stop:
            log.info("image generation cancelled at step %s of %d", stop.args[0], steps)
            raise BackendError(grpc.StatusCode.CANCELLED, Reason.CANCELLED, "cancelled") from None
        response = pb.GenerateImageResponse()
        for image, seed in zip(images, seeds, strict=True):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            response.images.append(pb.GeneratedImage(png=buffer.getvalue(), seed=seed))
        return response
