"""The echo backend: answers with the prompt (or the last user message), word by word.

It is the gateway's test double and the smallest complete example of a backend: subclass
`Backend`, implement the engine calls, and `run()` it. Switches in the model YAML's `options:`
make it misbehave on purpose:

- `load_delay_ms`: sleep this long in Load.
- `latency_ms`: sleep this long before each word (and each embedding input, and each document
  to rerank).
- `fail_code` (a gRPC status name such as `INVALID_ARGUMENT`), `fail_reason`, `fail_message`:
  fail every generation (and rerank) with that status...
- `fail_after_words`: ...after this many words have been streamed (0: before any); a rerank
  counts documents instead of words.
- `exit_after_words`: end the whole process abruptly after this many words (or documents).
- `exit_on_load`: end the whole process abruptly while loading (a backend that cannot start).
- `dimensions`: embedding size (default 16).
- `hold_mb`: keep this many MB of memory resident while loaded (a model bigger than it says).

With tools in a chat, the echoed text is parsed for tool calls in the YAML's `tool_parser` format
(default hermes), so the gateway's tool-call path can be tested with crafted answers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import json_format

from backends.runtime import Backend, BackendError, invalid, missing_adapter
from backends.runtime.text import StopText, scored_alternatives, token_logprob
from backends.runtime.tools import generate_with_tools
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Reason

log = logging.getLogger("hearth.backend.echo")
_PIECE = re.compile(r"\s*\S+")
_WORD = re.compile(r"\w+")
#: Pieces remembered for detokenize.
_VOCABULARY_MAX = 100_000


def pieces(text: str) -> list[str]:
    """Echo's tokens: each word with the whitespace before it."""
    return _PIECE.findall(text)


def _piece_id(piece: str) -> int:
    return zlib.crc32(piece.encode()) & 0x7FFFFFFF


class EchoBackend(Backend):
    """Deterministic text, embeddings and reranking, with switches to fail on purpose."""

    name = "echo"
    scores_tokens = True  # every word with log-probability 0
    engine_threads = 8  # it only sleeps: let slow streams overlap
    adjustable_threads = True  # it computes nothing, but takes the share it is given
    embed_batch_inputs = 64  # concurrent Embed calls are merged, as real engines' are

    def __init__(self) -> None:
        self.options: dict[str, Any] = {}
        self.vocabulary: dict[int, str] = {}  # ids seen by tokenize, for detokenize
        self.held = b""
        self.tool_family = "hermes"

    def load(self, request: pb.LoadRequest) -> pb.LoadResponse:
        self.options = json_format.MessageToDict(request.options)
        if self.options.get("exit_on_load"):
            log.error("exit_on_load: exiting")
            os._exit(3)
        self.threads.loaded = request.threads or 1
        self.tool_family = request.tool_parser or "hermes"
        self.held = b"\x01" * int(float(self.options.get("hold_mb", 0)) * 1e6)  # pages touched
        time.sleep(float(self.options.get("load_delay_ms", 0)) / 1000)
        return pb.LoadResponse(context_size=request.context_size or 4096)

    def _answer(self, request: pb.GenerateRequest) -> tuple[str, int]:
        """The text to echo and the prompt's size in echo tokens; LoRA adapters, which echo
        reads but does not compute with, are named before it (`[adapter.gguf*0.5] `)."""
        text, prompt_tokens = self._echoed(request)
        named = [f"{os.path.basename(a.path)}*{a.scale:g}" for a in request.adapters]
        for adapter in request.adapters:
            if not os.path.exists(adapter.path):
                raise missing_adapter(adapter.path)
        return (f"[{' '.join(named)}] {text}" if named else text), prompt_tokens

    @staticmethod
    def _echoed(request: pb.GenerateRequest) -> tuple[str, int]:
        if request.WhichOneof("input") == "prompt":
            return request.prompt, len(pieces(request.prompt))
        messages = request.chat.messages
        prompt_tokens = sum(len(pieces(m.content)) for m in messages)
        for message in reversed(messages):
            if message.role == "user":
                return message.content, prompt_tokens
        return "", prompt_tokens

    def generate_stream(
        self, request: pb.GenerateRequest, cancelled: threading.Event
    ) -> Iterator[pb.GenerateStreamResponse]:
        # Echo's "template" renders tools: a crafted message comes back parsed as the model
        # family's calls would be.
        yield from generate_with_tools(
            request, self.tool_family, lambda _: self._echo(request, cancelled), constrained=True
        )

    def _echo(
        self, request: pb.GenerateRequest, cancelled: threading.Event
    ) -> Iterator[pb.GenerateStreamResponse]:
        answer, prompt_tokens = self._answer(request)
        sampling = request.sampling
        words = pieces(answer)
        finish = pb.FINISH_REASON_STOP
        if sampling.HasField("max_tokens") and len(words) > sampling.max_tokens:
            words, finish = words[: sampling.max_tokens], pb.FINISH_REASON_LENGTH
        latency = float(self.options.get("latency_ms", 0)) / 1000
        text = StopText(list(sampling.stop))
        # Echo is sure of every word: log-probability 0, the word its only alternative.
        alternatives = scored_alternatives(request)
        sent = 0
        for index, word in enumerate(words):
            # Echo computes nothing, but takes its share between words like a real engine, so
            # the gateway's hand-over of cores is exercised as it is with llama.cpp.
            self.follow_threads()
            self._misbehave(index)
            if cancelled.wait(latency) if latency else cancelled.is_set():
                log.info("stream cancelled after %d of %d words", index, len(words))
                return
            sent = index + 1
            scored = None
            if alternatives is not None:
                top = [(word, 0.0)][:alternatives]
                scored = token_logprob(word, 0.0, top, str.encode)
            ready = text.feed(word, scored)
            logprobs = text.logprobs()
            if ready or logprobs:
                yield pb.GenerateStreamResponse(text=ready, logprobs=logprobs)
            if text.stopped:
                finish = pb.FINISH_REASON_STOP
                break
        else:
            self._misbehave(len(words))
        rest = text.rest()
        logprobs = text.logprobs()
        if rest or logprobs:
            yield pb.GenerateStreamResponse(text=rest, logprobs=logprobs)
        yield pb.GenerateStreamResponse(
            finish_reason=finish,
            usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=sent),
        )

    def _misbehave(self, words_sent: int) -> None:
        options = self.options
        if "exit_after_words" in options and words_sent >= int(options["exit_after_words"]):
            time.sleep(0.2)  # let the words already yielded reach the client
            os._exit(17)  # a crash, as abrupt as a segfault in an engine
        if "fail_code" in options and words_sent >= int(options.get("fail_after_words", 0)):
            raise BackendError(
                grpc.StatusCode[options["fail_code"]],
                options.get("fail_reason", "echo_failure"),
                options.get("fail_message", "echo failed on purpose"),
            )

    def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        ids = []
        for piece in pieces(request.text):
            self.vocabulary[_piece_id(piece)] = piece
            if len(self.vocabulary) > _VOCABULARY_MAX:  # forget the oldest: memory stays bounded
                del self.vocabulary[next(iter(self.vocabulary))]
            ids.append(_piece_id(piece))
        return pb.TokenizeResponse(tokens=ids)

    def detokenize(self, request: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
        unknown = [i for i in request.tokens if i not in self.vocabulary]
        if unknown:
            raise invalid("unknown_token", f"unknown token id {unknown[0]}")
        return pb.DetokenizeResponse(text="".join(self.vocabulary[i] for i in request.tokens))

    def embed(self, request: pb.EmbedRequest, cancelled: threading.Event) -> pb.EmbedResponse:
        size = int(self.options.get("dimensions", 16))
        if request.dimensions > size:  # fewer is OpenAI's shortening; more is not a thing
            raise invalid(
                "unsupported_dimensions",
                f"this model makes embeddings of at most {size} dimensions",
                param="dimensions",
            )
        dimensions = request.dimensions or size
        keys = []
        counts = []
        for index, item in enumerate(request.inputs):
            if item.WhichOneof("input") == "tokens":
                keys.append(struct.pack(f"<{len(item.tokens.ids)}i", *item.tokens.ids))
                counts.append(len(item.tokens.ids))
            else:
                keys.append(item.text.encode())
                counts.append(len(pieces(item.text)))
            if request.max_input_tokens and counts[-1] > request.max_input_tokens:
                raise invalid(
                    Reason.INPUT_TOO_LONG,
                    f"input[{index}] is {counts[-1]} tokens; the most is "
                    f"{request.max_input_tokens}",
                    param="input",
                )
        latency = float(self.options.get("latency_ms", 0)) / 1000
        vectors: list[pb.Embedding] = []
        for key in keys:
            if cancelled.wait(latency) if latency else cancelled.is_set():
                log.info("embeddings cancelled after %d of %d inputs", len(vectors), len(keys))
                raise BackendError(grpc.StatusCode.CANCELLED, Reason.CANCELLED, "cancelled")
            vectors.append(pb.Embedding(values=_hash_vector(key, dimensions)))
        return pb.EmbedResponse(embeddings=vectors, prompt_tokens=sum(counts), input_tokens=counts)

    def rerank(self, request: pb.RerankRequest, cancelled: threading.Event) -> pb.RerankResponse:
        """Each document's score: the fraction of the query's distinct words (lowercased) that
        it contains; usage counts the words of the query and of every document."""
        wanted = set(_WORD.findall(request.query.lower()))
        latency = float(self.options.get("latency_ms", 0)) / 1000
        scores: list[float] = []
        for index, document in enumerate(request.documents):
            self._misbehave(index)
            if cancelled.wait(latency) if latency else cancelled.is_set():
                log.info("rerank cancelled after %d of %d documents", index, len(request.documents))
                raise BackendError(grpc.StatusCode.CANCELLED, Reason.CANCELLED, "cancelled")
            found = wanted & set(_WORD.findall(document.lower()))
            scores.append(len(found) / len(wanted) if wanted else 0.0)
        self._misbehave(len(scores))
        words = len(pieces(request.query)) + sum(len(pieces(d)) for d in request.documents)
        return pb.RerankResponse(scores=scores, prompt_tokens=words)


def _hash_vector(key: bytes, dimensions: int) -> list[float]:
    """A unit vector that depends only on `key`."""
    raw: list[float] = []
    counter = 0
    while len(raw) < dimensions:
        digest = hashlib.sha256(key + counter.to_bytes(4, "little")).digest()
        raw.extend(b / 127.5 - 1.0 for b in digest)
        counter += 1
    raw = raw[:dimensions]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]
