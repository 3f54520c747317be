"""A typed async wrapper over one backend's stubs: deadlines, cancellation, errors mapped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.errors import BackendGone, OpenAIError, from_grpc
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1 import backend_pb2_grpc as pb_grpc
from protos.hearth.backend.v1.contract import (
    AUTHORIZATION_KEY,
    AUTHORIZATION_SCHEME,
    MAX_MESSAGE_BYTES,
    STARTED_KEY,
    Capability,
)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A backend that is starting refuses connections for a moment: retry soon, not after 1 s.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class BackendTLS:
    """How the gateway checks a remote backend's certificate."""

    #: PEM certificates to trust; None: gRPC's own bundled roots.
    root_certificates: bytes | None = None
    #: The name the certificate must carry, where it is not the address's host.
    server_name: str | None = None


def backend_channel(address: str, tls: BackendTLS | None = None) -> grpc.aio.Channel:
    """The one channel to a backend: plaintext (our private unix sockets, a remote backend on a
    link the user trusts) or TLS."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    options = list(CHANNEL_OPTIONS)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.root_certificates)
    return grpc.aio.secure_channel(address, credentials, options=options)


def _we_are_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class BackendClient:
    """Calls into one backend over one persistent channel."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        model: str,
        request_timeout: float,
        token: str | None = None,
    ) -> None:
        self.channel = channel
        self.model = model
        self.timeout = request_timeout
        # Sent with every call, health checks included: call credentials would need TLS, and
        # a backend on a trusted link may be reached without it.
        self._metadata = ((AUTHORIZATION_KEY, f"{AUTHORIZATION_SCHEME}{token}"),) if token else None
        #: Why the last health check failed (for a start that never became healthy), and
        #: whether it only ran out of time (an answer too slow, not a refusal).
        self.last_health_failure: str | None = None
        self.last_health_slow = False
        self._lifecycle = pb_grpc.LifecycleStub(channel)
        self._text = pb_grpc.TextStub(channel)
        self._embeddings = pb_grpc.EmbeddingsStub(channel)
        self._transcription = pb_grpc.TranscriptionStub(channel)
        self._images = pb_grpc.ImagesStub(channel)
        self._speech = pb_grpc.SpeechStub(channel)
        self._rerank = pb_grpc.RerankStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        #: The backend marks each call it begins (STARTED_KEY); learned from its Load.
        self.marks_starts = False

    async def healthy(self, timeout: float = 1.0) -> bool:
        """The process answers health checks. A refused token is an error, not a wait."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise from_grpc(exc, self.model) from None
            self.last_health_failure = exc.details() or exc.code().name.lower()
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def serves(self, timeout: float) -> bool | None:
        """Whether the backend serves our model now: True; False when it says it does not (it
        restarted and lost it, or holds another); None when it does not answer (the reason is
        kept in `last_health_failure`). A backend of someone else's that does not implement
        Status, or leaves it empty, is asked the standard health check instead."""
        try:
            reply = await self._lifecycle.Status(
                pb.StatusRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return await self._serving(timeout)
            self.last_health_failure = exc.details() or exc.code().name.lower()
            self.last_health_slow = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            return None
        if reply.model_name and reply.model_name != self.model:
            return False
        if reply.state in (pb.MODEL_STATE_UNLOADED, pb.MODEL_STATE_FAILED, pb.MODEL_STATE_LOADING):
            return False
        if reply.state == pb.MODEL_STATE_READY and reply.model_name:
            return True
        return await self._serving(timeout)  # an answer that says too little

    async def _serving(self, timeout: float) -> bool | None:
        """The standard health check, as `serves` answers."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            self.last_health_failure = exc.details() or exc.code().name.lower()
            self.last_health_slow = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            return None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            self.last_health_failure = "not serving"
            self.last_health_slow = False
            return None
        return True

    async def capabilities(self) -> frozenset[Capability]:
        """The services the loaded model serves, as health reports them."""
        serving = set()
        for capability in Capability:
            request = health_pb2.HealthCheckRequest(service=capability.value)
            try:
                reply = await self._health.Check(request, timeout=5, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    continue
                raise from_grpc(exc, self.model) from None
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                serving.add(capability)
        return frozenset(serving)

    async def _started(self, call: Any) -> bool:
        """Whether the backend began work on this call, as far as we can know."""
        if not self.marks_starts:
            return True  # it does not say: assume the worst
        with contextlib.suppress(grpc.RpcError, asyncio.CancelledError):
            return await self._started_marked(call)
        return True

    async def _gone(self, call: Any, error: OpenAIError) -> OpenAIError:
        """A backend-gone error that says whether the call had started there."""
        if isinstance(error, BackendGone) and error.reached and not await self._started(call):
            error.reached = False
        return error

    async def _call(
        self, method: Any, request: Any, timeout: float | None = None, *, learn: bool = False
    ) -> Any:
        """One unary call: its deadline, a failure in OpenAI's shape, and cancel on the way out
        (a no-op once done; it stops the backend's work if our caller was cancelled).
        `learn`: note whether the backend marks the calls it begins."""
        try:
            call = method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.aio.UsageError:  # the channel was closed: the backend is gone
            raise BackendGone(self.model, "it has stopped", reached=False) from None
        try:
            reply = await call
            if learn:
                self.marks_starts = await self._started_marked(call)
            return reply
        except grpc.aio.AioRpcError as exc:
            raise await self._gone(call, from_grpc(exc, self.model)) from None
        except asyncio.CancelledError:
            if _we_are_cancelled():
                raise
            # gRPC cancelled the call under us (its channel closed): the backend is gone.
            gone = BackendGone(self.model, "it went away mid-call", reached=True)
            raise await self._gone(call, gone) from None
        finally:
            call.cancel()

    @staticmethod
    async def _started_marked(call: Any) -> bool:
        return any(key == STARTED_KEY for key, _ in await call.initial_metadata() or ())

    async def load(self, request: pb.LoadRequest, timeout: float) -> pb.LoadResponse:
        return await self._call(self._lifecycle.Load, request, timeout, learn=True)

    async def unload(self) -> None:
        await self._call(self._lifecycle.Unload, pb.UnloadRequest(), 30)

    async def set_threads(self, threads: int) -> int:
        """Ask the engine to compute with `threads` from its next step; what is in effect."""
        reply = await self._call(
            self._lifecycle.SetThreads, pb.SetThreadsRequest(threads=threads), 5
        )
        return int(reply.threads)

    async def generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        return await self._call(self._text.Generate, request)

    def generate_stream(
        self, request: pb.GenerateRequest
    ) -> AsyncGenerator[pb.GenerateStreamResponse]:
        """The backend's pieces as they come; leaving early cancels the backend's work."""
        return self._stream(self._text.GenerateStream, request)

    def synthesize(self, request: pb.SynthesizeRequest) -> AsyncGenerator[pb.SynthesizeResponse]:
        """The encoded audio in pieces as the backend makes them; leaving early stops it."""
        return self._stream(self._speech.Synthesize, request)

    async def list_voices(self) -> pb.ListVoicesResponse:
        return await self._call(self._speech.ListVoices, pb.ListVoicesRequest())

    async def rerank(self, request: pb.RerankRequest) -> pb.RerankResponse:
        return await self._call(self._rerank.Rerank, request)

    async def _stream(self, method: Any, request: Any) -> AsyncGenerator[Any]:
        """A server-streaming call's messages as they come; leaving early cancels it."""
        try:
            call = method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.aio.UsageError:
            raise BackendGone(self.model, "it has stopped", reached=False) from None
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise await self._gone(call, from_grpc(exc, self.model)) from None
        except asyncio.CancelledError:
            if _we_are_cancelled():
                raise
            # gRPC cancelled the call under us (its channel closed): the backend is gone.
            gone = BackendGone(self.model, "it went away mid-answer", reached=True)
            raise await self._gone(call, gone) from None
        finally:
            call.cancel()

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        return await self._call(self._text.Tokenize, request)

    async def detokenize(self, request: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
        return await self._call(self._text.Detokenize, request)

    async def transcribe(self, request: pb.TranscribeRequest) -> pb.TranscribeResponse:
        return await self._call(self._transcription.Transcribe, request)

    async def generate_image(self, request: pb.GenerateImageRequest) -> pb.GenerateImageResponse:
        return await self._call(self._images.GenerateImage, request)

    async def embed(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        return await self._call(self._embeddings.Embed, request)
