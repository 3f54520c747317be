"""The process around a Backend: gRPC server, health, signals, parent-death watch.

Every backend's `__main__` is one line: `run(MyBackend())`. Engine calls run in worker threads;
the event loop only moves messages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import hmac
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from backends.runtime.backend import Backend
from backends.runtime.batching import CONCURRENT_CALLS, EmbedBatcher
from backends.runtime.errors import BackendError, invalid
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1 import backend_pb2_grpc as pb_grpc
from protos.hearth.backend.v1.contract import (
    AUTHORIZATION_KEY,
    AUTHORIZATION_SCHEME,
    MAX_MESSAGE_BYTES,
    REASON_KEY,
    STARTED_KEY,
    TOKEN_FILE_ENV,
    Capability,
    Reason,
    is_loopback_address,
)

log = logging.getLogger("hearth.backend")

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
#: Seconds in-flight calls get to finish after SIGTERM.
STOP_GRACE_SECONDS = 5.0
#: The longest SetThreads waits for the engine's next step to apply a new thread count.
SET_THREADS_WAIT_SECONDS = 1.0
_PARENT_POLL_SECONDS = 1.0
#: Stack of each engine thread (the default of most Linux systems, made explicit: a container's
#: or a musl libc's default can be far smaller).
ENGINE_STACK_BYTES = 8 * 1024 * 1024

Request = TypeVar("Request")
Response = TypeVar("Response")
_DONE = object()
_STARTED = ((STARTED_KEY, "1"),)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Runtime:
    """State shared by the servicers: the backend, its load state, and health."""

    def __init__(self, backend: Backend, health_servicer: Any) -> None:
        self.backend = backend
        # Engine calls run on a fixed set of threads (by default one): engines keep per-thread
        # state (an OpenMP team in torch), and a new calling thread per call costs them dearly.
        # A stack of known size: engines recurse in C (llama.cpp's grammar parser, about 440
        # bytes a level; the llama backend's schema check keeps it far below this).
        threading.stack_size(ENGINE_STACK_BYTES)
        self.engine = ThreadPoolExecutor(backend.engine_threads, thread_name_prefix="engine")
        self.health = health_servicer
        self.state = pb.MODEL_STATE_UNLOADED
        self.model_name = ""
        self.load_response = pb.LoadResponse()
        self.load_lock = asyncio.Lock()
        self.serving: frozenset[Capability] = frozenset()
        #: Gathers concurrent Embed calls, where the backend batches them (see batching.py).
        self.embed_batcher: EmbedBatcher | None = None

    async def publish_health(self) -> None:
        """SERVING for what the loaded model serves, NOT_SERVING for the rest it implements."""
        for capability in self.backend.implemented():
            up = capability in self.serving
            status = health_pb2.HealthCheckResponse.SERVING
            if not up:
                status = health_pb2.HealthCheckResponse.NOT_SERVING
            await self.health.set(capability.value, status)

    async def run(self, fn: Callable[..., Response], *args: Any) -> Response:
        """`fn(*args)` on an engine thread."""
        return await asyncio.get_running_loop().run_in_executor(self.engine, fn, *args)

    async def check(
        self, context: grpc.aio.ServicerContext, capability: Capability, *, mark: bool = True
    ) -> None:
        """Refuse a call the loaded model cannot serve; else (`mark`) say that it has begun."""
        if self.state != pb.MODEL_STATE_READY:
            await _abort(
                context,
                BackendError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    Reason.MODEL_NOT_LOADED,
                    "no model is loaded",
                ),
            )
        if capability not in self.serving:
            name = capability.name.lower()
            await _abort(
                context,
                BackendError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    Reason.UNSUPPORTED,
                    f"model '{self.model_name}' does not support {name}",
                ),
            )
        if mark:
            await context.send_initial_metadata(_STARTED)

    async def call(
        self,
        context: grpc.aio.ServicerContext,
        capability: Capability,
        fn: Callable[[Request, threading.Event], Response],
        request: Request,
    ) -> Response:
        """Run one engine call in a worker thread; a cancelled RPC sets its event."""
        await self.check(context, capability)
        cancelled = threading.Event()
        self.backend.threads.busy += 1
        try:
            return await self.run(fn, request, cancelled)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        except Exception as exc:  # every failure leaves as a status, never a crash
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc
        finally:
            self.backend.threads.busy -= 1

    async def embed(
        self, context: grpc.aio.ServicerContext, request: pb.EmbedRequest
    ) -> pb.EmbedResponse:
        """An Embed call: with other callers' when the backend batches, else on its own."""
        batcher = self.embed_batcher
        if batcher is None:
            return await self.call(context, Capability.EMBEDDINGS, self.backend.embed, request)
        # Marked as begun only when its batch goes to the engine: if the backend dies
        # meanwhile, the gateway may send a call that was still queued here to the next one.
        await self.check(context, Capability.EMBEDDINGS, mark=False)

        async def started() -> None:
            with contextlib.suppress(Exception):  # the caller has gone: nothing to tell
                await context.send_initial_metadata(_STARTED)

        self.backend.threads.busy += 1
        try:
            return await batcher.embed(request, started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc
        finally:
            self.backend.threads.busy -= 1

    def start_batching(self, request: pb.LoadRequest) -> int:
        """Batch Embed calls if the backend can and the model serves embeddings; the calls the
        gateway should let through at once (0: one at a time)."""
        self.embed_batcher = None
        most = self.backend.embed_batch_inputs
        if most <= 0 or Capability.EMBEDDINGS not in self.serving:
            return 0
        window = request.options.fields.get("batch_window_ms")
        window_ms = window.number_value if window is not None else 0.0
        if not 0 <= window_ms <= 1000:
            raise invalid("invalid_option", "options.batch_window_ms must be between 0 and 1000")

        async def run(merged: pb.EmbedRequest, cancelled: threading.Event) -> pb.EmbedResponse:
            return await self.run(self.backend.embed, merged, cancelled)

        self.embed_batcher = EmbedBatcher(run, most, window_ms / 1000)
        # More calls at once only for embedding models (which rerank too): text is served
        # one call at a time here (a text backend batches its own way).
        return CONCURRENT_CALLS if self.serving <= {Capability.EMBEDDINGS, Capability.RERANK} else 0

    async def stream(
        self,
        context: grpc.aio.ServicerContext,
        capability: Capability,
        fn: Callable[[Request, threading.Event], Iterator[Response]],
        request: Request,
    ) -> AsyncIterator[Response]:
        """Drive a blocking generator in its own thread and hand its items to the loop."""
        await self.check(context, capability)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def post(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def produce() -> None:
            items = fn(request, cancelled)
            try:
                for item in items:
                    if cancelled.is_set():
                        break
                    post(item)
            except BaseException as exc:
                post(_Failure(exc))
            else:
                post(_DONE)
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()

        self.backend.threads.busy += 1
        self.engine.submit(produce)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    await _abort(context, item.exc)
                yield item
        finally:
            cancelled.set()
            self.backend.threads.busy -= 1


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call with the status a BackendError names, or INTERNAL for anything else."""
    if isinstance(exc, BackendError):
        await context.abort(exc.code, exc.message, trailing_metadata=exc.trailing_metadata())
    log.error("engine call failed", exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"backend error: {type(exc).__name__}: {exc}",
        trailing_metadata=((REASON_KEY, Reason.INTERNAL.value),),
    )


class _Lifecycle(pb_grpc.LifecycleServicer):
    def __init__(self, runtime: _Runtime) -> None:
        self.rt = runtime

    async def Load(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> Any:
        rt = self.rt
        await context.send_initial_metadata(_STARTED)
        async with rt.load_lock:
            if rt.state == pb.MODEL_STATE_READY and rt.model_name == request.model_name:
                return rt.load_response
            rt.state = pb.MODEL_STATE_LOADING
            rt.model_name = request.model_name
            try:
                response = await rt.run(rt.backend.load, request)
                rt.serving = rt.backend.capabilities()
                concurrent_calls = rt.start_batching(request)
            except Exception as exc:
                rt.serving = frozenset()
                rt.state = pb.MODEL_STATE_FAILED
                if isinstance(exc, FileNotFoundError):
                    exc = BackendError(
                        grpc.StatusCode.NOT_FOUND, Reason.MODEL_FILE_NOT_FOUND, str(exc)
                    )
                elif not isinstance(exc, BackendError):
                    log.error("loading %s failed", request.model_name, exc_info=exc)
                    exc = BackendError(
                        grpc.StatusCode.INTERNAL,
                        Reason.LOAD_FAILED,
                        f"could not load model '{request.model_name}': {type(exc).__name__}: {exc}",
                    )
                await _abort(context, exc)
            rt.state = pb.MODEL_STATE_READY
            response = response or pb.LoadResponse()
            share = rt.backend.threads
            share.loaded = share.loaded or response.threads or request.threads
            response.threads = share.loaded
            response.adjustable_threads = rt.backend.adjustable_threads
            response.concurrent_calls = response.concurrent_calls or concurrent_calls
            rt.load_response = response
            await rt.publish_health()
            log.info("loaded %s", request.model_name)
            return rt.load_response

    async def Unload(self, request: pb.UnloadRequest, context: grpc.aio.ServicerContext) -> Any:
        rt = self.rt
        async with rt.load_lock:
            rt.serving = frozenset()
            await rt.publish_health()
            await rt.run(rt.backend.unload)
            rt.state = pb.MODEL_STATE_UNLOADED
            log.info("unloaded %s", rt.model_name)
            return pb.UnloadResponse()

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.StatusResponse(
            state=self.rt.state,
            model_name=self.rt.model_name,
            memory_bytes=_resident_bytes(),
            threads=self.rt.backend.threads.current(),
        )

    async def SetThreads(
        self, request: pb.SetThreadsRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        backend = self.rt.backend
        if not backend.adjustable_threads:
            await _abort(
                context,
                BackendError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    Reason.UNSUPPORTED,
                    f"the {backend.name} engine computes with a thread count fixed at load",
                ),
            )
        share = backend.threads
        threads = share.set(request.threads)
        # Answer once the engine computes with it (its next step), so that the gateway can hold
        # a newcomer back until the cores it needs are really free; never wait long for a slow
        # step (a long prompt chunk on a big model). The engine thread notices the change at
        # its own pace; a 2 ms poll costs nothing next to a step.
        deadline = asyncio.get_running_loop().time() + SET_THREADS_WAIT_SECONDS
        while not share.in_effect() and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        return pb.SetThreadsResponse(threads=threads)


class _Text(pb_grpc.TextServicer):
    def __init__(self, runtime: _Runtime) -> None:
        self.rt = runtime

    def _checked(
        self, generate: Callable[[pb.GenerateRequest, threading.Event], Response]
    ) -> Callable[[pb.GenerateRequest, threading.Event], Response]:
        """`generate`, refusing what this backend says it cannot do."""
        backend = self.rt.backend

        def call(request: pb.GenerateRequest, cancelled: threading.Event) -> Response:
            if request.sampling.HasField("logprobs") and not backend.scores_tokens:
                raise invalid(
                    "logprobs_unsupported",
                    f"the {backend.name} backend does not compute token log-probabilities "
                    "(logprobs, top_logprobs, best_of); llama models do",
                    param="logprobs",
                )
            return generate(request, cancelled)

        return call

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        generate = self._checked(self.rt.backend.generate)
        return await self.rt.call(context, Capability.TEXT, generate, request)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        generate = self._checked(self.rt.backend.generate_stream)
        stream = self.rt.stream(context, Capability.TEXT, generate, request)
        async for item in stream:
            yield item

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> Any:
        tokenize = self.rt.backend.tokenize
        return await self.rt.call(context, Capability.TEXT, lambda r, _: tokenize(r), request)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        detokenize = self.rt.backend.detokenize
        return await self.rt.call(context, Capability.TEXT, lambda r, _: detokenize(r), request)


class _Embeddings(pb_grpc.EmbeddingsServicer):
    def __init__(self, runtime: _Runtime) -> None:
        self.rt = runtime

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self.rt.embed(context, request)


class _Transcription(pb_grpc.TranscriptionServicer):
    def __init__(self, runtime: _Runtime) -> None:
        self.rt = runtime

    async def Transcribe(
        self, request: pb.TranscribeRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        backend = self.rt.backend
        return await self.rt.call(context, Capability.TRANSCRIPTION, backend.transcribe, request)


class _Images(pb_grpc.ImagesServicer):
    def __init__(self, runtime: _Runtime) -> None:
        self.rt = runtime

    async def GenerateImage(
        self, request: pb.GenerateImageRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        backend = self.rt.backend
        return await self.rt.call(context, Capability.IMAGES, backend.generate_image, request)


class _Speech(pb_grpc.SpeechServicer):
    def __init__(self, runtime: _Runtime) -> None:
        self.rt = runtime

    async def Synthesize(
        self, request: pb.SynthesizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SynthesizeResponse]:
        stream = self.rt.stream(context, Capability.SPEECH, self.rt.backend.synthesize, request)
        async for item in stream:
            yield item

    async def ListVoices(
        self, request: pb.ListVoicesRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        voices = self.rt.backend.list_voices
        return await self.rt.call(context, Capability.SPEECH, lambda r, _: voices(r), request)


class _Rerank(pb_grpc.RerankServicer):
    def __init__(self, runtime: _Runtime) -> None:
        self.rt = runtime

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> Any:
        backend = self.rt.backend
        return await self.rt.call(context, Capability.RERANK, backend.rerank, request)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class _TokenCheck(grpc.aio.ServerInterceptor):
    """Refuse every call, health checks included, that does not carry our token."""

    def __init__(self, token: str) -> None:
        # Digests are compared, so that neither the token's bytes nor its length leak by time.
        self._digest = _digest(token)

    def _refusal(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """Why a call's metadata is refused; None if it carries our token."""
        given = next((v for k, v in metadata or () if k == AUTHORIZATION_KEY), None)
        if not isinstance(given, str) or not given:
            return "no token was sent"
        scheme, _, token = given.partition(" ")
        if scheme.lower() != AUTHORIZATION_SCHEME.strip().lower():
            return "the authorization is not a bearer token"
        if not hmac.compare_digest(_digest(token.strip()), self._digest):
            return "wrong token"
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        why = self._refusal(handler_call_details.invocation_metadata)
        if why is None:
            return await continuation(handler_call_details)

        async def refuse(_: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            log.warning("refused a call to %s from %s: %s", method, context.peer(), why)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            yield  # unreachable: it makes this a generator

        # A streaming handler whatever the method: the refusal goes out before the request's
        # message is read (or parsed), so a caller without the token costs next to nothing.
        return grpc.stream_stream_rpc_method_handler(refuse)


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the parent goes, even if it was SIGKILLed."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """Backstop for platforms without PDEATHSIG: notice being re-parented."""
    while not stop.is_set():
        if os.getppid() != parent:
            log.warning("parent process %d is gone; stopping", parent)
            stop.set()
            return
        await asyncio.sleep(_PARENT_POLL_SECONDS)


async def serve(
    backend: Backend,
    address: str,
    *,
    parent: int | None = None,
    token: str | None = None,
    tls: tuple[bytes, bytes] | None = None,
    insecure: bool = False,
) -> None:
    """Serve `backend` on `address` (unix:///path or host:port) until SIGTERM or SIGINT.

    `token`: every call must carry it (`authorization: Bearer <token>`). `tls`: the PEM
    certificate chain and private key to serve TLS with. An address other machines can reach
    needs a token unless `insecure`.
    """
    if not token and not insecure and not is_loopback_address(address):
        raise SystemExit(
            f"refusing to listen on {address} without a token: anyone on the network could "
            "use this backend. Give --token-file (the gateway sends the same token), listen "
            "on 127.0.0.1, or pass --insecure on a network you trust."
        )
    interceptors = [_TokenCheck(token)] if token else []
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
    health_servicer = health.aio.HealthServicer()
    runtime = _Runtime(backend, health_servicer)
    pb_grpc.add_LifecycleServicer_to_server(_Lifecycle(runtime), server)
    pb_grpc.add_TextServicer_to_server(_Text(runtime), server)
    pb_grpc.add_EmbeddingsServicer_to_server(_Embeddings(runtime), server)
    pb_grpc.add_TranscriptionServicer_to_server(_Transcription(runtime), server)
    pb_grpc.add_ImagesServicer_to_server(_Images(runtime), server)
    pb_grpc.add_SpeechServicer_to_server(_Speech(runtime), server)
    pb_grpc.add_RerankServicer_to_server(_Rerank(runtime), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if tls is not None:
        chain, key = tls
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, chain)]))
    else:
        port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise SystemExit(f"cannot listen on {address}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await runtime.publish_health()
    guarded = [what for what, on in (("token required", token), ("TLS", tls)) if on]
    log.info(
        "%s backend listening on %s%s",
        backend.name,
        address,
        f" ({', '.join(guarded)})" if guarded else "",
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watcher = asyncio.create_task(_watch_parent(parent, stop)) if parent else None
    await stop.wait()

    log.info("stopping")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(STOP_GRACE_SECONDS)
    if watcher is not None:
        watcher.cancel()
    await runtime.run(backend.unload)
    runtime.engine.shutdown(wait=False, cancel_futures=True)


def _read_file(parser: argparse.ArgumentParser, option: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        parser.error(f"{option}: cannot read {path}: {exc.strerror}")


def run(backend: Backend, argv: list[str] | None = None) -> None:
    """Entry point for `python -m backends.<name> --address ...`."""
    parser = argparse.ArgumentParser(prog=f"backends.{backend.name}")
    parser.add_argument("--address", required=True, help="unix:///path/to.sock or host:port")
    parser.add_argument("--log-level", default=os.environ.get("HEARTH_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--token-file",
        default=os.environ.get(TOKEN_FILE_ENV) or None,
        help=f"a file holding the token every call must carry (or ${TOKEN_FILE_ENV})",
    )
    parser.add_argument("--tls-cert", help="PEM certificate (chain) to serve TLS with")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="listen on a non-loopback address without a token",
    )
    args = parser.parse_args(argv)
    token = None
    if args.token_file:
        token = _read_file(parser, "--token-file", args.token_file).decode(errors="replace")
        token = token.strip()
        if not token:
            parser.error(f"--token-file: {args.token_file} is empty")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_cert is not None:
        tls = (
            _read_file(parser, "--tls-cert", args.tls_cert),
            _read_file(parser, "--tls-key", args.tls_key),
        )
    # Under the gateway, our lines go into its log, which stamps them with the time already.
    stamp = "" if os.environ.get("HEARTH_UNDER_GATEWAY") else "%(asctime)s "
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"{stamp}%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _die_with_parent()
    parent = os.getppid()
    if parent <= 1:  # started by init: no parent to watch
        parent = 0
    asyncio.run(
        serve(
            backend,
            args.address,
            parent=parent or None,
            token=token,
            tls=tls,
            insecure=args.insecure,
        )
    )
