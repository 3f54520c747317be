"""Image generation through the gateway with a tiny random Stable Diffusion pipeline."""

from __future__ import annotations

import base64
import io
import time

import httpx
import openai
import pytest
from PIL import Image

from gateway.settings import Settings
from tests.conftest import Gateway, wait_until


def pixels(png: bytes) -> tuple[tuple[int, int], bytes]:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image.size, image.convert("RGB").tobytes()


def nearly(a: bytes, b: bytes) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 2


def generate(client: openai.OpenAI, seed: int | None = None, **kwargs: object) -> list[bytes]:
    options: dict[str, object] = {
        "model": "tiny-sd",
        "prompt": "a red fox",
        "response_format": "b64_json",
    }
    if seed is not None:  # an extension: the SDK sends it among the body's extra fields
        options["extra_body"] = {"seed": seed}
    result = client.images.generate(**{**options, **kwargs})  # type: ignore[arg-type]
    assert result.data is not None
    return [base64.b64decode(image.b64_json or "") for image in result.data]


def test_size_and_count(client: openai.OpenAI) -> None:
    images = generate(client, size="64x64", n=2, seed=1)
    assert len(images) == 2
    assert [pixels(png)[0] for png in images] == [(64, 64), (64, 64)]
    (wide,) = generate(client, size="96x64", seed=1)
    assert pixels(wide)[0] == (96, 64)
    (auto,) = generate(client, size="auto", seed=1)
    assert pixels(auto)[0] == (64, 64), "the tiny pipeline's own size"


def test_seeds(client: openai.OpenAI) -> None:
    first = pixels(generate(client, size="64x64", seed=42)[0])[1]
    again = pixels(generate(client, size="64x64", seed=42)[0])[1]
    other = pixels(generate(client, size="64x64", seed=43)[0])[1]
    assert first == again
    assert first != other
    # In a batch, image i has seed + i: the second of seed 42 is the first of seed 43 (up to
    # rounding: batched matrix products add up in another order, off by one level at most).
    batch = generate(client, size="64x64", seed=42, n=2)
    assert nearly(pixels(batch[0])[1], first)
    assert nearly(pixels(batch[1])[1], other)
    assert not nearly(first, other)


def test_extensions_change_the_image(client: openai.OpenAI) -> None:
    plain = pixels(generate(client, size="64x64", seed=5)[0])[1]
    body = {"seed": 5, "negative_prompt": "blurry", "guidance_scale": 3.0, "steps": 3}
    extra = pixels(generate(client, size="64x64", extra_body=body)[0])[1]
    assert extra != plain


def test_url_images_download_and_expire(gateway: Gateway, client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="tiny-sd", prompt="a red fox", size="64x64", extra_body={"seed": 9}
    )
    assert result.data is not None
    url = result.data[0].url
    assert url is not None
    assert url.startswith(f"{gateway.url}/generated/")
    downloaded = httpx.get(url)
    assert downloaded.status_code == 200
    assert downloaded.headers["content-type"] == "image/png"
    (same,) = generate(client, size="64x64", seed=9)
    assert pixels(downloaded.content)[1] == pixels(same)[1]


def test_generated_files_expire(gateway: Gateway) -> None:
    short = Gateway(gateway.models_dir, env={"HEARTH_IMAGE_TTL": "1"}).start()
    try:
        response = httpx.post(
            f"{short.url}/v1/images/generations",
            json={"model": "tiny-sd", "prompt": "a fox", "size": "64x64"},
            timeout=120,
        )
        url = response.json()["data"][0]["url"]
        assert httpx.get(url).status_code == 200
        name = url.rsplit("/", 1)[1]
        files = list(short.runtime_dir.glob(f"generated-*/{name}"))
        assert len(files) == 1
        time.sleep(1.2)
        assert httpx.get(url).status_code == 404
        assert wait_until(lambda: not files[0].exists(), timeout=5), "the sweeper removes it"
    finally:
        short.cleanup()


@pytest.mark.parametrize(
    "path",
    [
        "/generated/nope.png",
        "/generated/..%2F..%2Fetc%2Fpasswd",
        "/generated/%2E%2E%2Fgateway.log",
        "/generated/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.png",
    ],
)
def test_guessed_or_traversing_paths_are_404(http: httpx.Client, path: str) -> None:
    response = http.get(path)
    assert response.status_code == 404
    assert "error" in response.json()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"size": "64x60"}, "size"),
        ({"size": "big"}, "size"),
        ({"size": "0x64"}, "size"),
        ({"size": "512x512"}, "size"),  # over this model's max_size of 256
        ({"response_format": "gif"}, "response_format"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_requests_are_400_and_the_backend_lives_on(
    http: httpx.Client, client: openai.OpenAI, body: dict, param: str
) -> None:
    request = {"model": "tiny-sd", "prompt": "a fox", "size": "64x64", **body}
    response = http.post("/v1/images/generations", json=request)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert len(generate(client, size="64x64")) == 1


def test_a_text_model_cannot_make_images(http: httpx.Client) -> None:
    response = http.post("/v1/images/generations", json={"model": "echo", "prompt": "a fox"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_supported"


def test_a_client_that_gives_up_stops_the_denoising(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    steps = Settings().max_image_steps  # the most a request may ask for
    # The largest size tiny-sd makes, so that the steps outlast the client by far.
    body = {"model": "tiny-sd", "prompt": "a fox", "size": "256x256", "steps": steps, "seed": 3}
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}/v1/images/generations", json=body, timeout=1.5)
    assert wait_until(lambda: "image generation cancelled at step" in gateway.log(), timeout=30)
    line = next(ln for ln in gateway.log().splitlines() if "cancelled at step" in ln)
    step = int(line.split("cancelled at step ")[1].split()[0])
    assert step < steps, line
    assert time.monotonic() - started < 45
    assert len(generate(client, size="64x64")) == 1, "the backend serves the next request"
