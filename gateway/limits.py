"""Bounds on what one request may make the server do: past one, a 400 that names the field.

Each bound is a setting (gateway/settings.py; HEARTH_<NAME> in the environment), and the message
names it, so an operator who meets one knows what to raise. The ranges that protobuf itself sets
(int32, int64) are not here: they are msgspec constraints on the wire types, checked as the body
is decoded. The largest body (max_body_bytes) is the framework's to enforce, before any of this.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.config import ModelConfig
from gateway.errors import OpenAIError, invalid_request
from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.common import INT64_MAX
from gateway.schemas.completions import CompletionRequest
from gateway.schemas.embeddings import EmbeddingRequest
from gateway.schemas.images import ImageGenerationRequest
from gateway.schemas.tokenize import DetokenizeRequest, TokenizeRequest
from gateway.settings import Settings
from gateway.translate.images import size

#: Characters allowed per token when an embedding string is bounded before anyone tokenizes it.
#: Generous: real vocabularies' tokens are rarely longer (runs of spaces or symbols can be), so
#: an input the backend would take is not refused; one far past it is, before it costs anything.
CHARS_PER_TOKEN = 16
#: Choices (`n`) one chat or completion request may ask for.
MAX_CHOICES = 16
#: The side assumed for `size: auto` in the work estimate: the largest default of common
#: pipelines (SDXL's 1024; Stable Diffusion 1.5 makes 512x512, a quarter of the work).
AUTO_IMAGE_SIDE = 1024
#: The steps assumed when neither the request nor the model YAML's `options.steps` sets them:
#: the diffusers backend's own default.
DEFAULT_IMAGE_STEPS = 25
_MEGAPIXEL = 2**20

_SCALARS = frozenset({str, int, float, bool, type(None)})
_NESTING = (msgspec.Struct, list, dict)


def check_chat(body: ChatCompletionRequest, settings: Settings) -> None:
    """Nesting (tool schemas are open-ended JSON), stop sequences, choices."""
    check_depth(body, settings)
    _check_stop(body.stop, settings)
    _check_choices(body.n)


def check_completion(body: CompletionRequest, settings: Settings) -> None:
    _check_stop(body.stop, settings)
    _check_choices(body.n)


def _check_choices(n: int | None) -> None:
    """Each choice is a generation of its own, holding a slot of the model while it runs."""
    if n is not None and n > MAX_CHOICES:
        raise invalid_request(
            f"Invalid 'n': {n} is more choices than this server makes for one request (at most "
            f"{MAX_CHOICES}); send several requests instead",
            param="n",
        )


def check_embeddings(body: EmbeddingRequest, settings: Settings) -> None:
    """The number of inputs, and each one's length: tokens for a token array, characters (at
    CHARS_PER_TOKEN) for a string. The backend counts a string's real tokens against the same
    bound, which the request carries to it as `max_input_tokens`."""
    given = body.input
    if isinstance(given, str):
        items: list[Any] = [given]
    elif given and isinstance(given[0], int):
        items = [given]  # one token array (one that mixes in other things is refused later)
    else:
        items = list(given)
    _check_count("input", len(items), settings, "max_embedding_inputs")
    most_tokens = settings.max_embedding_input_tokens
    most_chars = most_tokens * CHARS_PER_TOKEN
    for index, item in enumerate(items):
        if isinstance(item, str) and len(item) > most_chars:
            raise invalid_request(
                f"Invalid 'input[{index}]': {len(item)} characters is more than this server "
                f"embeds in one input ({most_chars}: {_name('max_embedding_input_tokens')}="
                f"{most_tokens} tokens at up to {CHARS_PER_TOKEN} characters each).",
                param="input",
                code="input_too_long",
            )
        if isinstance(item, list) and len(item) > most_tokens:
            raise invalid_request(
                f"Invalid 'input[{index}]': {len(item)} tokens is more than this server embeds "
                f"in one input ({most_tokens}: {_name('max_embedding_input_tokens')}).",
                param="input",
                code="input_too_long",
            )


def check_images(body: ImageGenerationRequest, config: ModelConfig, settings: Settings) -> None:
    """n, each side, the steps, and the work of them all: n x width x height x steps.

    Where the size is `auto` the pipeline picks it, and the estimate takes AUTO_IMAGE_SIDE;
    where the steps are not given, the model YAML's `options.steps`, else the backend's default.
    """
    if body.count > settings.max_images:
        raise _above("n", body.count, settings, "max_images")
    width, height = size(body.side)
    if max(width, height) > settings.max_image_side:
        raise invalid_request(
            f"Invalid 'size': {body.side} is larger than this server makes: each side at most "
            f"{settings.max_image_side} pixels ({_name('max_image_side')}).",
            param="size",
            code="size_too_large",
        )
    steps_param = "steps" if body.steps is not None else "num_inference_steps"
    steps = body.steps if body.steps is not None else body.num_inference_steps
    if steps is not None and steps > settings.max_image_steps:
        raise _above(steps_param, steps, settings, "max_image_steps")
    if steps is None:
        configured = config.options.get("steps")
        steps = configured if type(configured) is int and configured > 0 else None
    work = (
        body.count
        * (width or AUTO_IMAGE_SIDE)
        * (height or AUTO_IMAGE_SIDE)
        * (steps or DEFAULT_IMAGE_STEPS)
        / _MEGAPIXEL
    )
    if work > settings.max_image_work:
        shown = "auto (counted as 1024x1024)" if body.side == "auto" else body.side
        raise invalid_request(
            f"This request asks for more work than this server does at once: n x width x height "
            f"x steps = {body.count} x {shown} x {steps or DEFAULT_IMAGE_STEPS} is {work:.0f} "
            f"megapixel-steps, and the most is {settings.max_image_work} "
            f"({_name('max_image_work')}). Ask for fewer or smaller images, or fewer steps.",
            param="n" if body.count > 1 else "size",
            code="image_work_too_large",
        )
    # Image i of a batch is made with seed + i, which must still be an int64.
    if body.seed is not None and body.seed > INT64_MAX - (body.count - 1):
        raise invalid_request(
            f"Invalid 'seed': with n={body.count} it must be at most "
            f"{INT64_MAX - (body.count - 1)} "
            "(image i is made with seed + i, a 64-bit integer).",
            param="seed",
            code="integer_above_max_value",
        )


def check_tokenize(body: TokenizeRequest, settings: Settings) -> None:
    if len(body.content) > settings.max_tokenize_chars:
        raise invalid_request(
            f"Invalid 'content': string too long. Expected a string with maximum length "
            f"{settings.max_tokenize_chars}, but got a string with length {len(body.content)} "
            f"instead ({_name('max_tokenize_chars')}).",
            param="content",
            code="string_above_max_length",
        )


def check_detokenize(body: DetokenizeRequest, settings: Settings) -> None:
    """As many tokens as the longest text /v1/tokenize takes has characters: no tokenizer makes
    more tokens than characters."""
    _check_count("tokens", len(body.tokens), settings, "max_tokenize_chars")


def check_depth(body: msgspec.Struct, settings: Settings) -> None:
    """Arrays and objects nested deeper than max_json_depth: a 400.

    Walks the decoded body (a level at a time, so the walk itself never recurses). Only the
    open-ended fields (a tool's JSON Schema, say) can be deep: typed fields have their schema's
    depth, and msgspec refuses anything deeper in them as a wrong type. Nesting past Python's
    recursion limit never gets here: decode_body refuses it (msgspec raises RecursionError).
    """
    limit = settings.max_json_depth
    level: list[Any] = [body]
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            raise invalid_request(
                f"The request body nests arrays and objects more than {limit} deep "
                f"({_name('max_json_depth')}).",
                code="nested_too_deeply",
            )
        below: list[Any] = []
        for value in level:
            if isinstance(value, msgspec.Struct):
                children: Any = msgspec.structs.astuple(value)
            elif isinstance(value, dict):
                children = value.values()
            else:
                children = value
            # A long array of numbers or strings is passed over at C speed.
            if not _SCALARS.issuperset(map(type, children)):
                below.extend(child for child in children if isinstance(child, _NESTING))
        level = below


def _check_stop(stop: str | list[str] | None, settings: Settings) -> None:
    """At most max_stop_sequences of at most max_stop_length characters; empty ones are
    ignored (translate drops them), so they are not counted."""
    if stop is None or isinstance(stop, str):
        stops = [stop] if stop else []
    else:
        stops = [s for s in stop if s]
    _check_count("stop", len(stops), settings, "max_stop_sequences")
    longest = max(map(len, stops), default=0)
    if longest > settings.max_stop_length:
        raise invalid_request(
            f"Invalid 'stop': string too long. Expected a string with maximum length "
            f"{settings.max_stop_length}, but got a string with length {longest} instead "
            f"({_name('max_stop_length')}).",
            param="stop",
            code="string_above_max_length",
        )


def _check_count(param: str, count: int, settings: Settings, setting: str) -> None:
    most = getattr(settings, setting)
    if count > most:
        raise invalid_request(
            f"Invalid '{param}': array too long. Expected an array with maximum length {most}, "
            f"but got an array with length {count} instead ({_name(setting)}).",
            param=param,
            code="array_above_max_length",
        )


def _above(param: str, value: int, settings: Settings, setting: str) -> OpenAIError:
    most = getattr(settings, setting)
    return invalid_request(
        f"Invalid '{param}': integer above maximum value. Expected a value <= {most}, but got "
        f"{value} instead ({_name(setting)}).",
        param=param,
        code="integer_above_max_value",
    )


def _name(setting: str) -> str:
    """The environment variable that sets `setting`."""
    return f"HEARTH_{setting.upper()}"
