"""Image requests to GenerateImageRequest."""

from __future__ import annotations

import re

from gateway.errors import invalid_request
from gateway.schemas.images import ImageGenerationRequest
from protos.hearth.backend.v1 import backend_pb2 as pb

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def size(text: str) -> tuple[int, int]:
    """'512x768' → (512, 768); 'auto' → (0, 0), the model's own size."""
    if text == "auto":
        return 0, 0
    match = _SIZE.match(text)
    if not match:
        raise invalid_request("size must be 'auto' or WIDTHxHEIGHT, like 512x512", param="size")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise invalid_request(
            "width and height must be positive multiples of 8, like 512x512", param="size"
        )
    return width, height


def generate_image_request(request: ImageGenerationRequest) -> pb.GenerateImageRequest:
    if not request.prompt.strip():
        raise invalid_request("prompt must not be empty", param="prompt")
    width, height = size(request.side)
    call = pb.GenerateImageRequest(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or "",
        width=width,
        height=height,
        n=request.count,
    )
    steps = request.steps if request.steps is not None else request.num_inference_steps
    if steps is not None:
        call.steps = steps
    if request.guidance_scale is not None:
        call.guidance_scale = request.guidance_scale
    if request.seed is not None:
        call.seed = request.seed
    return call
