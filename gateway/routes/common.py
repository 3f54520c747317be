"""What every route shares: body decoding with OpenAI-shaped errors, ids, streaming."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol, TypeVar

import msgspec
from litestar import Request
from litestar.response import ServerSentEvent

from gateway.auth import check_model
from gateway.client import BackendClient
from gateway.config import ModelConfig, parse_keep_alive, validation_error_field
from gateway.errors import OpenAIError, for_caller, invalid_request
from gateway.lifetime import RequestLife, life_of
from gateway.manager import BackendManager
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Capability

T = TypeVar("T")


# msgspec's words for a value past a Meta bound → OpenAI's error code for it.
_BOUND = re.compile(r"expected `(int|float|str|array)`(?: of length)? ([<>])")
_BOUND_CODES = {
    ("int", "<"): "integer_above_max_value",
    ("int", ">"): "integer_below_min_value",
    ("float", "<"): "decimal_above_max_value",
    ("float", ">"): "decimal_below_min_value",
    ("str", "<"): "string_above_max_length",
    ("array", "<"): "array_above_max_length",
}


def decode_body(body: bytes, kind: type[T]) -> T:
    """The request body as `kind`; malformed JSON or a wrong field is a 400 naming the field."""
    if not body.strip():
        raise invalid_request("the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        param, text = validation_error_field(exc)
        message = f"{param}: {text}" if param else text
        bound = _BOUND.match(text)
        code = _BOUND_CODES.get((bound[1], bound[2])) if bound else None
        raise invalid_request(f"invalid request: {message}", param=param, code=code) from None
    except msgspec.DecodeError as exc:
        raise invalid_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        # msgspec gives up at Python's recursion limit (some hundreds of levels), at once and
        # whatever the depth; shallower nesting is limits.check_depth's to bound.
        raise invalid_request(
            "the request body nests arrays and objects too deeply (HEARTH_MAX_JSON_DEPTH)",
            code="nested_too_deeply",
        ) from None


async def resolve_model(
    request: Request[Any, Any, Any], manager: BackendManager, name: str
) -> ModelConfig:
    """The catalog's model `name` (404 if it has none, or if the request's key may not use
    it), noted as the request's model."""
    config = await manager.registry.resolve(name)
    check_model(config.name)
    life_of(request).model = config.name
    return config


def keep_alive_of(value: str | int | float | None) -> float | None:
    """A request's keep_alive in seconds (math.inf: never), None when it sent none."""
    if value is None:
        return None
    try:
        return parse_keep_alive(value)
    except ValueError as exc:
        raise invalid_request(str(exc), param="keep_alive") from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class ChunkBuilder(Protocol):
    def opening(self) -> list[Any]: ...

    def piece(self, item: pb.GenerateStreamResponse) -> list[Any]: ...


def _event(chunk: Any) -> str:
    return msgspec.json.encode(chunk).decode()


async def stream_text(
    life: RequestLife,
    manager: BackendManager,
    config: ModelConfig,
    request: pb.GenerateRequest,
    chunks: ChunkBuilder,
    keep_alive: float | None = None,
) -> ServerSentEvent:
    """An SSE response for a text generation.

    The first piece is awaited before answering, so a failure before generation starts is an
    ordinary HTTP error; a failure after it is one `data: {"error": ...}` event, then [DONE].
    The slot and the backend's stream belong to the request's `life`: they end with it, even
    if the framework never starts this response (its client left first).
    """

    async def start(
        client: BackendClient,
    ) -> tuple[AsyncGenerator[pb.GenerateStreamResponse], pb.GenerateStreamResponse | None]:
        stream = client.generate_stream(request)
        try:
            return stream, await anext(stream, None)
        except BaseException:
            await stream.aclose()
            raise

    lease, (stream, first) = await manager.open(config, Capability.TEXT, start, keep_alive)
    first_arrived = time.monotonic()
    life.on_end(lease.release)
    life.on_end(stream.aclose)  # closed first: the backend stops generating
    meter = manager.metrics.stream_meter(config.name, life.started)

    async def events() -> AsyncIterator[str]:
        try:
            for chunk in chunks.opening():
                yield _event(chunk)
            item, arrived = first, first_arrived
            while item is not None:
                meter.piece(item, arrived)
                for chunk in chunks.piece(item):
                    yield _event(chunk)
                item = await anext(stream, None)
                arrived = time.monotonic()
        except OpenAIError as exc:
            # Before the slot goes back: a backend that died must be known dead to the
            # requests queued behind this one.
            exc = await manager.failed(lease, exc)
            exc = for_caller(exc, manager.settings.models_dir, manager.runtime_dir)
            yield _event(exc.body())
        lease.release()  # done: the next request need not wait for the last bytes to leave
        yield "[DONE]"

    return ServerSentEvent(events())
