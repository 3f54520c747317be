"""Ollama's API (/api/chat, /api/generate, /api/embed, /api/tags, ...) over the same models.

Home-server clients that speak only Ollama (Home Assistant, Open WebUI's Ollama connection,
editor plugins, the `ollama` Python client) work unchanged: requests are translated into the
gateway's own (translate/ollama.py) and served by the same machinery as /v1; answers stream as
NDJSON (Ollama streams unless told not to), and errors have Ollama's shape, `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

import msgspec
from litestar import Controller, HttpMethod, Request, Response, get, head, post, route
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.response import Stream

from gateway import identity, limits
from gateway.client import BackendClient
from gateway.config import ModelConfig
from gateway.errors import (
    OpenAIError,
    for_caller,
    handle_http_exception,
    handle_openai_error,
    handle_unexpected,
    invalid_request,
)
from gateway.lifetime import life_of
from gateway.manager import BackendManager
from gateway.model_facts import ModelFacts, model_facts
from gateway.routes.common import decode_body, keep_alive_of, open_stream, resolve_model
from gateway.schemas import ollama
from gateway.schemas.completions import CompletionRequest
from gateway.schemas.embeddings import EmbeddingRequest
from gateway.translate import embeddings, text
from gateway.translate import ollama as translate
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Capability

NDJSON = "application/x-ndjson"
#: The kinds of model Ollama's API can use (not speech, images or rerankers): the others are
#: left out of its listings.
_OLLAMA_KINDS = frozenset({"chat", "embeddings"})
#: Where a model never unloads, /api/ps says it expires this far ahead (as Ollama says a date
#: centuries away).
_FOREVER_SECONDS = 100 * 365 * 86400.0
_PARAMETER_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "max_tokens": "num_predict",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
}


# Errors: the gateway's one error path (for_caller, Retry-After, request ids), in Ollama's shape.


def _reshaped(response: Response[Any]) -> Response[Any]:
    """An OpenAI-shaped error answer as Ollama's `{"error": "message"}`: the field at fault,
    which OpenAI's shape gives apart, named in the message."""
    error = response.content["error"]
    message, param = error["message"], error.get("param")
    if param and param not in message:
        message = f"{param}: {message}"
    return Response({"error": message}, status_code=response.status_code, headers=response.headers)


def _openai_error(request: Request[Any, Any, Any], exc: OpenAIError) -> Response[Any]:
    return _reshaped(handle_openai_error(request, exc))


def _http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return _reshaped(handle_http_exception(request, exc))


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    return _reshaped(handle_unexpected(request, exc))


def on_ollama_paths(handlers: dict[int | type[Exception], Any]) -> dict[int | type[Exception], Any]:
    """The app's error handlers, answering in Ollama's shape under /api/ also where no route
    matched (a wrong method, an unknown /api path): Ollama's clients read only that shape."""

    def shaped(handler: Any) -> Any:
        def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
            response = handler(request, exc)
            return _reshaped(response) if request.url.path.startswith("/api/") else response

        return handle

    return {kind: shaped(handler) for kind, handler in handlers.items()}


def ollama_name(name: str, names: Collection[str] = ()) -> str:
    """A catalog name as Ollama lists it: with a tag (`:latest` where it has none, unless the
    catalog's `names` has a model of that name too: then as it is)."""
    if ":" in name or f"{name}:latest" in names:
        return name
    return f"{name}:latest"


async def _resolve(
    request: Request[Any, Any, Any], manager: NamedDependency[BackendManager], name: str
) -> ModelConfig:
    """The catalog's model for an Ollama name: `x:latest` is `x` (and `x` is `x:latest`)."""
    candidates = [name]
    if name.endswith(":latest"):
        candidates.append(name.removesuffix(":latest"))
    elif ":" not in name:
        candidates.append(f"{name}:latest")
    for candidate in candidates:
        try:
            return await resolve_model(request, manager, candidate)
        except OpenAIError as exc:
            if exc.status != 404:
                raise
    raise OpenAIError(404, f"model '{name}' not found", param="model", code="model_not_found")


async def _load(
    manager: NamedDependency[BackendManager],
    config: ModelConfig,
    capability: Capability,
    keep_alive: float | None,
) -> str:
    """Ollama's load call (a request with nothing to generate): the model loaded, or with
    keep_alive 0 told to unload once idle (a model not loaded is not loaded for that). Returns
    Ollama's done_reason for it."""
    unload = keep_alive == 0
    if unload and manager.host(config).name not in manager.loaded():
        return "unload"
    (await manager.acquire(config, capability, keep_alive)).release()
    return "unload" if unload else "load"


async def _answer(
    request: Request[Any, Any, Any],
    manager: NamedDependency[BackendManager],
    config: ModelConfig,
    generate: pb.GenerateRequest,
    keep_alive: float | None,
    answer: translate.Answer,
    stream: bool,
) -> Response[Any]:
    """One generation, streamed as NDJSON or answered whole.

    Either way it is the backend's stream, opened (its first piece in) before answering: a
    failure before generation starts is an ordinary error answer; one after it, in a stream
    already begun, is its last line, `{"error": ...}`, as Ollama sends it. The slot and the
    backend's stream end with the request, as on /v1.
    """
    life = life_of(request)
    opened = await open_stream(life, manager, config, generate, keep_alive)
    times = translate.Timings(started=life.started, called=opened.called, first=opened.arrived)
    meter = manager.metrics.stream_meter(config.name, life.started)

    async def pieces() -> AsyncIterator[Any]:
        item, arrived = opened.first, opened.arrived
        finished = False
        try:
            while item is not None:
                meter.piece(item, arrived)
                piece = answer.piece(item)
                if piece is not None:
                    yield piece
                if item.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    finished, times.last = True, arrived
                    opened.lease.release()  # the next request need not wait for the last bytes
                    yield answer.final(item, times)
                item = await anext(opened.stream, None)
                arrived = time.monotonic()
        except OpenAIError as exc:
            # Settled before the slot goes back: a backend that died must be known dead to the
            # requests queued behind this one.
            raise await manager.failed(opened.lease, exc) from None
        opened.lease.release()
        if not finished:  # the contract's last message says why it ended; a client waits for it
            raise OpenAIError(
                502,
                f"the backend for model '{config.name}' ended its answer without finishing it",
                code="backend_error",
            )

    if stream:

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for piece in pieces():
                    yield msgspec.json.encode(piece) + b"\n"
            except OpenAIError as exc:
                shown = for_caller(exc, manager.settings.models_dir, manager.runtime_dir)
                yield msgspec.json.encode({"error": shown.message}) + b"\n"

        return Stream(lines(), media_type=NDJSON)
    whole = None
    async for piece in pieces():
        whole = piece
    return Response(whole)


def _details(facts: ModelFacts) -> ollama.ModelDetails:
    return ollama.ModelDetails(
        format=facts.format,
        family=facts.family,
        families=facts.families,
        parameter_size=facts.parameter_size,
        quantization_level=facts.quantization_level,
    )


def _parameters(config: ModelConfig) -> str:
    """The model YAML's request defaults as Ollama's `parameters` text (Modelfile names)."""
    lines = []
    defaults = msgspec.structs.asdict(config.parameters)
    for field, name in _PARAMETER_NAMES.items():
        value = defaults.get(field)
        if value is not None:
            lines.append(f"{name:<30} {value}")
    for stop in config.parameters.stop or []:
        lines.append(f"{'stop':<30} {msgspec.json.encode(stop).decode()}")
    if config.context_size:
        lines.append(f"{'num_ctx':<30} {config.context_size}")
    return "\n".join(lines)


def _capabilities(config: ModelConfig) -> list[str]:
    if config.embeddings:
        return ["embedding"]
    if config.kind() not in _OLLAMA_KINDS:
        return []
    # Every chat model takes tools: a template without them gets them described (hermes).
    return ["completion", "tools"]


class OllamaController(Controller):
    """Ollama's routes; their errors in Ollama's shape."""

    path = "/"
    exception_handlers = {
        OpenAIError: _openai_error,
        HTTPException: _http_exception,
        Exception: _unexpected,
    }

    @route(
        ["/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"],
        http_method=[HttpMethod.POST, HttpMethod.DELETE],
        status_code=200,
    )
    async def manage(self, request: Request[Any, Any, Any]) -> None:
        """Ollama's model management: Hearth's is its gallery, for admins."""
        raise OpenAIError(
            404,
            f"{request.url.path} is not supported: Hearth's models are files and YAML in its "
            "models dir; install them with `hearth models install` or POST /models/apply (an "
            "admin key), remove them with DELETE /models/{name}",
            code="not_supported",
        )

    @get("/api/version")
    async def version(self) -> ollama.VersionResponse:
        return ollama.VersionResponse(translate.OLLAMA_VERSION)

    @head("/api/version")
    async def version_head(self) -> None:
        return None

    @get("/api/tags")
    async def list_models(self, manager: NamedDependency[BackendManager]) -> ollama.ListResponse:
        """The models Ollama's API can use (not speech or image models), with what their
        files say they are."""
        caller = identity.caller.get()
        models = (await manager.registry.current()).models.values()
        listed = sorted(
            (c for c in models if c.kind() in _OLLAMA_KINDS and caller.may_use(c.name)),
            key=lambda c: c.name,
        )
        models_dir = manager.settings.models_dir
        names = {c.name for c in listed}
        facts = await asyncio.to_thread(lambda: [model_facts(c, models_dir) for c in listed])
        return ollama.ListResponse(
            [
                ollama.ListModel(
                    name=ollama_name(config.name, names),
                    model=ollama_name(config.name, names),
                    modified_at=translate.timestamp(fact.modified),
                    size=fact.size,
                    digest=fact.digest,
                    details=_details(fact),
                )
                for config, fact in zip(listed, facts, strict=True)
            ]
        )

    @get("/api/ps")
    async def ps(self, manager: NamedDependency[BackendManager]) -> ollama.ProcessResponse:
        """The models loaded now: their memory, and when they unload if nothing uses them."""
        caller = identity.caller.get()
        loaded = [
            instance
            for name, instance in sorted(manager.loaded().items())
            if instance.config.kind() in _OLLAMA_KINDS and caller.may_use(name)
        ]
        models_dir = manager.settings.models_dir
        facts = await asyncio.to_thread(lambda: [model_facts(i.config, models_dir) for i in loaded])
        now_wall, now = time.time(), time.monotonic()
        rows = []
        for instance, fact in zip(loaded, facts, strict=True):
            # Idle: its keep_alive counts from its last request; busy: from now at the least.
            since = now_wall - (now - instance.last_used) if instance.slots.idle else now_wall
            keep = instance.keep_alive
            expires = since + keep if math.isfinite(keep) else now_wall + _FOREVER_SECONDS
            name = ollama_name(instance.config.name)
            rows.append(
                ollama.ProcessModel(
                    name=name,
                    model=name,
                    size=instance.rss or instance.footprint.bytes,
                    digest=fact.digest,
                    details=_details(fact),
                    expires_at=translate.timestamp(expires),
                    size_vram=0,
                    context_length=instance.config.context_size or 0,
                )
            )
        return ollama.ProcessResponse(rows)

    @post("/api/show", status_code=200)
    async def show(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> ollama.ShowResponse:
        body = decode_body(await request.body(), ollama.ShowRequest)
        name = body.model or body.name
        if not name:
            raise invalid_request("model is required", param="model")
        config = await _resolve(request, manager, name)
        fact = await asyncio.to_thread(model_facts, config, manager.settings.models_dir)
        source = Path(config.source).name  # not its folder: the server's own paths stay private
        modelfile = [f"# What Hearth serves as {ollama_name(config.name)} ({source})"]
        modelfile.append(f"FROM {config.model or config.backend}")
        if config.system_prompt:
            modelfile.append(f"SYSTEM {msgspec.json.encode(config.system_prompt).decode()}")
        parameters = _parameters(config)
        modelfile += [f"PARAMETER {line}" for line in parameters.splitlines()]
        return ollama.ShowResponse(
            modelfile="\n".join(modelfile) + "\n",
            parameters=parameters,
            template=config.chat_template or fact.template,
            system=config.system_prompt or "",
            details=_details(fact),
            model_info=fact.info,
            capabilities=_capabilities(config),
            modified_at=translate.timestamp(fact.modified),
        )

    @post("/api/chat", status_code=200)
    async def chat(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> Response[Any]:
        body = decode_body(await request.body(), ollama.ChatRequest)
        limits.check_depth(body, manager.settings)
        config = await _resolve(request, manager, body.model)
        keep_alive = keep_alive_of(body.keep_alive)
        if not body.messages:
            reason = await _load(manager, config, Capability.TEXT, keep_alive)
            message = ollama.ResponseMessage("assistant", "")
            return Response(
                ollama.ChatResponse(
                    body.model, translate.timestamp(), message, done=True, done_reason=reason
                )
            )
        chat = translate.chat_request(body)
        limits.check_chat(chat, manager.settings)
        generate = text.chat_request(chat, config)
        stream = body.stream is not False
        answer = translate.ChatAnswer(body.model, whole=not stream)
        return await _answer(request, manager, config, generate, keep_alive, answer, stream)

    @post("/api/generate", status_code=200)
    async def generate(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> Response[Any]:
        body = decode_body(await request.body(), ollama.GenerateRequest)
        limits.check_depth(body, manager.settings)
        config = await _resolve(request, manager, body.model)
        keep_alive = keep_alive_of(body.keep_alive)
        if not body.prompt and not body.suffix and not body.images:
            reason = await _load(manager, config, Capability.TEXT, keep_alive)
            return Response(
                ollama.GenerateResponse(
                    body.model, translate.timestamp(), "", done=True, done_reason=reason
                )
            )
        wire = translate.generate_request(body)
        if isinstance(wire, CompletionRequest):
            limits.check_completion(wire, manager.settings)
            generate = translate.raw_generate_request(wire, body.format, config)
        else:
            limits.check_chat(wire, manager.settings)
            generate = text.chat_request(wire, config)
        stream = body.stream is not False
        answer = translate.GenerateAnswer(body.model, whole=not stream)
        return await _answer(request, manager, config, generate, keep_alive, answer, stream)

    @post("/api/embed", status_code=200)
    async def embed(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> ollama.EmbedResponse:
        body = decode_body(await request.body(), ollama.EmbedRequest)
        config = await _resolve(request, manager, body.model)
        keep_alive = keep_alive_of(body.keep_alive)
        inputs = translate.embed_inputs(body.input)
        if not inputs:
            await _load(manager, config, Capability.EMBEDDINGS, keep_alive)
            return ollama.EmbedResponse(body.model, [])
        response, times = await _embed(request, manager, config, inputs, keep_alive)
        vectors = [
            translate.shortened(list(e.values), body.dimensions) for e in response.embeddings
        ]
        return ollama.EmbedResponse(
            body.model,
            vectors,
            total_duration=round((time.monotonic() - times.started) * 1e9),
            load_duration=round((times.called - times.started) * 1e9),
            prompt_eval_count=response.prompt_tokens,
        )

    @post("/api/embeddings", status_code=200)
    async def embeddings(
        self, request: Request[Any, Any, Any], manager: NamedDependency[BackendManager]
    ) -> ollama.EmbeddingsResponse:
        """The legacy route: one prompt, one vector."""
        body = decode_body(await request.body(), ollama.EmbeddingsRequest)
        config = await _resolve(request, manager, body.model)
        keep_alive = keep_alive_of(body.keep_alive)
        if not body.prompt:
            await _load(manager, config, Capability.EMBEDDINGS, keep_alive)
            return ollama.EmbeddingsResponse([])
        response, _ = await _embed(request, manager, config, [body.prompt], keep_alive)
        return ollama.EmbeddingsResponse(list(response.embeddings[0].values))


async def _embed(
    request: Request[Any, Any, Any],
    manager: NamedDependency[BackendManager],
    config: ModelConfig,
    inputs: list[str],
    keep_alive: float | None,
) -> tuple[pb.EmbedResponse, translate.Timings]:
    """Embeddings of `inputs`, within the same limits as /v1/embeddings, and when the call
    began (the model loaded) for the figures."""
    wire = EmbeddingRequest(model=config.name, input=list(inputs))
    limits.check_embeddings(wire, manager.settings)
    embed = embeddings.embed_request(wire, manager.settings.max_embedding_input_tokens)
    started = life_of(request).started
    times = translate.Timings(started=started, called=started, first=started)

    async def call(client: BackendClient) -> pb.EmbedResponse:
        times.called = time.monotonic()
        return await client.embed(embed)

    response = await manager.call(config, Capability.EMBEDDINGS, call, keep_alive)
    manager.metrics.tokens_used(config.name, response.prompt_tokens, 0)
    return response, times
