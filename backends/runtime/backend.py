"""The base class every backend subclasses: engine calls only, no gRPC."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import grpc

from backends.runtime.errors import BackendError
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Capability, Reason

log = logging.getLogger("hearth.backend")

# The method a subclass overrides to offer each capability.
_CAPABILITY_METHODS = {
    Capability.TEXT: "generate_stream",
    Capability.EMBEDDINGS: "embed",
    Capability.TRANSCRIPTION: "transcribe",
    Capability.IMAGES: "generate_image",
    Capability.SPEECH: "synthesize",
    Capability.RERANK: "rerank",
}


def _unimplemented(what: str) -> BackendError:
    return BackendError(
        grpc.StatusCode.UNIMPLEMENTED, Reason.UNSUPPORTED, f"this backend does not support {what}"
    )


class ThreadShare:
    """How many threads the engine should compute with now.

    The gateway changes it (SetThreads) as other models start and stop computing; the event loop
    sets it, and engine code calls `Backend.follow_threads()` between steps (a token, a batch of
    prompt, a forward pass), which applies a change. The runtime counts the engine calls in
    progress, so that SetThreads can answer once the change is in effect.
    """

    def __init__(self) -> None:
        #: Threads the model was loaded with: the most it may be given.
        self.loaded = 0
        #: Engine calls in progress (kept by the runtime).
        self.busy = 0
        self._wanted = 0
        self._version = 0
        self._applied_version = 0
        # What each computing thread last applied: OpenMP's setting is per thread.
        self._seen = threading.local()

    def set(self, threads: int) -> int:
        """Ask for `threads` (at least 1, at most `loaded`); return what will be in effect."""
        threads = max(1, threads)
        if self.loaded:
            threads = min(threads, self.loaded)
        self._wanted = threads
        self._version += 1
        return threads

    def current(self) -> int:
        """The thread count to compute with (0: the engine's own choice)."""
        return self._wanted or self.loaded

    def in_effect(self) -> bool:
        """The last `set` has been applied by the engine, or nothing is computing."""
        return self.busy == 0 or self._applied_version >= self._version

    def follow(self, apply: Callable[[int], object]) -> None:
        """Call `apply(n)` if the share changed since this thread last applied it."""
        version = self._version
        wanted = self.current()
        if wanted and getattr(self._seen, "threads", 0) != wanted:
            apply(wanted)
            self._seen.threads = wanted
        self._applied_version = max(self._applied_version, version)


class Backend:
    """An engine behind the contract.

    Every method runs in a worker thread, never on the event loop, so engine code may block.
    Long calls receive `cancelled`, an event set when the caller gives up; check it between
    steps (tokens, denoising steps) and return early. Fail a call by raising `BackendError`.
    """

    #: Name used in logs.
    name = "backend"
    #: Threads engine calls run on. One (the default) serialises calls, streams included, on a
    #: thread that never changes; raise it only for an engine that serves calls in parallel.
    engine_threads = 1
    #: The engine can change its thread count while loaded: it calls `follow_threads()` between
    #: steps and implements `apply_threads`. Set `self.threads.loaded` in `load`.
    adjustable_threads = False
    #: The backend computes token log-probabilities (sampling.logprobs); the runtime refuses a
    #: request for them with a 400 where it does not, rather than answer without them.
    scores_tokens = False
    #: The most inputs one `embed` call should get when the runtime merges concurrent Embed
    #: calls into one (see batching.py); 0: calls run one by one. A backend that sets it fills
    #: `EmbedResponse.input_tokens`, and fails a merged call as it would the calls alone (the
    #: runtime then runs them one by one, so that the error reaches only its own caller).
    embed_batch_inputs = 0

    @property
    def threads(self) -> ThreadShare:
        """The thread count the gateway wants now (see ThreadShare)."""
        share = self.__dict__.get("_thread_share")
        if share is None:
            share = self.__dict__["_thread_share"] = ThreadShare()
        return share

    def follow_threads(self) -> None:
        """Between two steps of engine work: apply the thread count the gateway gave last."""
        self.threads.follow(self._apply_threads)

    def _apply_threads(self, threads: int) -> None:
        self.apply_threads(threads)
        log.debug("computing with %d thread(s)", threads)

    def apply_threads(self, threads: int) -> None:
        """Make the engine compute with `threads` from now on, on the calling thread."""

    def load(self, request: pb.LoadRequest) -> pb.LoadResponse:
        """Load the model the request names; raise BackendError if it cannot be loaded."""
        raise _unimplemented("loading models")

    def unload(self) -> None:
        """Free the model. The default does nothing."""

    def implemented(self) -> frozenset[Capability]:
        """Capabilities this class has code for (the methods it overrides)."""
        own = type(self)
        return frozenset(
            cap
            for cap, method in _CAPABILITY_METHODS.items()
            if getattr(own, method) is not getattr(Backend, method)
        )

    def capabilities(self) -> frozenset[Capability]:
        """Capabilities the loaded model serves; by default all that are implemented."""
        return self.implemented()

    # Text -------------------------------------------------------------------------------------

    def generate_stream(
        self, request: pb.GenerateRequest, cancelled: threading.Event
    ) -> Iterator[pb.GenerateStreamResponse]:
        """Yield text pieces; the last message carries finish_reason and usage."""
        raise _unimplemented("text generation")

    def generate(
        self, request: pb.GenerateRequest, cancelled: threading.Event
    ) -> pb.GenerateResponse:
        """The whole answer at once. The default joins `generate_stream`."""
        pieces: list[str] = []
        last = pb.GenerateStreamResponse()
        tool_calls: list[pb.ToolCall] = []
        logprobs: list[pb.TokenLogprob] = []
        for chunk in self.generate_stream(request, cancelled):
            pieces.append(chunk.text)
            tool_calls.extend(chunk.tool_calls)
            logprobs.extend(chunk.logprobs)
            last = chunk
        return pb.GenerateResponse(
            text="".join(pieces),
            finish_reason=last.finish_reason,
            usage=last.usage,
            tool_calls=tool_calls,
            logprobs=logprobs,
        )

    def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        raise _unimplemented("tokenization")

    def detokenize(self, request: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
        raise _unimplemented("detokenization")

    # Other modalities -------------------------------------------------------------------------

    def embed(self, request: pb.EmbedRequest, cancelled: threading.Event) -> pb.EmbedResponse:
        raise _unimplemented("embeddings")

    def transcribe(
        self, request: pb.TranscribeRequest, cancelled: threading.Event
    ) -> pb.TranscribeResponse:
        raise _unimplemented("transcription")

    def generate_image(
        self, request: pb.GenerateImageRequest, cancelled: threading.Event
    ) -> pb.GenerateImageResponse:
        raise _unimplemented("image generation")

    def synthesize(
        self, request: pb.SynthesizeRequest, cancelled: threading.Event
    ) -> Iterator[pb.SynthesizeResponse]:
        """Yield the encoded audio in pieces as it is made (a backend that speaks overrides
        this and `list_voices`)."""
        raise _unimplemented("speech")

    def list_voices(self, request: pb.ListVoicesRequest) -> pb.ListVoicesResponse:
        raise _unimplemented("speech")

    def rerank(self, request: pb.RerankRequest, cancelled: threading.Event) -> pb.RerankResponse:
        raise _unimplemented("reranking")
