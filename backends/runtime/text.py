"""Text as a model writes it, piece by piece: what can be sent now, and where a stop cuts it.

Shared by every text backend, so stop sequences behave the same everywhere: they end the
generation, they are never returned, and text that might still grow into one is held back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format

from backends.runtime.errors import BackendError, invalid
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Reason

T = TypeVar("T")


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class StopText:
    """Accumulates decoded pieces; `feed` returns the text safe to send and whether a stop hit.

    Each piece may come with its token's log-probability: `logprobs()` hands them out with the
    text they made (held back with it; those of a stop sequence are dropped with it)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False
        #: Log-probabilities not handed out yet, with where their token's text starts.
        self._scored: list[tuple[int, pb.TokenLogprob]] = []
        self._ended = False

    def feed(self, piece: str, logprob: pb.TokenLogprob | None = None) -> str:
        """Add a decoded piece (and its token's log-probability); return what can be sent now
        ('' if nothing)."""
        if self.stopped:
            return ""
        if logprob is not None:
            self._scored.append((len(self.text), logprob))
        if not piece:
            return ""
        self.text += piece
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
            self.text = self.text[:end]
            # A token that only wrote the stop sequence made none of the answer.
            self._scored = [(start, lp) for start, lp in self._scored if start < end]
            self._ended = True
            return self._take(end)
        return self._take(len(self.text) - held_back(self.text, self.stops))

    def rest(self) -> str:
        """At the end of generation: whatever was held back (nothing after a stop)."""
        self._ended = True
        return "" if self.stopped else self._take(len(self.text))

    def logprobs(self) -> list[pb.TokenLogprob]:
        """The log-probabilities of the tokens whose text has been handed out (all of them once
        generation has ended), in order; each once."""
        if self._ended:
            ready, self._scored = self._scored, []
        else:
            count = next(
                (i for i, (start, _) in enumerate(self._scored) if start >= self.sent),
                len(self._scored),
            )
            ready, self._scored = self._scored[:count], self._scored[count:]
        return [lp for _, lp in ready]

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        ready = self.text[self.sent : end]
        self.sent = end
        return ready


def template_inputs(chat: pb.ChatInput) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A chat as chat templates read it: OpenAI-style message dicts, and the tools (or None)."""
    messages = [
        json_format.MessageToDict(m, preserving_proto_field_name=True) for m in chat.messages
    ]
    for message in messages:
        # An assistant turn that only calls tools has no content; templates expect the key, and
        # many concatenate it as a string.
        message.setdefault("content", "")
        for call in message.get("tool_calls", ()):
            # Templates read the arguments as a mapping (`| tojson`, `.items()`), as Hugging
            # Face's chat templating passes them.
            function = call.get("function", {})
            with contextlib.suppress(ValueError, TypeError):
                function["arguments"] = json.loads(function.get("arguments") or "{}")
    tools = [
        {
            "type": tool.type or "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": json.loads(tool.parameters_json or "{}"),
            },
        }
        for tool in chat.tools
    ]
    return messages, tools or None


def no_chat_template() -> BackendError:
    return BackendError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "no_chat_template",
        "this model has no chat template: set chat_template in its YAML, or use /v1/completions",
    )


def template_rejected(exc: Exception) -> BackendError:
    """A chat template's own raise_exception (or a Jinja error) as the client's 400."""
    return invalid(
        "chat_template_error",
        f"the model's chat template rejected these messages: {exc}",
        param="messages",
    )


def token_budget(request: pb.GenerateRequest, prompt_tokens: int, context: int) -> int:
    """How many tokens may be generated: what the context leaves, capped by max_tokens.

    A prompt that fills the context is the client's 400 `context_length_exceeded`.
    """
    if prompt_tokens >= context:
        raise invalid(
            Reason.CONTEXT_LENGTH_EXCEEDED,
            f"the prompt is {prompt_tokens} tokens, and this model's context holds {context}: "
            "shorten the prompt or raise context_size in the model YAML",
            param="messages" if request.WhichOneof("input") == "chat" else "prompt",
        )
    budget = context - prompt_tokens
    if request.sampling.HasField("max_tokens"):
        budget = min(budget, request.sampling.max_tokens)
    return budget


#: The most alternatives a token's log-probability comes with (OpenAI's top_logprobs bound).
MAX_TOP_LOGPROBS = 20


def scored_alternatives(request: pb.GenerateRequest) -> int | None:
    """How many alternatives each token's log-probability comes with; None: no log-probabilities
    asked for. More than MAX_TOP_LOGPROBS is the client's 400."""
    if not request.sampling.HasField("logprobs"):
        return None
    count = request.sampling.logprobs
    if count > MAX_TOP_LOGPROBS:
        raise invalid(
            "invalid_value",
            f"at most {MAX_TOP_LOGPROBS} alternatives per token, not {count}",
            param="top_logprobs",
        )
    return count


def token_logprob(
    token: T,
    logprob: float,
    top: list[tuple[T, float]],
    piece: Callable[[T], bytes],
) -> pb.TokenLogprob:
    """A generated token's log-probability as the contract carries it; `piece` gives a token's
    bytes."""

    def text(data: bytes) -> str:
        return data.decode("utf-8", errors="replace")

    data = piece(token)
    return pb.TokenLogprob(
        token=text(data),
        logprob=logprob,
        token_bytes=data,
        top=[
            pb.TopLogprob(token=text(b), logprob=lp, token_bytes=b)
            for b, lp in ((piece(t), lp) for t, lp in top)
        ],
    )
