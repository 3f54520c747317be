"""What every route shares: body decoding with OpenAI-shaped errors, ids, streaming."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any, Protocol, TypeVar

import msgspec
from litestar import Request
from litestar.response import ServerSentEvent

from gateway.client import BackendClient
from gateway.config import ModelConfig, parse_keep_alive, validation_error_field
from gateway.errors import OpenAIError, invalid_request
from gateway.manager import BackendManager
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Capability

T = TypeVar("T")


async def unless_client_leaves(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first.

    Cancelling reaches the backend through gRPC and sets its engine call's `cancelled` event, so
    a long image or transcription stops instead of finishing for nobody. (Streams get this from
    the framework, which cancels their generator.)
    """
    job = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if job.done():
            return job.result()
        job.cancel()
        with contextlib.suppress(BaseException):
            await job
        raise OpenAIError(499, "the client closed the request", code="client_closed_request")
    finally:
        watcher.cancel()


def decode_body(body: bytes, kind: type[T]) -> T:
    """The request body as `kind`; malformed JSON or a wrong field is a 400 naming the field."""
    if not body.strip():
        raise invalid_request("the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        param, text = validation_error_field(exc)
        message = f"{param}: {text}" if param else text
        raise invalid_request(f"invalid request: {message}", param=param) from None
    except msgspec.DecodeError as exc:
        raise invalid_request(f"the request body is not valid JSON: {exc}") from None


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
    manager: BackendManager,
    config: ModelConfig,
    request: pb.GenerateRequest,
    chunks: ChunkBuilder,
    keep_alive: float | None = None,
) -> ServerSentEvent:
    """An SSE response for a text generation.

    The first piece is awaited before answering, so a failure before generation starts is an
    ordinary HTTP error; a failure after it is one `data: {"error": ...}` event, then [DONE].
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

    async def events() -> AsyncIterator[str]:
        try:
            for chunk in chunks.opening():
                yield _event(chunk)
            item = first
            while item is not None:
                for chunk in chunks.piece(item):
                    yield _event(chunk)
                item = await anext(stream, None)
        except OpenAIError as exc:
            yield _event(exc.body())
        finally:
            await stream.aclose()
            lease.release()
        yield "[DONE]"

    return ServerSentEvent(events())
