"""/v1/images/generations wire types."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from gateway.schemas.common import INT32_MAX, KeepAlive, Seed

# The settings bound n, steps and the size (gateway/limits.py); these keep values convertible.
_Count = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]


class ImageGenerationRequest(msgspec.Struct):
    prompt: str
    model: str | None = None
    # OpenAI's spec lets these be null, meaning their defaults (set in __post_init__).
    n: _Count | None = 1
    size: str | None = "auto"
    response_format: Literal["url", "b64_json"] | None = "url"
    # Extensions users of local gateways expect.
    seed: Seed | None = None
    steps: _Count | None = None
    num_inference_steps: _Count | None = None
    negative_prompt: str | None = None
    guidance_scale: Annotated[float, msgspec.Meta(ge=0, le=50)] | None = None
    # Ollama's: how long the model stays loaded after this request.
    keep_alive: KeepAlive = None

    def __post_init__(self) -> None:
        if self.n is None:
            self.n = 1
        if self.size is None:
            self.size = "auto"
        if self.response_format is None:
            self.response_format = "url"

    @property
    def count(self) -> int:
        return self.n or 1

    @property
    def side(self) -> str:
        return self.size or "auto"


class Image(msgspec.Struct, omit_defaults=True):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(msgspec.Struct):
    created: int
    data: list[Image]
