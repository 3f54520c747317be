"""Find the JSON schemas that break the llama backend's grammar path, and check the backend's guard.

For each shape of schema (a bound, a width, a nesting) the value is bisected for the largest one
that works and the smallest that fails. Every trial runs in a child process, with a memory limit
and a CPU-time limit, on the real SmolLM2 GGUF, taking the backend's path step by step:

    build   llama-cpp-python's json_schema_to_gbnf, as the backend calls it
    parse   llama.cpp's llama_sampler_init_grammar (NULL: llama.cpp refuses the grammar)
    sample  a few tokens through Llama.generate with the grammar, on an engine-like thread

A crash is the child dying on a signal; which step it died in says where. Outcomes:

    ok       every step worked, no token took over --slow seconds of CPU
    error    the Python port raised: the backend always answered that with a 400
    refused  llama.cpp returned NULL: llama-cpp-python passes that on, and the first sample
             crashes the process (see the fixed cases, fed on regardless)
    slow     a step took over --slow CPU seconds, or the trial over --timeout CPU seconds
    oom      out of the --memory limit
    crash    killed by a signal (SIGSEGV: a stack overflow in llama.cpp's recursive parser)

Each trial also asks the backend's own check (backends/llama/grammar.py, then llama.cpp's
acceptance) what it would do, and the table says whether it refused every harmful value (a miss
would be a crash or a stall in production) and how far below the failures its limit sits.

The default run takes about 4 minutes on 2 cores. --stack-kib shrinks the engine thread's
stack (the OS default is 8 MiB here), to see how the crash point moves with it.

    .venv/bin/python bench/fuzz_schemas.py [--shapes enum-size,array-max-items] [--jobs 2]
        [--timeout 10] [--slow 2] [--tokens 3] [--precision 0.05] [--stack-kib N] [--list]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import ROOT

MODEL = (
    ROOT / ".cache" / "test-models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
PROMPT = "Answer with JSON only.\n"
#: What the backend must never let through: refused grammars it now catches itself.
HARMFUL = {"crash", "slow", "oom"}


@dataclass(frozen=True)
class Shape:
    """A family of schemas, one per value, that grows some cost with the value."""

    name: str
    build: Callable[[int], dict[str, Any]]
    low: int
    high: int
    what: str


def _nest(
    depth: int, leaf: dict[str, Any], wrap: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    schema = leaf
    for _ in range(depth):
        schema = wrap(schema)
    return schema


def _ref_chain(n: int) -> dict[str, Any]:
    definitions: dict[str, Any] = {f"d{n}": {"type": "string"}}
    for i in range(n):
        next_ref = {"$ref": f"#/$defs/d{i + 1}"}
        definitions[f"d{i}"] = {"type": "object", "properties": {"x": next_ref}}
    return {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": definitions}


STRING = {"type": "string"}
SHAPES = [
    Shape(
        "array-max-items",
        lambda n: {"type": "array", "items": STRING, "maxItems": n},
        1,
        1 << 16,
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
        "string-max-length",
        lambda n: {"type": "string", "maxLength": n},
        1,
        1 << 16,
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
        "object-nesting",
        lambda n: _nest(n, STRING, lambda s: {"type": "object", "properties": {"a": s}}),
        1,
        1 << 12,
        "objects n deep",
    ),
    Shape(
        "optional-properties",
        lambda n: {"type": "object", "properties": {f"p{i}": STRING for i in range(n)}},
        1,
        1 << 12,
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
        1 << 14,
        "n required properties",
    ),
    Shape("enum-size", lambda n: {"enum": [f"value{i}" for i in range(n)]}, 1, 1 << 18, "n values"),
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
        "n objects",
    ),
    Shape(
        "pattern-bounded",
        lambda n: {"type": "string", "pattern": f"^[a-z]{{0,{n}}}$"},
        1,
        1 << 16,
        "^[a-z]{0,n}$",
    ),
    Shape(
        "pattern-optional-run",
        lambda n: {"type": "string", "pattern": f"^(.?){{{n}}}$"},
        1,
        256,
        "^(.?){n}$",
    ),
    Shape(
        "pattern-nested-optional",
        lambda n: {"type": "string", "pattern": "^" + "(" * n + "a?" + "){2}" * n + "$"},
        1,
        16,
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
        "integer-range",
        lambda n: {"type": "integer", "minimum": -(10**n), "maximum": 10**n},
        1,
        60,
        "minimum -10^n, maximum 10^n",
    ),
    Shape("ref-chain", _ref_chain, 1, 1 << 12, "n $defs, each referring to the next"),
]

LEFT_RECURSIVE = {
    "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
    "anyOf": [{"$ref": "#/$defs/a"}],
}
#: Schemas tried once each, a refused grammar fed on as the old backend did.
FIXED: dict[str, dict[str, Any]] = {
    "left-recursive $ref": LEFT_RECURSIVE,
    "maxItems 10000": {"type": "array", "items": STRING, "maxItems": 10000},
    "maxLength 20000": {"type": "string", "maxLength": 20000},
}


# One trial, in a child process -------------------------------------------------------------------


def _say(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def run_trial(spec: dict[str, Any]) -> None:
    """The child: the backend's steps for one schema, reporting each before it starts."""
    memory = spec["memory_mib"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # CPU time, not wall time: other work on the machine must not make a trial look slow.
    cpu = math.ceil(spec["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    if spec["stack_kib"]:
        threading.stack_size(spec["stack_kib"] << 10)
    from llama_cpp import Llama

    llm = Llama(model_path=spec["model"], n_ctx=512, n_threads=1, verbose=False)
    _say(step="loaded", vocabulary=llm.n_vocab())
    # The backend runs engine calls on a worker thread: so does this, with the same stack size.
    worker = threading.Thread(target=_steps, args=(llm, spec))
    worker.start()
    worker.join()
    _say(step="end", peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10)


def _steps(llm: Any, spec: dict[str, Any]) -> None:
    try:
        _run_steps(llm, spec)
    except MemoryError:
        _say(step="failed", outcome="oom")


def _run_steps(llm: Any, spec: dict[str, Any]) -> None:
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

    from backends.llama.grammar import grammar_for_schema, llama_grammar, measure
    from backends.runtime.errors import BackendError

    text = spec["schema"]
    _say(step="begin", name="check")
    started = time.thread_time()
    try:
        sampler = llama_grammar(llm._model.vocab, grammar_for_schema(text, llm.n_vocab()))
        llama_cpp.llama_sampler_free(sampler)
        verdict: dict[str, Any] = {"accepts": True}
    except BackendError as exc:
        verdict = {"accepts": False, "reason": exc.reason, "message": exc.message}
    except Exception as exc:  # a bug in the check: the backend would answer 500
        verdict = {"accepts": False, "reason": f"internal: {type(exc).__name__}: {exc}"[:200]}
    _say(step="check", seconds=time.thread_time() - started, **verdict)

    _say(step="begin", name="build")
    started = time.thread_time()
    try:
        grammar = json_schema_to_gbnf(text)
    except Exception as exc:  # RecursionError, mostly
        _say(step="failed", outcome="error", detail=f"{type(exc).__name__}: {exc}"[:200])
        return
    seconds = time.thread_time() - started
    shape = measure(grammar).__dict__ if len(grammar) <= 4 << 20 else {}
    _say(step="build", seconds=seconds, size=len(grammar), shape=shape)

    _say(step="begin", name="parse")
    started = time.thread_time()
    sampler = llama_cpp.llama_sampler_init_grammar(
        llm._model.vocab, grammar.encode("utf-8"), b"root"
    )
    _say(step="parse", seconds=time.thread_time() - started, refused=not sampler)
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
    elif not spec["feed_refused"]:
        _say(step="failed", outcome="refused")
        return

    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
    llm.eval(prompt)  # the backend reads the prompt first: the samples below are the grammar's
    _say(step="begin", name="sample")
    tokens = llm.generate(prompt, temp=0.0, grammar=LlamaGrammar.from_string(grammar))
    times = []
    started = time.thread_time()
    for token in tokens:
        times.append(time.thread_time() - started)
        _say(step="token", seconds=times[-1])
        if len(times) >= spec["tokens"] or llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        started = time.thread_time()
    tokens.close()
    _say(step="sample", seconds=max(times, default=0.0), tokens=len(times))


# Trials, seen from the parent --------------------------------------------------------------------


@dataclass
class Trial:
    """What one child said, and how it ended."""

    value: int
    outcome: str
    step: str = ""
    detail: str = ""
    accepts: bool | None = None
    reason: str = ""
    size: int | None = None
    shape: dict[str, Any] = field(default_factory=dict)
    slowest: float = 0.0
    vocabulary: int = 0

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
    tokens: int
    memory_mib: int
    stack_kib: int
    precision: float
    vocabulary: int = 49152  # until a trial has loaded the model


def trial(schema: dict[str, Any], value: int, settings: Settings, feed: bool = False) -> Trial:
    """Run one schema in a child process and classify what happened."""
    try:
        text = json.dumps(schema)
    except RecursionError:
        return Trial(value, "error", "schema", "too deep for json.dumps")
    spec = {
        "schema": text,
        "model": settings.model,
        "tokens": settings.tokens,
        "cpu_seconds": settings.timeout,
        "memory_mib": settings.memory_mib,
        "stack_kib": settings.stack_kib,
        "feed_refused": feed,
    }
    with tempfile.TemporaryFile("w+") as spec_file:
        json.dump(spec, spec_file)
        spec_file.seek(0)
        child = subprocess.Popen(
            [sys.executable, __file__, "--trial"],
            stdin=spec_file,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # llama.cpp prints refused grammars in full
            cwd=ROOT,
        )
        try:
            out, _ = child.communicate(timeout=3 * settings.timeout + 30)
            timed_out = False
        except subprocess.TimeoutExpired:
            child.kill()
            out, _ = child.communicate()
            timed_out = True
    result = Trial(value=value, outcome="ok")
    step = slowest_step = ""  # the step begun last, and the one that took longest
    for line in out.decode(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        kind = event["step"]
        if kind == "begin":
            step = event["name"]
        elif kind == "loaded":
            result.vocabulary = event["vocabulary"]
        elif kind == "check":
            result.accepts = event["accepts"]
            result.reason = event.get("reason", "")
        elif kind == "build":
            result.size = event["size"]
            result.shape = event["shape"]
        if kind != "check" and event.get("seconds", 0.0) > result.slowest:
            result.slowest, slowest_step = event["seconds"], step
        if kind == "failed":
            result.outcome = event["outcome"]
            result.detail = event.get("detail", "")
    if timed_out:
        result.outcome = "slow"
        result.detail = f"still running after {3 * settings.timeout + 30:.0f} s"
    elif child.returncode == -signal.SIGXCPU:
        result.outcome = "slow"
        result.detail = f"over {settings.timeout:.0f} s of CPU"
    elif child.returncode < 0:
        result.outcome = "crash"
        result.detail = signal.Signals(-child.returncode).name
    elif child.returncode > 0:
        result.outcome = "crash"
        result.detail = f"exit {child.returncode}"
    elif result.outcome == "ok" and result.slowest > settings.slow:
        result.outcome = "slow"
        result.detail = f"{result.slowest:.1f} s CPU"
        step = slowest_step
    result.step = step if result.outcome != "ok" else ""
    return result


# Bisection --------------------------------------------------------------------------------------


@dataclass
class Finding:
    """What bisecting one shape found."""

    shape: Shape
    largest_ok: Trial | None = None
    first_failure: Trial | None = None
    first_harmful: Trial | None = None
    check_limit: str = "?"
    trials: list[Trial] = field(default_factory=list)


def explore(shape: Shape, settings: Settings, log: Callable[[str], None]) -> Finding:
    """Bisect a shape for its largest working value and its smallest failing, then harmful, one;
    and for the largest value the backend's check allows."""
    finding = Finding(shape)
    _explore(finding, settings, log)
    vocabulary = max((t.vocabulary for t in finding.trials), default=0) or settings.vocabulary
    finding.check_limit = check_limit(shape, vocabulary)
    log(f"{shape.name}: the check allows up to {finding.check_limit}")
    return finding


def _explore(finding: Finding, settings: Settings, log: Callable[[str], None]) -> None:
    shape = finding.shape
    tried: dict[int, Trial] = {}

    def at(value: int) -> Trial:
        if value not in tried:
            tried[value] = trial(shape.build(value), value, settings)
            finding.trials.append(tried[value])
            log(f"{shape.name} {value}: {tried[value].label()} {tried[value].detail}")
        return tried[value]

    if at(shape.low).failed:
        finding.first_failure = tried[shape.low]
        finding.first_harmful = tried[shape.low] if tried[shape.low].harmful else None
        return
    if not at(shape.high).failed:
        finding.largest_ok = tried[shape.high]
        return
    good, bad = _bisect(shape.low, shape.high, lambda v: not at(v).failed, settings)
    finding.largest_ok, finding.first_failure = tried[good], tried[bad]
    if tried[bad].harmful:
        finding.first_harmful = tried[bad]
    elif tried[shape.high].harmful:
        _, harmful = _bisect(bad, shape.high, lambda v: not at(v).harmful, settings)
        finding.first_harmful = tried[harmful]


def _bisect(
    good: int, bad: int, works: Callable[[int], bool], settings: Settings
) -> tuple[int, int]:
    """Narrow [good, bad] until they are next to each other, or within the precision."""
    while bad - good > max(1, int(good * settings.precision)):
        # Geometric steps while the range spans orders of magnitude, halving after.
        middle = int(math.sqrt(good * bad)) if bad > 4 * good else (good + bad) // 2
        middle = min(max(middle, good + 1), bad - 1)
        if works(middle):
            good = middle
        else:
            bad = middle
    return good, bad


def check_limit(shape: Shape, vocabulary: int) -> str:
    """The largest value the backend's check lets through, bisected in a child process."""
    command = [sys.executable, __file__, "--check-limit", shape.name]
    command += ["--vocabulary", str(vocabulary)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
        )
    except subprocess.TimeoutExpired:
        return "timed out"
    return done.stdout.strip() or f"failed: {done.stderr.strip()[-200:]}"


def run_check_limit(name: str, vocabulary: int) -> None:
    """The child: bisect one shape against the check alone (no model: it must be cheap)."""
    from backends.llama.grammar import grammar_for_schema
    from backends.runtime.errors import BackendError

    shape = next(s for s in SHAPES if s.name == name)

    def accepts(value: int) -> bool:
        try:
            grammar_for_schema(json.dumps(shape.build(value)), vocabulary)
        except (BackendError, RecursionError):  # RecursionError: json.dumps gave up
            return False
        return True

    if not accepts(shape.low):
        print(f"< {shape.low}")
    elif accepts(shape.high):
        print(f">= {shape.high}")
    else:
        exact = Settings("", 0, 0, 0, 0, 0, precision=0.0, vocabulary=vocabulary)
        print(_bisect(shape.low, shape.high, accepts, exact)[0])


# The report ------------------------------------------------------------------------------------


def _cell(found: Trial | None) -> str:
    if found is None:
        return "-"
    return f"{found.value} {found.label()}"


def _grammar(found: Trial | None) -> str:
    if found is None or found.size is None:
        return "-"
    size = f"{found.size} B"
    if found.size >= 1e4:
        size = f"{found.size / 1e6:.1f} MB" if found.size >= 1e6 else f"{found.size / 1e3:.0f} kB"
    if "nesting" not in found.shape:
        return size
    return f"{size}, nesting {found.shape['nesting']}, {found.shape['positions']} open"


def report(findings: list[Finding], fixed: dict[str, Trial]) -> None:
    header = (
        "shape",
        "largest ok",
        "first failure",
        "first crash/stall",
        "its grammar",
        "check allows up to",
    )
    rows = [header]
    for finding in findings:
        rows.append(
            (
                finding.shape.name,
                str(finding.largest_ok.value) if finding.largest_ok else "-",
                _cell(finding.first_failure),
                _cell(finding.first_harmful),
                _grammar(finding.first_harmful),
                finding.check_limit,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print()
    for finding in findings:
        print(f"{finding.shape.name}: {finding.shape.what}")
        for found in {
            id(t): t for t in (finding.first_failure, finding.first_harmful) if t
        }.values():
            if found.detail:
                print(f"    {found.value}: {found.label()}: {found.detail}")
    print()
    for name, found in fixed.items():
        verdict = f"check refuses: {found.reason}" if found.accepts is False else "CHECK ALLOWS"
        print(f"{name}: {found.label()} {found.detail} ({verdict})")
    every = [t for f in findings for t in f.trials] + list(fixed.values())
    misses = [t for t in every if t.accepts and t.harmful]
    alarms = [t for t in every if t.accepts is False and t.outcome == "ok"]
    print(
        f"\n{len(every)} trials. The check let through {len(misses)} harmful schemas, "
        f"and refused {len(alarms)} that llama.cpp coped with."
    )
    for found in misses:
        print(f"    MISS: {found.value} {found.label()} {found.detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [shape.name for shape in SHAPES]
    parser.add_argument("--shapes", help=f"comma-separated, of: {', '.join(names)}")
    parser.add_argument("--jobs", type=int, default=2, help="trials at once")
    parser.add_argument("--timeout", type=float, default=10.0, help="CPU seconds per trial")
    parser.add_argument("--slow", type=float, default=2.0, help="CPU seconds a step may take")
    parser.add_argument("--tokens", type=int, default=3, help="tokens to sample per trial")
    parser.add_argument("--memory", type=int, default=4096, help="MiB a trial may map")
    parser.add_argument("--stack-kib", type=int, default=0, help="engine thread stack (0: OS)")
    parser.add_argument("--precision", type=float, default=0.05, help="relative, when bisecting")
    parser.add_argument("--model", default=str(MODEL), help="GGUF file")
    parser.add_argument("--no-fixed", action="store_true", help="skip the fixed cases")
    parser.add_argument("--list", action="store_true", help="list the shapes and stop")
    parser.add_argument("--trial", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--check-limit", help=argparse.SUPPRESS)
    parser.add_argument("--vocabulary", type=int, default=49152, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        run_trial(json.load(sys.stdin))
        return
    if args.check_limit:
        run_check_limit(args.check_limit, args.vocabulary)
        return
    if args.list:
        for shape in SHAPES:
            print(f"{shape.name:24} {f'{shape.low}..{shape.high}':12} {shape.what}")
        return
    if not Path(args.model).is_file():
        sys.exit(f"no model at {args.model}: run the real-model tests once, or pass --model")
    chosen = [s for s in SHAPES if not args.shapes or s.name in args.shapes.split(",")]
    settings = Settings(
        model=args.model,
        timeout=args.timeout,
        slow=args.slow,
        tokens=args.tokens,
        memory_mib=args.memory,
        stack_kib=args.stack_kib,
        precision=args.precision,
    )
    started = time.monotonic()
    lock = threading.Lock()

    def log(line: str) -> None:
        with lock:
            print(f"[{time.monotonic() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        fixed_runs = {}
        if not args.no_fixed:
            fixed_runs = {
                name: pool.submit(trial, schema, 0, settings, True)
                for name, schema in FIXED.items()
            }
        findings = list(pool.map(lambda shape: explore(shape, settings, log), chosen))
        fixed = {name: run.result() for name, run in fixed_runs.items()}
    report(findings, fixed)
    print(f"({time.monotonic() - started:.0f} s, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
