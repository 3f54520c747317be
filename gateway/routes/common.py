"""What every route shares: body decoding with OpenAI-shaped errors, ids, streaming."""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec
from litestar import Request
from litestar.di import NamedDependency
from litestar.response import ServerSentEvent

from gateway import identity
from gateway.auth import check_model
from gateway.client import BackendClient
from gateway.config import (
    BUILTIN_BACKENDS,
    ModelConfig,
    parse_keep_alive,
    validation_error_field,
)
from gateway.errors import OpenAIError, for_caller, invalid_request
from gateway.lifetime import RequestLife, life_of
from gateway.manager import BackendManager
from gateway.manager.admission import Lease
from gateway.translate import text
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
        # Lax, as OpenAI's own validation is: `n: 4.0` is 4, `"stream": "true"` is true.
        return msgspec.json.decode(body, type=kind, strict=False)
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
    request: Request[Any, Any, Any], manager: NamedDependency[BackendManager], name: str
) -> ModelConfig:
    """The catalog's model `name` (404 if it has none, or if the request's key may not use
    it), noted as the request's model."""
    config = await manager.registry.resolve(name)
    check_model(config.name)
    life_of(request).model = config.name
    return config


async def models_of(manager: BackendManager, kind: str) -> list[str]:
    """The catalog's models of `kind` (ModelConfig.kind) that the request's key may use."""
    catalog = await manager.registry.current()
    caller = identity.caller.get()
    return sorted(
        name for name, c in catalog.models.items() if c.kind() == kind and caller.may_use(name)
    )


async def only_model(manager: BackendManager, kinds: Sequence[str], what: str) -> str:
    """The model of a request that names none: the one model of the first of `kinds` the
    key has any of; with several, or none, the client must say (`what`: "an image model")."""
    for kind in kinds:
        names = await models_of(manager, kind)
        if len(names) == 1:
            return names[0]
        if names:
            raise invalid_request(
                f"model is required here: name one of {', '.join(names)}", param="model"
            )
    raise invalid_request(f"model is required here: name {what} (none is installed)", param="model")


def require_kind(config: ModelConfig, kinds: Collection[str], what: str) -> None:
    """A 400, before anything loads, when a built-in backend's model is of none of `kinds`
    (echo serves everything; a custom backend says what it serves only once loaded)."""
    builtin = config.backend in BUILTIN_BACKENDS and config.backend != "echo"
    if builtin and config.kind() not in kinds:
        raise invalid_request(
            f"the model '{config.name}' is a {config.kind()} model: it does not do {what}",
            param="model",
            code="model_not_supported",
        )


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
    def opening(self, n: int) -> list[Any]: ...

    def piece(self, item: pb.GenerateStreamResponse, index: int = 0) -> list[Any]: ...

    def closing(self, total: pb.Usage) -> list[Any]: ...


def _event(chunk: Any) -> str:
    return msgspec.json.encode(chunk).decode()


@dataclass
class OpenedStream:
    """One generation's backend stream, its slot, its first piece, and when (time.monotonic())
    the call began (the slot taken, the model loaded) and that piece arrived."""

    lease: Lease
    stream: AsyncGenerator[pb.GenerateStreamResponse]
    first: pb.GenerateStreamResponse | None
    arrived: float
    called: float


async def stream_text(
    life: RequestLife,
    manager: NamedDependency[BackendManager],
    config: ModelConfig,
    requests: list[pb.GenerateRequest],
    chunks: ChunkBuilder,
    keep_alive: float | None = None,
    *,
    failure: Callable[[OpenAIError], list[Any]] | None = None,
    done: bool = True,
) -> ServerSentEvent:
    """An SSE response for a text generation: one backend stream per choice (`n`).

    The first piece of each is awaited before answering, so a failure before generation starts
    is an ordinary HTTP error; a failure after it is one `data: {"error": ...}` event (or the
    events `failure` makes of it), then [DONE] (unless not `done`: the Responses API ends with
    its own last event). The slots and the backend's streams belong to the request's `life`:
    they end with it, even if the framework never starts this response (its client left first).
    """
    # The first choice's stream opens before answering; the others open as the answer goes
    # (each waits for a slot of its own, which the first may be holding).
    first = await open_stream(life, manager, config, requests[0], keep_alive)
    opened: list[OpenedStream | None] = [first] + [None] * (len(requests) - 1)
    meters = [manager.metrics.stream_meter(config.name, life.started) for _ in requests]

    async def open_later(index: int) -> OpenedStream:
        one = await open_stream(life, manager, config, requests[index], keep_alive)
        opened[index] = one
        return one

    async def events() -> AsyncIterator[str]:
        usages: dict[int, pb.Usage] = {}
        try:
            for chunk in chunks.opening(len(requests)):
                yield _event(chunk)
            later: list[Callable[[], Awaitable[OpenedStream]]] = [
                functools.partial(open_later, i) for i in range(1, len(requests))
            ]
            async for index, item, arrived in _merged(first, later):
                meters[index].piece(item, arrived)
                if item.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    usages[index] = item.usage
                for chunk in chunks.piece(item, index):
                    yield _event(chunk)
            if usages:
                for chunk in chunks.closing(text.total_usage(list(usages.values()))):
                    yield _event(chunk)
        except _Failed as failed:
            exc = failed.error
            failing = opened[failed.index]
            if failing is not None:
                # Before the slot goes back: a backend that died must be known dead to the
                # requests queued behind this one.
                exc = await manager.failed(failing.lease, exc)
            exc = for_caller(exc, manager.settings.models_dir, manager.runtime_dir)
            for chunk in failure(exc) if failure is not None else [exc.body()]:
                yield _event(chunk)
        for one in opened:
            if one is not None:
                one.lease.release()  # done: the next request need not wait for the last bytes
        if done:
            yield "[DONE]"

    return ServerSentEvent(events())


async def open_stream(
    life: RequestLife,
    manager: NamedDependency[BackendManager],
    config: ModelConfig,
    request: pb.GenerateRequest,
    keep_alive: float | None,
) -> OpenedStream:
    """One generation's backend stream, opened once its first piece is in; its slot and the
    stream end with the request's `life`."""
    called = 0.0

    async def start(
        client: BackendClient,
    ) -> tuple[AsyncGenerator[pb.GenerateStreamResponse], pb.GenerateStreamResponse | None]:
        nonlocal called
        called = time.monotonic()
        stream = client.generate_stream(request)
        try:
            return stream, await anext(stream, None)
        except BaseException:
            await stream.aclose()
            raise

    lease, (stream, first) = await manager.open(config, Capability.TEXT, start, keep_alive)
    life.on_end(lease.release)
    life.on_end(stream.aclose)  # closed first: the backend stops generating
    return OpenedStream(lease, stream, first, time.monotonic(), called)


class _Failed(Exception):
    """A choice's backend stream failed with an error for the client."""

    def __init__(self, index: int, error: OpenAIError) -> None:
        super().__init__(error)
        self.index, self.error = index, error


async def _merged(
    first: OpenedStream, later: list[Callable[[], Awaitable[OpenedStream]]]
) -> AsyncIterator[tuple[int, pb.GenerateStreamResponse, float]]:
    """The pieces of every choice's stream as they come, with the choice's index: the first,
    already open, and those `later` opens; a stream's error for the client raises `_Failed`."""
    if not later:  # one choice, the usual case: no task or queue in between
        item, arrived = first.first, first.arrived
        try:
            while item is not None:
                yield 0, item, arrived
                item = await anext(first.stream, None)
                arrived = time.monotonic()
        except OpenAIError as exc:
            raise _Failed(0, exc) from exc
        return
    queue: asyncio.Queue[tuple[int, Any, float]] = asyncio.Queue()

    async def pump(
        index: int, opening: Callable[[], Awaitable[OpenedStream]] | OpenedStream
    ) -> None:
        try:
            one = opening if isinstance(opening, OpenedStream) else await opening()
            item = one.first
            while item is not None:
                await queue.put((index, item, time.monotonic()))
                item = await anext(one.stream, None)
        except OpenAIError as exc:  # handed on: the response tells the client
            await queue.put((index, exc, 0.0))
            return
        # Its slot goes back now: a choice still waiting for one may be waiting for this one.
        one.lease.release()
        await queue.put((index, None, 0.0))

    openings: list[Callable[[], Awaitable[OpenedStream]] | OpenedStream] = [first, *later]
    pumps = [asyncio.create_task(pump(i, o)) for i, o in enumerate(openings)]
    try:
        running = len(pumps)
        while running:
            index, item, arrived = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, OpenAIError):
                raise _Failed(index, item)
            else:
                yield index, item, arrived
    finally:
        for task in pumps:
            task.cancel()


async def generate_all(
    manager: NamedDependency[BackendManager],
    config: ModelConfig,
    requests: list[pb.GenerateRequest],
    keep_alive: float | None,
) -> list[pb.GenerateResponse]:
    """Every choice's answer, generated at once (a model that batches computes them together);
    the first failure is the request's."""

    async def one(request: pb.GenerateRequest) -> pb.GenerateResponse:
        return await manager.call(
            config, Capability.TEXT, lambda client: client.generate(request), keep_alive
        )

    results = await asyncio.gather(*(one(r) for r in requests), return_exceptions=True)
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        raise failure
    responses = [r for r in results if isinstance(r, pb.GenerateResponse)]
    total = text.total_usage([r.usage for r in responses])
    manager.metrics.tokens_used(config.name, total.prompt_tokens, total.completion_tokens)
    return responses
