"""Structured output for Transformers models: a JSON schema (response_format) or a forced tool call
written in the model's call format, enforced token by token with llguidance.

llguidance compiles a schema in about a millisecond, computes each token's mask in tens of
microseconds on a 49k vocabulary, and bounds the work of every step (`LLParserLimits`): a schema
it cannot follow, or one too costly to follow, is refused with a message, never a crash or a
stall. The forced call is a Lark grammar whose JSON part is the call's schema (`%json`), between
the text the model's family writes around a call, as the llama backend's GBNF wrappers do.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from backends.runtime import BackendError, invalid
from backends.runtime.tools import ToolPlan
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Reason

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

#: Whitespace allowed between JSON tokens: none, a space, or a newline and an indent of up to
#: 20, as llama.cpp's JSON grammars allow. Unbounded whitespace lets a model loop on blank lines.
WHITESPACE = r"(?:[ ]|\n[ \t]{0,20})?"
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_pattern": WHITESPACE}
_NUMPY_FLOATS = frozenset({"torch.float32", "torch.float64", "torch.float16"})

#: What a forced tool call is wrapped in, by the model's tool-call format (Lark, around `call`).
FORCED_CALL = {
    "hermes": ('"<tool_call>" "\\n"? ', ' "\\n"? "</tool_call>"'),
    "llama3": ("", ""),
    "mistral": ('"[TOOL_CALLS] [" ', ' "]"'),
}


class Constraint:
    """One generation's grammar: which tokens may come next, advanced by each token taken."""

    def __init__(self, matcher: Any, width: int, param: str) -> None:
        self._matcher = matcher
        self._width = width
        self._param = param
        self._bits = np.zeros((width + 31) // 32, dtype=np.int32)
        self._taken = 0

    def forbid(self, scores: Any) -> bool:
        """Set the scores (one row of logits) of the tokens that may not come next to -inf;
        False, leaving them alone, when no token may (the grammar failed: see `failure`)."""
        import torch

        allowed = self.allowed()
        if allowed is None:
            return False
        banned = ~allowed[: scores.shape[-1]]
        if scores.device.type == "cpu" and str(scores.dtype) in _NUMPY_FLOATS:
            # numpy's one thread: torch's own masked_fill_ on a CPU its threads share with
            # other work waits for them, 10 ms a token and more.
            np.putmask(scores.numpy(), banned, -np.inf)
        else:
            scores.masked_fill_(torch.from_numpy(banned).to(scores.device), float("-inf"))
        return True

    def allowed(self) -> np.ndarray | None:
        """Which tokens may come next; None when none may."""
        bits = self._bits
        self._matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        if self._matcher.is_error() or not bits.any():
            return None
        # Token t is bit t % 32 of word t // 32; the words are little-endian int32.
        flags = np.unpackbits(bits.view(np.uint8), bitorder="little")[: self._width]
        return flags.view(np.bool_)

    def take(self, token: int) -> BackendError | None:
        """Advance past the model's token; the error that ends the answer, if it cannot."""
        if not self._matcher.consume_token(token):
            return self.failure()
        self._taken += 1
        return None

    @property
    def complete(self) -> bool:
        """The grammar is satisfied and allows nothing more: the answer is whole."""
        return bool(self._matcher.is_stopped())

    def failure(self) -> BackendError:
        """Why no token may follow (a step past llguidance's limits, most likely)."""
        return BackendError(
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.SCHEMA_TOO_COMPLEX,
            f"the output constraint failed after {self._taken} tokens: "
            f"{self._matcher.get_error() or 'no token can follow'}",
            param=self._param,
        )


class Grammars:
    """Compiles the constraints of one model's requests (llguidance's view of the tokenizer is
    built on first use: about 0.3 s for a 49k vocabulary)."""

    def __init__(self, tokenizer: Any, width: int, end_tokens: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        # Tokens the mask covers: the model's logits, or a tokenizer with more (the extra
        # ones are never allowed where the logits end).
        self._width = max(width, len(tokenizer))
        self._end_tokens = sorted(end_tokens)
        self._lock = threading.Lock()
        self._compiled: Any = None

    def constraint(self, request: pb.GenerateRequest, plan: ToolPlan | None) -> Constraint | None:
        """The constraint a request asks for (None: its output is free): a forced tool call
        before its response_format, as on llama."""
        import llguidance

        if plan is not None and plan.forced is not None and plan.parser is not None:
            before, after = FORCED_CALL[plan.parser.family]
            call = {**plan.forced, "x-guidance": _JSON_OPTIONS}  # closed: tools.py
            grammar = f"start: {before}call{after}\ncall: %json {json.dumps(call)}"
            return self._compile(grammar, param="tools")
        kind = request.response_format.type
        if kind == pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
            schema: Any = {"type": "object"}
        elif kind == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
            schema = _schema(request.response_format.json_schema)
        else:
            return None
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except (ValueError, TypeError, RecursionError) as exc:
            raise _bad_schema(str(exc), "response_format") from None
        return self._compile(grammar, param="response_format")

    def _compile(self, grammar: str, *, param: str) -> Constraint:
        import llguidance

        limits = llguidance.LLParserLimits(verbose_errors=False)
        matcher = llguidance.LLMatcher(self._llguidance_tokenizer(), grammar, limits=limits)
        if matcher.is_error():
            raise _bad_schema(matcher.get_error(), param)
        constraint = Constraint(matcher, self._width, param)
        # The first step here, on the caller's thread: a grammar past llguidance's limits may
        # fail at once, a 400 before any token; one that fails later ends its answer with
        # `failure` (an anyOf of 2200 objects: at the first token).
        if constraint.allowed() is None:
            failure = constraint.failure()
            raise BackendError(
                failure.code,
                failure.reason,
                f"this schema is too complex to follow: {matcher.get_error()}",
                param=param,
            )
        return constraint

    def _llguidance_tokenizer(self) -> Any:
        import llguidance.hf

        with self._lock:
            if self._compiled is None:
                try:
                    self._compiled = llguidance.hf.from_tokenizer(
                        self._tokenizer,
                        n_vocab=self._width,
                        eos_token=self._end_tokens or None,
                    )
                except ValueError as exc:  # a slow (Python) tokenizer
                    raise invalid(
                        Reason.UNSUPPORTED,
                        f"constrained output needs the model's fast tokenizer "
                        f"(tokenizer.json): {exc}",
                        param="response_format",
                    ) from None
            return self._compiled


def _schema(text: str) -> Any:
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _bad_schema(f"the schema is not JSON: {exc}", "response_format") from None
    if not isinstance(schema, (dict, bool)):
        raise _bad_schema("a JSON schema is an object (or true or false)", "response_format")
    return schema


def _bad_schema(message: str, param: str) -> BackendError:
    what = "the tools' parameters" if param == "tools" else "this JSON schema"
    return invalid(
        "invalid_json_schema", f"cannot constrain output to {what}: {message}", param=param
    )
