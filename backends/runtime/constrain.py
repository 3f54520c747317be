"""Structured output on every text backend: a JSON schema (response_format) or a forced tool call
written in the model's call format, enforced token by token with llguidance.

A backend builds one `Grammars` per model, from a function that makes llguidance's view of the
model's tokenizer (Hugging Face's tokenizer on transformers, llama.cpp's vocabulary on llama),
and asks it for each request's `Constraint`; before each token it sets the logits of the tokens
the constraint forbids to -inf, then samples as it would, and hands the token to `take`.

llguidance compiles a schema in about a millisecond, computes each token's mask in tens of
microseconds on a 49k vocabulary, and bounds the work of every step (`LLParserLimits`): a schema
it cannot follow, or one too costly to follow, is refused with a message. What those limits do
not bound (a deep chain of `$ref`s crashes it, some `multipleOf`s take minutes) is refused
first by schema_cost.py. The forced call is a Lark grammar whose JSON part is the call's schema
(`%json`), between the text the model's family writes around a call.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from backends.runtime import schema_cost
from backends.runtime.errors import BackendError, invalid
from backends.runtime.tools import ToolPlan
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Reason

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

#: Whitespace allowed between JSON tokens: none or one space, as llama-cpp-python's JSON grammars
#: allow. A small model given newlines and indents (llama.cpp's server allows 20) spends its
#: budget on them: a tiny random one ran out of 200 tokens inside a forced call's arguments.
WHITESPACE = r" ?"
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_pattern": WHITESPACE}

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

    def forbid(self, logits: np.ndarray) -> bool:
        """Set the logits (one row, written in place) of the tokens that may not come next to
        -inf; False, leaving them alone, when no token may (the grammar failed: see `failure`)."""
        allowed = self.allowed()
        if allowed is None:
            return False
        np.putmask(logits, ~allowed[: logits.shape[-1]], -np.inf)
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
    """Compiles the constraints of one model's requests. `tokenizer` makes llguidance's view of
    the model's tokenizer, built on the first constrained request (0.2-0.3 s for a 49k
    vocabulary) and kept; `width` is how many tokens a mask covers (the model's logits)."""

    def __init__(self, tokenizer: Callable[[], Any], width: int) -> None:
        self._make_tokenizer = tokenizer
        self._width = width
        self._lock = threading.Lock()
        self._compiled: Any = None

    def constraint(self, request: pb.GenerateRequest, plan: ToolPlan | None) -> Constraint | None:
        """The constraint a request asks for (None: its output is free): a forced tool call
        before its response_format, as on llama."""
        import llguidance

        if plan is not None and plan.forced is not None and plan.parser is not None:
            before, after = FORCED_CALL[plan.parser.family]
            schema_cost.check(plan.forced, "tools")
            try:
                call = {**closed(plan.forced), "x-guidance": _JSON_OPTIONS}
                text = json.dumps(call)
            except RecursionError:
                raise _bad_schema("it is nested too deeply", "tools") from None
            grammar = f"start: {before}call{after}\ncall: %json {text}"
            return self._compile(grammar, param="tools")
        kind = request.response_format.type
        if kind == pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
            schema: Any = {"type": "object"}
        elif kind == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
            schema = _schema(request.response_format.json_schema)
        else:
            return None
        schema_cost.check(schema, "response_format")
        try:
            schema = closed(schema)
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
        with self._lock:
            if self._compiled is None:
                self._compiled = self._make_tokenizer()
            return self._compiled


def closed(schema: Any, *, part_of_all: bool = False) -> Any:
    """`schema` with each object that lists `properties` and says nothing of other keys closed
    to them (`additionalProperties: false`), as llama.cpp's JSON grammars read such an object:
    held to JSON Schema's open default, a small model goes on writing keys nobody asked for. A
    member of an `allOf` (or of `dependentSchemas`) stays open (closed, each would refuse the
    others' keys)."""
    if not isinstance(schema, dict):
        return schema
    result = dict(schema)
    for key in schema_cost.ONE:
        if isinstance(result.get(key), dict):
            result[key] = closed(result[key])
    for key in schema_cost.MANY:
        if isinstance(result.get(key), list):
            inner = key == "allOf"
            result[key] = [closed(member, part_of_all=inner) for member in result[key]]
    for key in schema_cost.NAMED:
        if isinstance(result.get(key), dict):
            applied = key == "dependentSchemas"  # applied beside this object, as allOf's are
            result[key] = {
                name: closed(value, part_of_all=applied) for name, value in result[key].items()
            }
    says_more = {"additionalProperties", "unevaluatedProperties", "patternProperties"}
    if "properties" in result and not part_of_all and not says_more & result.keys():
        result["additionalProperties"] = False
    return result


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
