"""Find the JSON schemas that hurt the backends' structured-output path, and check that it refuses
them instead.

Both text backends follow a JSON schema (response_format, or with --tools a forced tool call's
parameters) through backends/runtime/constrain.py: llguidance compiles it, then masks the tokens
each step allows. For each shape of schema (a bound, a width, a nesting that grows some cost
with a value) the value is bisected for the largest one that works and the smallest that fails,
then for the smallest harmful one. Every trial runs in a child process, with a memory limit and
a CPU-time limit, over the real SmolLM2 GGUF's vocabulary (loaded vocab_only: a constraint needs
no weights), taking the backend's own path on a thread with the engine threads' stack size:

    compile  Grammars.constraint(request, plan), as the backend calls it before any token:
             schema to llguidance grammar, the matcher, the first mask
    steps    --steps times: Constraint.allowed() (the mask), a seeded random pick among the
             allowed tokens (an end token never: the trial stops when only an end may follow),
             Constraint.take(token); each timed, the slowest kept

Outcomes:

    ok       compiled, and every step ran
    refused  the 400 the backend answers (invalid_json_schema or schema_too_complex), before the
             first token or at a later one: the right answer to a schema too costly to follow
    slow     compile over --slow CPU seconds (the request's own thread, a core, its memory), a
             mask or take over --slow-step (the engine thread: every sequence in the batch
             waits), or the trial over --timeout
    oom      past --memory MiB of address space (llguidance aborts the process on a failed
             allocation: the backend would die, or grow until the OS kills it)
    crash    the child died on a signal (the step it was in says where; SIGSEGV with nothing on
             stderr is a native stack overflow: --stack-mib moves it)
    error    any other exception: a bug, a 500 in production

slow, oom, crash and error are harmful: the verdict says whether the backend let any through.

One warm worker per job loads the vocabulary and llguidance's tokenizer once (~0.5 s), then forks
a fresh child for each trial, so a crash or a leak stays in its trial. The default run
(about 300 trials) takes 1-2 minutes on 2 cores.

    .venv/bin/python bench/fuzz_schemas.py [--shapes enum-size,ref-chain] [--jobs 2]
        [--timeout 10] [--slow 0.5] [--slow-step 0.05] [--steps 32] [--memory 2048]
        [--stack-mib N] [--tools] [--no-fixed] [--list]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import queue
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import ROOT

MODEL = (
    ROOT / ".cache" / "test-models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
#: What the backend must never let through.
HARMFUL = {"slow", "oom", "crash", "error"}


@dataclass(frozen=True)
class Shape:
    """A family of schemas, one per value, that grows some cost with the value. `build` gives
    the schema, or its JSON text where a dict would be too deep for json.dumps."""

    name: str
    build: Callable[[int], Any]
    low: int
    high: int
    what: str


STRING = {"type": "string"}


def _nest(
    depth: int, leaf: dict[str, Any], wrap: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    schema = leaf
    for _ in range(depth):
        schema = wrap(schema)
    return schema


def _nested_text(depth: int, before: str, after: str) -> str:
    """A schema `depth` levels deep as text: json.dumps gives up near Python's recursion limit,
    and the backend, which receives text, must be tried past it."""
    return before * depth + json.dumps(STRING) + after * depth


def _ref_chain(n: int) -> dict[str, Any]:
    definitions: dict[str, Any] = {f"d{n}": STRING}
    for i in range(n):
        definitions[f"d{i}"] = {
            "type": "object",
            "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}},
        }
    return {"$ref": "#/$defs/d0", "$defs": definitions}


def _deep_defs(n: int) -> dict[str, Any]:
    """n $defs chained, the reference to the next 8 objects deep in each: the nesting through
    references adds up (8n levels), though the text is 10 levels deep."""

    def body(i: int) -> dict[str, Any]:
        inner = {"$ref": f"#/$defs/d{i + 1}"} if i + 1 < n else STRING
        return _nest(8, inner, lambda s: {"type": "object", "properties": {"a": s}})

    return {"$ref": "#/$defs/d0", "$defs": {f"d{i}": body(i) for i in range(n)}}


def _ref_cycle(n: int) -> dict[str, Any]:
    definitions = {
        f"d{i}": {
            "type": "object",
            "properties": {"v": STRING, "x": {"$ref": f"#/$defs/d{(i + 1) % n}"}},
        }
        for i in range(n)
    }
    return {"$ref": "#/$defs/d0", "$defs": definitions}


def _recursive_tree(n: int) -> dict[str, Any]:
    children = {f"c{i}": {"$ref": "#/$defs/node"} for i in range(n)}
    node = {"type": "object", "properties": {"v": STRING, **children}}
    return {"$ref": "#/$defs/node", "$defs": {"node": node}}


def _digits(seed: str, n: int) -> int:
    """An n-digit number with no round structure (ranges of such bounds make long regexes)."""
    return int((seed * (n // len(seed) + 1))[:n])


SHAPES = [
    Shape("enum-size", lambda n: {"enum": [f"value{i}" for i in range(n)]}, 1, 1 << 18, "n values"),
    Shape(
        "const-length", lambda n: {"const": "ab" * (n // 2) + "a" * (n % 2)}, 1, 1 << 22, "n chars"
    ),
    Shape(
        "array-max-items",
        lambda n: {"type": "array", "items": STRING, "maxItems": n},
        1,
        1 << 20,
        "maxItems n",
    ),
    Shape(
        "array-min-items",
        lambda n: {"type": "array", "items": STRING, "minItems": n},
        1,
        1 << 24,
        "minItems n",
    ),
    Shape(
        "array-item-range",
        lambda n: {"type": "array", "items": STRING, "minItems": n, "maxItems": 2 * n},
        1,
        1 << 20,
        "minItems n, maxItems 2n",
    ),
    Shape(
        "prefix-items",
        lambda n: {"type": "array", "prefixItems": [STRING] * n, "items": False},
        1,
        1 << 14,
        "n prefixItems",
    ),
    Shape(
        "string-max-length",
        lambda n: {"type": "string", "maxLength": n},
        1,
        1 << 24,
        "maxLength n",
    ),
    Shape(
        "string-min-length",
        lambda n: {"type": "string", "minLength": n},
        1,
        1 << 24,
        "minLength n",
    ),
    Shape(
        "nested-arrays",
        lambda n: _nest(3, STRING, lambda s: {"type": "array", "items": s, "maxItems": n}),
        1,
        1 << 12,
        "3 arrays deep, maxItems n each (n^3 strings)",
    ),
    Shape(
        "array-nesting",
        lambda n: _nested_text(n, '{"type": "array", "items": ', "}"),
        1,
        1 << 14,
        "arrays n deep (n JSON levels)",
    ),
    Shape(
        "object-nesting",
        lambda n: _nested_text(n, '{"type": "object", "properties": {"a": ', "}}"),
        1,
        1 << 14,
        "objects n deep (2n JSON levels)",
    ),
    Shape(
        "any-of-nesting",
        lambda n: _nested_text(n, '{"anyOf": [{"type": "null"}, ', "]}"),
        1,
        1 << 14,
        "anyOf n deep (2n JSON levels)",
    ),
    Shape(
        "optional-properties",
        lambda n: {"type": "object", "properties": {f"p{i}": STRING for i in range(n)}},
        1,
        1 << 14,
        "n optional properties",
    ),
    Shape(
        "required-properties",
        lambda n: {
            "type": "object",
            "properties": {f"p{i}": STRING for i in range(n)},
            "required": [f"p{i}" for i in range(n)],
        },
        1,
        1 << 16,
        "n required properties",
    ),
    Shape(
        "any-of-width",
        lambda n: {
            "anyOf": [
                {"type": "object", "properties": {f"k{i}": STRING}, "required": [f"k{i}"]}
                for i in range(n)
            ]
        },
        1,
        1 << 14,
        "anyOf of n objects",
    ),
    Shape(
        "one-of-width",
        lambda n: {"oneOf": [{"type": "string", "const": f"c{i}"} for i in range(n)]},
        1,
        1 << 16,
        "oneOf of n consts",
    ),
    Shape(
        "all-of-width",
        lambda n: {
            "type": "object",
            "allOf": [{"properties": {f"p{i}": STRING}, "required": [f"p{i}"]} for i in range(n)],
        },
        1,
        1 << 12,
        "allOf of n objects, each requiring a property",
    ),
    Shape(
        "pattern-bounded",
        lambda n: {"type": "string", "pattern": f"^[a-z]{{0,{n}}}$"},
        1,
        1 << 20,
        "^[a-z]{0,n}$",
    ),
    Shape(
        "pattern-optional-run",
        lambda n: {"type": "string", "pattern": f"^(.?){{{n}}}$"},
        1,
        1 << 16,
        "^(.?){n}$",
    ),
    Shape(
        "pattern-nested-optional",
        lambda n: {"type": "string", "pattern": "^" + "(" * n + "a?" + "){2}" * n + "$"},
        1,
        32,
        "^((a?){2}){2}...$, n levels (2^n parts)",
    ),
    Shape(
        "pattern-groups",
        lambda n: {"type": "string", "pattern": "^" + "(" * n + "a" + ")" * n + "$"},
        1,
        1 << 16,
        "^((...(a)...))$, n groups",
    ),
    Shape(
        "pattern-alternatives",
        lambda n: {"anyOf": [{"type": "string", "pattern": f"^{i}[a-z]*{i}$"} for i in range(n)]},
        1,
        1 << 14,
        "anyOf of n strings ^i[a-z]*i$ (all open at the first character)",
    ),
    Shape(
        "pattern-properties",
        lambda n: {
            "type": "object",
            "properties": {
                f"p{i}": {"type": "string", "pattern": f"^{i}-[0-9a-f]{{{i % 9 + 1}}}$"}
                for i in range(n)
            },
            "required": [f"p{i}" for i in range(n)],
        },
        1,
        1 << 14,
        "n required properties, each with its own pattern",
    ),
    Shape(
        "pattern-intersection",
        lambda n: {
            "type": "string",
            "allOf": [{"pattern": f"^.*{chr(97 + i % 26)}{i}.*$"} for i in range(n)],
        },
        1,
        1 << 10,
        "allOf of n patterns ^.*<a0>.*$ (a string containing them all)",
    ),
    Shape(
        "integer-range",
        lambda n: {"type": "integer", "minimum": -(10**n), "maximum": 10**n},
        1,
        400,
        "minimum -10^n, maximum 10^n",
    ),
    Shape(
        "integer-range-ragged",
        lambda n: {
            "type": "integer",
            "minimum": _digits("314159265358979", n),
            "maximum": _digits("271828182845904", n + 1),
        },
        1,
        400,
        "n-digit minimum, n+1-digit maximum, no round digits",
    ),
    Shape(
        "number-range",
        lambda n: {
            "type": "number",
            "minimum": float(f"-3.14159265358979e{n}"),
            "maximum": float(f"2.718281828459045e{n}"),
        },
        1,
        307,
        "minimum -3.14e n, maximum 2.71e n",
    ),
    Shape(
        "number-range-fraction",
        lambda n: {
            "type": "number",
            "exclusiveMinimum": float(f"0.{'0' * n}314159"),
            "exclusiveMaximum": float(f"0.{'0' * n}314160"),
        },
        1,
        300,
        "0.<n zeros>314159 < x < 0.<n zeros>314160",
    ),
    Shape(
        "multiple-of-integer",
        lambda n: {"type": "integer", "multipleOf": n},
        1,
        1 << 62,
        "integer, multipleOf n",
    ),
    Shape(
        "multiple-of-decimal",
        lambda n: {"type": "number", "multipleOf": float(f"1e-{n}")},
        1,
        320,
        "number, multipleOf 10^-n",
    ),
    Shape(
        "multiple-of-in-range",
        lambda n: {"type": "integer", "multipleOf": 7, "minimum": 3, "maximum": 10**n + 5},
        1,
        400,
        "integer, multipleOf 7, 3 <= x <= 10^n + 5",
    ),
    Shape("ref-chain", _ref_chain, 1, 1 << 14, "n $defs, each an object referring to the next"),
    Shape("deep-defs", _deep_defs, 1, 1 << 12, "n $defs chained, each 8 objects deep"),
    Shape("ref-cycle", _ref_cycle, 1, 1 << 14, "n $defs in a cycle of optional properties"),
    Shape("recursive-tree", _recursive_tree, 1, 1 << 12, "a node with n optional child nodes"),
]

#: Schemas tried once each.
FIXED: dict[str, Any] = {
    "left-recursive $ref": {
        "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
        "anyOf": [{"$ref": "#/$defs/a"}],
    },
    "$ref to the root": {"type": "object", "properties": {"x": {"$ref": "#"}}},
    "$ref to nothing": {"$ref": "#/$defs/missing"},
    "$ref to another document": {"$ref": "https://example.com/schema.json"},
    "not": {"not": {"type": "string"}},
    "if/then/else": {"if": {"type": "string"}, "then": {"maxLength": 3}, "else": {"type": "null"}},
    "format email": {"type": "string", "format": "email"},
    "format date-time": {"type": "string", "format": "date-time"},
    "format made up": {"type": "string", "format": "no-such-format"},
    "backreference": {"type": "string", "pattern": "^(a)\\1$"},
    "lookahead": {"type": "string", "pattern": "^(?=a)a+$"},
    "invalid regex": {"type": "string", "pattern": "^(a$"},
    "(a+)+$": {"type": "string", "pattern": "^(a+)+$"},
    "^(.?){21}$ (2 s a token on GBNF)": {"type": "string", "pattern": "^(.?){21}$"},
    "minLength > maxLength": {"type": "string", "minLength": 5, "maxLength": 2},
    "minimum > maximum": {"type": "integer", "minimum": 5, "maximum": 1},
    "empty enum": {"enum": []},
    "false": False,
    "true": True,
    "not an object": [1, 2],
    "not JSON": "{not json",
    "uniqueItems": {"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True},
    "every type": {"type": ["string", "number", "integer", "boolean", "array", "object", "null"]},
    "unknown type": {"type": "strng"},
    "const 10^400": {"const": 10**400},
    "maximum 1e400 (inf)": '{"type": "number", "maximum": 1e400}',
    "NaN": '{"type": "number", "minimum": NaN}',
    "multipleOf 0": {"type": "number", "multipleOf": 0},
    "multipleOf -3": {"type": "integer", "multipleOf": -3},
    "multipleOf 0.07": {"type": "number", "multipleOf": 0.07},
    "maxItems 10000": {"type": "array", "items": STRING, "maxItems": 10000},
    "maxLength 20000": {"type": "string", "maxLength": 20000},
    "anyOf of 2200 objects": {
        "anyOf": [
            {"type": "object", "properties": {f"k{i}": STRING}, "required": [f"k{i}"]}
            for i in range(2200)
        ]
    },
    "patternProperties": {
        "type": "object",
        "patternProperties": {"^[a-z]+$": {"type": "integer"}, "^[0-9]+$": STRING},
    },
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "propertyNames": {"type": "object", "propertyNames": {"pattern": "^[a-z]{3}$"}},
}


# One trial, in a child forked from a warm worker -------------------------------------------------


def _say(**event: Any) -> None:
    # Straight to the file descriptor: a forked child must not share Python's buffer.
    os.write(1, (json.dumps(event) + "\n").encode())


def run_worker(model_path: str) -> None:
    """A warm worker: loads the vocabulary and llguidance's tokenizer once, then forks a child
    for each trial it reads (one JSON line each) and reports how the child ended."""
    from functools import partial

    import llama_cpp
    import numpy as np
    from llama_cpp._internals import LlamaModel
    from llama_cpp._logger import set_verbose

    from backends.llama.backend import _llguidance_tokenizer
    from backends.runtime.constrain import Grammars
    from protos.hearth.backend.v1 import backend_pb2 as pb

    set_verbose(False)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True  # the tokenizer is all a constraint reads: no weights
    model = LlamaModel(path_model=model_path, params=params, verbose=False)
    width = model.n_vocab()
    grammars = Grammars(partial(_llguidance_tokenizer, model), width)
    ends = np.zeros(width, dtype=np.bool_)
    ends[[t for t in range(width) if llama_cpp.llama_vocab_is_eog(model.vocab, t)]] = True
    warm_up = pb.GenerateRequest()
    warm_up.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT
    limits = _limits_of(lambda: grammars.constraint(warm_up, None))  # builds the tokenizer too
    _say(
        event="ready",
        vocabulary=width,
        ends=int(ends.sum()),
        address_mib=_address_space_mib(),
        limits=limits,
        llguidance=importlib.metadata.version("llguidance"),
        llama_cpp=importlib.metadata.version("llama-cpp-python"),
    )
    for line in sys.stdin:
        spec = json.loads(line)
        with tempfile.TemporaryFile() as errors:
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.dup2(errors.fileno(), 2)
                    _child(spec, grammars, ends)
                except BaseException:  # anything here is the harness's own failure
                    code = 3
                os._exit(code)
            status, usage, killed = _wait(pid, spec["wall_seconds"])
            errors.seek(0, os.SEEK_END)
            errors.seek(max(0, errors.tell() - 2000))
            tail = errors.read().decode(errors="replace")
        _say(
            event="exit",
            status=status,
            killed=killed,
            cpu=usage.ru_utime + usage.ru_stime,
            peak_mib=usage.ru_maxrss >> 10,
            stderr=tail,
        )


def _limits_of(compile_one: Callable[[], Any]) -> dict[str, Any]:
    """The LLParserLimits the backend's path makes, seen while it compiles one constraint."""
    import llguidance

    made = []
    real = llguidance.LLParserLimits

    def recorded(**kwargs: Any) -> Any:
        made.append(real(**kwargs))
        return made[-1]

    setattr(llguidance, "LLParserLimits", recorded)  # noqa: B010 (mypy: not a type)
    try:
        compile_one()
    finally:
        setattr(llguidance, "LLParserLimits", real)  # noqa: B010
    names = ["max_items_in_row", "step_max_items", "step_lexer_fuel", "initial_lexer_fuel"]
    names += ["max_lexer_states", "max_grammar_size", "precompute_large_lexemes"]
    return {name: getattr(made[-1], name) for name in names} if made else {}


def _address_space_mib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) >> 10
    return 0


def _wait(pid: int, wall_seconds: float) -> tuple[int, resource.struct_rusage, bool]:
    """Wait for a child, killing it past `wall_seconds`: its exit code or -signal, its usage."""
    deadline = time.monotonic() + wall_seconds
    killed = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), usage, killed
        if not killed and time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.005)


def _child(spec: dict[str, Any], grammars: Any, ends: Any) -> None:
    memory = spec["memory_mib"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # CPU time, not wall time: other work on the machine must not make a trial look slow.
    cpu = math.ceil(spec["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    # The backend compiles and masks on engine threads of a set stack size: so does the trial.
    threading.stack_size(spec["stack_bytes"])
    worker = threading.Thread(target=_guarded_steps, args=(spec, grammars, ends))
    worker.start()
    worker.join()


def _guarded_steps(spec: dict[str, Any], grammars: Any, ends: Any) -> None:
    try:
        _steps(spec, grammars, ends)
    except MemoryError:
        _say(event="done", outcome="oom", detail="MemoryError")
    except BaseException as exc:  # the backend would answer 500
        frames = traceback.extract_tb(exc.__traceback__)
        # Where the project's code called what raised: the line to fix.
        ours = [f for f in frames if f.filename.startswith(str(ROOT / "backends"))]
        where = (ours or frames)[-1]
        file = Path(where.filename).relative_to(ROOT) if ours else Path(where.filename).name
        detail = f"{type(exc).__name__}: {exc} ({file}:{where.lineno})"
        _say(event="done", outcome="error", detail=detail[:300])


def _request(spec: dict[str, Any]) -> tuple[Any, Any]:
    """The backend's request for the schema: a response_format, or a named forced tool call."""
    from backends.runtime.tools import plan_tools
    from protos.hearth.backend.v1 import backend_pb2 as pb

    request = pb.GenerateRequest()
    if not spec["tools"]:
        request.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
        request.response_format.json_schema = spec["schema"]
        return request, None
    request.chat.messages.add(role="user", content="Call f.")
    request.chat.tools.add(type="function", name="f", parameters_json=spec["schema"])
    request.chat.tool_choice = json.dumps({"type": "function", "function": {"name": "f"}})
    # SmolLM2's template renders no tools: the backend describes them, hermes-style.
    return request, plan_tools(request.chat, None, constrained=True)


def _steps(spec: dict[str, Any], grammars: Any, ends: Any) -> None:
    """The backend's path for one schema, saying each step before it starts."""
    import numpy as np

    from backends.runtime.errors import BackendError

    _say(event="begin", step="compile")
    started = time.thread_time()
    try:
        request, plan = _request(spec)
        constraint = grammars.constraint(request, plan)
    except BackendError as exc:
        seconds = time.thread_time() - started
        _say(event="refused", at="compile", seconds=seconds, reason=exc.reason, message=exc.message)
        return
    _say(event="compiled", seconds=time.thread_time() - started)
    random = np.random.default_rng(spec["seed"])
    worst, worst_at = 0.0, ""
    taken = 0
    for step in range(spec["steps"]):
        _say(event="begin", step=f"mask {step}")
        started = time.thread_time()
        allowed = constraint.allowed()
        if (seconds := time.thread_time() - started) > worst:
            worst, worst_at = seconds, f"mask {step}"
        if allowed is None:
            failure = constraint.failure()
            _say(event="refused", at=f"mask {step}", reason=failure.reason, message=failure.message)
            break
        choices = np.flatnonzero(allowed & ~ends)
        if not len(choices):
            break  # only an end may follow: the backend finishes the answer here
        token = int(choices[random.integers(len(choices))])
        _say(event="begin", step=f"take {step}")
        started = time.thread_time()
        failure = constraint.take(token)
        if (seconds := time.thread_time() - started) > worst:
            worst, worst_at = seconds, f"take {step}"
        if failure is not None:
            _say(event="refused", at=f"take {step}", reason=failure.reason, message=failure.message)
            break
        taken += 1
        if constraint.complete:
            break
    _say(event="done", outcome="ok", tokens=taken, step_seconds=worst, step_at=worst_at)


# Trials, seen from the parent ---------------------------------------------------------------------


@dataclass
class Trial:
    """What one child said, and how it ended."""

    value: int
    outcome: str = "ok"
    step: str = ""
    detail: str = ""
    reason: str = ""
    compile_seconds: float = 0.0
    #: The slowest mask or take, and which it was.
    step_seconds: float = 0.0
    step_at: str = ""
    tokens: int = 0
    cpu: float = 0.0
    peak_mib: int = 0
    size: int = 0

    @property
    def harmful(self) -> bool:
        return self.outcome in HARMFUL

    @property
    def failed(self) -> bool:
        return self.outcome != "ok"

    def label(self) -> str:
        where = f"@{self.step}" if self.step and self.outcome != "ok" else ""
        return f"{self.outcome}{where}"


@dataclass
class Settings:
    model: str
    timeout: float
    slow: float
    slow_step: float
    steps: int
    memory_mib: int
    stack_mib: int
    precision: float
    tools: bool
    seed: int


class Worker:
    """One warm worker process, and its pipes."""

    def __init__(self, settings: Settings) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--model", settings.model],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        ready = self.event()
        if ready is None or ready["event"] != "ready":
            raise RuntimeError("the worker failed to start (try a trial by hand)")
        self.ready = ready

    def send(self, spec: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(spec) + "\n").encode())
        self.process.stdin.flush()

    def event(self) -> dict[str, Any] | None:
        assert self.process.stdout is not None
        while line := self.process.stdout.readline():
            try:
                return dict(json.loads(line))
            except ValueError:
                continue
        return None

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


class Workers:
    """A pool of warm workers, one per job: a trial borrows one, and replaces it if it died."""

    def __init__(self, settings: Settings, jobs: int) -> None:
        self.settings = settings
        with ThreadPoolExecutor(jobs) as pool:
            started = list(pool.map(lambda _: Worker(settings), range(jobs)))
        self.ready = started[0].ready
        self._idle: queue.Queue[Worker] = queue.Queue()
        for worker in started:
            self._idle.put(worker)
        self._all = list(started)

    def trial(self, schema: Any, value: int, name: str) -> Trial:
        """Run one schema in a fresh child of a warm worker and classify what happened."""
        settings = self.settings
        try:
            text = _as_sent(schema, settings.tools)
        except ValueError as exc:
            return Trial(value, "refused", "gateway", str(exc), reason="gateway")
        spec = {
            "schema": text,
            "tools": settings.tools,
            "steps": settings.steps,
            "seed": zlib.crc32(f"{name}:{value}".encode()) ^ settings.seed,
            "cpu_seconds": settings.timeout,
            "wall_seconds": 3 * settings.timeout + 30,
            "memory_mib": settings.memory_mib,
            "stack_bytes": settings.stack_mib << 20,
        }
        worker = self._idle.get()
        try:
            worker.send(spec)
            events = []
            while (event := worker.event()) is not None:
                events.append(event)
                if event["event"] == "exit":
                    break
            else:
                worker = self._replace(worker)
                return Trial(value, "crash", detail="the worker died", size=len(text))
        finally:
            self._idle.put(worker)
        return _classify(Trial(value, size=len(text)), events, settings)

    def _replace(self, dead: Worker) -> Worker:
        dead.process.kill()
        dead.process.wait()
        worker = Worker(self.settings)
        self._all = [worker if w is dead else w for w in self._all]
        return worker

    def close(self) -> None:
        for worker in self._all:
            worker.close()


def _as_sent(schema: Any, tools: bool) -> str:
    """The schema's text as the gateway hands it to the backend. A response_format's schema goes
    as the client wrote it (tried past what the gateway decodes: the backend must cope alone); a
    tool's parameters only as the gateway's decoder (msgspec) reads them, an object."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    if not tools:
        return text
    import msgspec

    try:
        decoded = msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ValueError(f"the gateway cannot read it: {exc}") from None
    if not isinstance(decoded, dict):
        raise ValueError("the gateway takes a tool's parameters only as an object")
    try:
        return json.dumps(decoded)
    except RecursionError:
        raise ValueError("the gateway cannot write it: too deep for json.dumps") from None


def _classify(result: Trial, events: list[dict[str, Any]], settings: Settings) -> Trial:
    step = ""
    for event in events:
        kind = event["event"]
        if kind == "begin":
            step = event["step"]
        elif kind == "compiled":
            result.compile_seconds = event["seconds"]
        elif kind == "refused":
            result.outcome, result.step = "refused", event["at"]
            result.compile_seconds = event.get("seconds", result.compile_seconds)
            result.reason = event["reason"]
            result.detail = event["message"]
        elif kind == "done":
            if event["outcome"] != "ok":
                result.outcome, result.step, result.detail = event["outcome"], step, event["detail"]
            result.tokens = event.get("tokens", 0)
            result.step_seconds = event.get("step_seconds", 0.0)
            result.step_at = event.get("step_at", "")
        elif kind == "exit":
            result.cpu, result.peak_mib = event["cpu"], event["peak_mib"]
            _classify_exit(result, event, step, settings)
    if result.outcome not in ("ok", "refused"):
        return result
    otherwise = f"({result.outcome} otherwise)"
    if result.compile_seconds > settings.slow:
        result.outcome, result.step = "slow", "compile"
        result.detail = f"compile took {result.compile_seconds:.2f} s CPU {otherwise}"
    elif result.step_seconds > settings.slow_step:
        result.outcome, result.step = "slow", result.step_at
        result.detail = f"a step took {_ms(result.step_seconds)} CPU {otherwise}"
    return result


def _classify_exit(result: Trial, event: dict[str, Any], step: str, settings: Settings) -> None:
    status, stderr = event["status"], event["stderr"].strip()
    last = stderr.splitlines()[-1][:200] if stderr else ""
    if event["killed"]:
        result.outcome, result.step = "slow", step
        result.detail = f"still running after {3 * settings.timeout + 30:.0f} s"
    elif status == -signal.SIGXCPU:
        result.outcome, result.step = "slow", step
        result.detail = f"over {settings.timeout:.0f} s of CPU"
    elif status < 0 and "memory allocation" in stderr:
        said = next(line for line in stderr.splitlines() if "memory allocation" in line)
        result.outcome, result.step, result.detail = "oom", step, said
    elif status < 0:
        result.outcome, result.step = "crash", step
        result.detail = f"{signal.Signals(-status).name}: {last or 'nothing on stderr'}"
    elif status > 0:
        result.outcome, result.step, result.detail = "crash", step, f"exit {status}: {last}"


# Bisection --------------------------------------------------------------------------------------


@dataclass
class Finding:
    """What bisecting one shape found."""

    shape: Shape
    largest_ok: Trial | None = None
    first_failure: Trial | None = None
    first_harmful: Trial | None = None
    trials: list[Trial] = field(default_factory=list)


def explore(
    shape: Shape, workers: Workers, settings: Settings, log: Callable[[str], None]
) -> Finding:
    """Bisect a shape for its largest working value and its smallest failing, then harmful, one."""
    finding = Finding(shape)
    tried: dict[int, Trial] = {}

    def at(value: int) -> Trial:
        if value not in tried:
            tried[value] = workers.trial(shape.build(value), value, shape.name)
            finding.trials.append(tried[value])
            found = tried[value]
            log(f"{shape.name} {value}: {found.label()} {_plain(found.detail, 100)}")
        return tried[value]

    if at(shape.low).failed:
        finding.first_failure = tried[shape.low]
        finding.first_harmful = tried[shape.low] if tried[shape.low].harmful else None
        return finding
    if not at(shape.high).failed:
        finding.largest_ok = tried[shape.high]
        return finding
    good, bad = _bisect(shape.low, shape.high, lambda v: not at(v).failed, settings.precision)
    finding.largest_ok, finding.first_failure = tried[good], tried[bad]
    if tried[bad].harmful:
        finding.first_harmful = tried[bad]
    elif tried[shape.high].harmful:
        _, harmful = _bisect(bad, shape.high, lambda v: not at(v).harmful, settings.precision)
        finding.first_harmful = tried[harmful]
    # Any other harmful value seen on the way counts too, bisection or not.
    if finding.first_harmful is None:
        finding.first_harmful = min(
            (t for t in finding.trials if t.harmful), key=lambda t: t.value, default=None
        )
    return finding


def _bisect(good: int, bad: int, works: Callable[[int], bool], precision: float) -> tuple[int, int]:
    """Narrow [good, bad] until they are next to each other, or within the precision."""
    while bad - good > max(1, int(good * precision)):
        # Geometric steps while the range spans orders of magnitude, halving after.
        middle = math.isqrt(good * bad) if bad > 4 * good else (good + bad) // 2
        middle = min(max(middle, good + 1), bad - 1)
        if works(middle):
            good = middle
        else:
            bad = middle
    return good, bad


# The report ------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _size(size: int) -> str:
    if size >= 1e6:
        return f"{size / 1e6:.1f} MB"
    return f"{size / 1e3:.0f} kB" if size >= 1e4 else f"{size} B"


_PREFIXES = re.compile(
    r"cannot constrain output to (this JSON schema|the tools' parameters): "
    r"|at \d+\(\d+\): failed to compile JSON schema: "
)


def _plain(detail: str, width: int) -> str:
    """A message on one line, without the backend's common prefixes, cut to `width`."""
    return " ".join(_PREFIXES.sub("", detail).split())[:width]


def _smallest(trials: list[Trial], outcomes: set[str]) -> Trial | None:
    return min((t for t in trials if t.outcome in outcomes), key=lambda t: t.value, default=None)


def _what(found: Trial) -> str:
    """A trial in a line: where it ended and why, its schema's size, what it cost."""
    cost = f"{_size(found.size)} schema, {found.cpu:.1f} s CPU, peak RSS {found.peak_mib} MiB"
    return f"{found.label()}: {_plain(found.detail, 150)} [{cost}]"


def report(findings: list[Finding], fixed: dict[str, Trial], settings: Settings) -> None:
    header = ("shape", "largest ok", "schema", "compile", "step", "smallest refused", "harmful")
    rows = [header]
    for finding in findings:
        ok = finding.largest_ok
        oks = [t for t in finding.trials if t.outcome == "ok"]
        refused = _smallest(finding.trials, {"refused"})
        first_harm = _smallest(finding.trials, HARMFUL)
        rows.append(
            (
                finding.shape.name,
                str(ok.value) if ok else "-",
                _size(ok.size) if ok else "-",
                _ms(max(t.compile_seconds for t in oks)) if oks else "-",
                _ms(max(t.step_seconds for t in oks)) if oks else "-",
                f"{refused.value} @{refused.step}" if refused else "-",
                f"{first_harm.value} {first_harm.label()}" if first_harm else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print(
        "\nlargest ok: the largest value that worked (bisected); compile: the slowest\n"
        "Grammars.constraint (to the first mask) among the values that worked; step: the slowest\n"
        "mask or take among them; harmful: the smallest harmful value seen. Times are CPU.\n"
    )
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print()
    for finding in findings:
        refused = _smallest(finding.trials, {"refused"})
        harms = sorted((t for t in finding.trials if t.harmful), key=lambda t: t.value)
        if not refused and not harms:
            continue
        print(f"{finding.shape.name}: {finding.shape.what}")
        if refused:
            print(f"    refused at {refused.value}: {_plain(refused.detail, 160)}")
        for found in {id(t): t for t in (harms[:1] + harms[-1:])}.values():
            print(f"    {found.value}: {_what(found)}")
    print()
    width = max((len(name) for name in fixed), default=0)
    for name, found in fixed.items():
        timing = f"compile {_ms(found.compile_seconds)}"
        if found.outcome == "ok":
            timing += f", step {_ms(found.step_seconds)}"
        print(f"{name:{width}}  {found.label():16} {timing:28} {_plain(found.detail, 90)}")
    every = [t for f in findings for t in f.trials] + list(fixed.values())
    counts = {o: sum(t.outcome == o for t in every) for o in ("ok", "refused", *sorted(HARMFUL))}
    print()
    print(f"{len(every)} trials: " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    named: list[tuple[str, Trial]] = [(f.shape.name, t) for f in findings for t in f.trials]
    named += fixed.items()
    worked = [(name, t) for name, t in named if t.outcome == "ok"]
    if worked:
        name, slowest = max(worked, key=lambda pair: pair[1].compile_seconds)
        step_name, step = max(worked, key=lambda pair: pair[1].step_seconds)
        print(
            f"the schemas that worked: compile at most {_ms(slowest.compile_seconds)} "
            f"({name} {slowest.value}), a step at most {_ms(step.step_seconds)} "
            f"({step_name} {step.value}); the largest peak RSS of any trial "
            f"{max(t.peak_mib for t in every)} MiB"
        )
    late = [t for t in every if t.outcome == "refused" and t.step not in ("compile", "gateway")]
    if late:
        print(f"{len(late)} refused after compiling: at a token, not a 400 before the first")
    harmful = [(name, t) for name, t in named if t.harmful]
    if not harmful:
        print(
            f"VERDICT: no harmful schema got through: every costly one was refused (no compile "
            f"over {settings.slow} s, no step over {_ms(settings.slow_step)}, no crash, no oom, "
            f"no 500)"
        )
        return
    shapes = sorted({name for name, _ in harmful}, key=[n for n, _ in named].index)
    print(
        f"VERDICT: the backend's path let {len(harmful)} harmful schemas through, "
        f"in {len(shapes)} shape{'s' if len(shapes) > 1 else ''}:"
    )
    for shape in shapes:
        ones = sorted((t for name, t in harmful if name == shape), key=lambda t: t.value)
        print(f"    {shape}: {len(ones)}, from {ones[0].value}: {_what(ones[0])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [shape.name for shape in SHAPES]
    parser.add_argument("--shapes", help=f"comma-separated, of: {', '.join(names)}")
    parser.add_argument("--jobs", type=int, default=2, help="trials at once")
    parser.add_argument("--timeout", type=float, default=10.0, help="CPU seconds per trial")
    parser.add_argument("--slow", type=float, default=0.5, help="CPU seconds a compile may take")
    parser.add_argument(
        "--slow-step", type=float, default=0.05, help="CPU seconds a mask or take may take"
    )
    parser.add_argument("--steps", type=int, default=32, help="tokens to take per trial")
    parser.add_argument(
        "--memory", type=int, default=2048, help="MiB of address space a trial may map"
    )
    parser.add_argument(
        "--stack-mib", type=int, default=0, help="the trial thread's stack (0: the engine's)"
    )
    parser.add_argument("--precision", type=float, default=0.05, help="relative, when bisecting")
    parser.add_argument("--seed", type=int, default=0, help="for the tokens picked")
    parser.add_argument("--tools", action="store_true", help="as a forced tool call's parameters")
    parser.add_argument("--model", default=str(MODEL), help="GGUF file (its vocabulary)")
    parser.add_argument("--no-fixed", action="store_true", help="skip the fixed cases")
    parser.add_argument("--list", action="store_true", help="list the shapes and stop")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.model)
        return
    if args.list:
        for shape in SHAPES:
            print(f"{shape.name:24} {f'{shape.low}..{shape.high}':24} {shape.what}")
        print(f"and {len(FIXED)} fixed cases: {', '.join(FIXED)}")
        return
    if not Path(args.model).is_file():
        sys.exit(f"no model at {args.model}: run the real-model tests once, or pass --model")
    chosen = names if not args.shapes else args.shapes.split(",")
    if unknown := set(chosen) - set(names):
        sys.exit(f"no such shape: {', '.join(sorted(unknown))} (see --list)")
    settings = Settings(
        model=args.model,
        timeout=args.timeout,
        slow=args.slow,
        slow_step=args.slow_step,
        steps=args.steps,
        memory_mib=args.memory,
        stack_mib=args.stack_mib or _engine_stack_mib(),
        precision=args.precision,
        tools=args.tools,
        seed=args.seed,
    )
    started = time.monotonic()
    lock = threading.Lock()

    def log(line: str) -> None:
        with lock:
            print(f"[{time.monotonic() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    workers = Workers(settings, args.jobs)
    _parameters(settings, args, workers.ready)
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            fixed_runs = {}
            if not args.no_fixed:
                fixed_runs = {
                    name: pool.submit(workers.trial, schema, 0, name)
                    for name, schema in FIXED.items()
                }
            shapes = [s for s in SHAPES if s.name in chosen]
            findings = list(pool.map(lambda s: explore(s, workers, settings, log), shapes))
            fixed = {name: run.result() for name, run in fixed_runs.items()}
    finally:
        workers.close()
    report(findings, fixed, settings)
    print(f"({time.monotonic() - started:.0f} s, {args.jobs} jobs, {os.cpu_count()} cores)")


def _engine_stack_mib() -> int:
    from backends.runtime.server import ENGINE_STACK_BYTES

    return ENGINE_STACK_BYTES >> 20


def _parameters(settings: Settings, args: argparse.Namespace, ready: dict[str, Any]) -> None:
    print(
        f"llguidance {ready['llguidance']}, llama-cpp-python {ready['llama_cpp']}; "
        f"{Path(settings.model).name}: {ready['vocabulary']} tokens ({ready['ends']} end tokens)"
    )
    limits = ", ".join(f"{name} {value}" for name, value in ready["limits"].items())
    print(f"LLParserLimits as constrain.py makes them: {limits}")
    path = "a forced tool call's parameters" if settings.tools else "response_format json_schema"
    print(
        f"path: {path}; {settings.steps} steps; slow: compile over {settings.slow} s or a step "
        f"over {_ms(settings.slow_step)} (CPU); timeout {settings.timeout} s CPU; memory "
        f"{settings.memory_mib} MiB of address space (a warm worker maps "
        f"{ready['address_mib']}); stack {settings.stack_mib} MiB; precision "
        f"{settings.precision}; seed {settings.seed}; {args.jobs} jobs"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
