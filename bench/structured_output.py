"""Structured output: llguidance against llama.cpp's GBNF grammars, and what a constraint costs.

SmolLM2-135M-Instruct, greedy, a chat prompt that asks for JSON. In one run, in turns:

llama, one sequence on the Q4_1 GGUF in this process, through the backends' sampler chain:
    free      no constraint (the same number of tokens as the constrained runs made)
    gbnf      the reference: llama-cpp-python's json_schema_to_gbnf, then llama.cpp's grammar
              sampler in the sampler chain (the llama backend's path until llguidance replaced it)
    llg       the backends' path (backends/runtime/constrain.py): llguidance's mask over
              llama.cpp's vocabulary written into the logits before the same chain samples
the backends themselves in this process (LlamaBackend and TransformersBackend.generate_stream):
    llama on the same GGUF; on transformers the tiny random Llama of the tests and SmolLM2 made a
    Transformers model from its GGUF (float32); each free and constrained by a JSON schema, then
    4 constrained requests at once (in one batch: a mask per sequence) and one after another.

Printed: schema compile times (GBNF: schema to grammar and llama.cpp's parse, in a child process,
since llama.cpp crashes on some grammars; llguidance: the backends' Grammars.constraint, from
schema to first mask), llguidance's one-time tokenizer set-up, and tokens/s of each mode with its
ratio to the free run, by wall time and by this process's CPU time; medians of --rounds. One
thread by default: on a machine others share, llama.cpp's 2 threads wait on each other
(spinning) whenever one of them loses its core, and the figures swing tenfold.

    .venv/bin/python bench/structured_output.py [--rounds 3] [--threads 1] [--tokens 200]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from harness import ROOT, installed

MODEL = "smollm2-135m-instruct"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ASK = (
    "List three people from a small village, each with their name, age, job and town, as a JSON "
    "array of objects."
)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "job": {"type": "string", "maxLength": 40},
        "town": {"type": "string", "maxLength": 40},
        "married": {"type": "boolean"},
    },
    "required": ["name", "age", "job", "town", "married"],
    "additionalProperties": False,
}
SCHEMAS = {
    "people (3 objects)": {"type": "array", "items": PERSON, "minItems": 3, "maxItems": 3},
    "person": PERSON,
    "json_object": {"type": "object"},
    "enum 2000 values": {"enum": [f"value-{i}" for i in range(2000)]},
    "nested $defs": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 4},
                },
                "required": ["label"],
            }
        },
        "$ref": "#/$defs/node",
    },
}
#: The schema the tokens/s runs follow.
RUN_SCHEMA = SCHEMAS["people (3 objects)"]


@dataclass
class Run:
    tokens: int
    #: Wall-clock and CPU seconds (all of this process's threads): on a machine others share,
    #: CPU time per token is what a mode costs; wall time also counts the waits for a core.
    wall: float
    cpu: float


def measure(action: Callable[[], tuple[int, str]]) -> tuple[Run, str]:
    """Run `action` (tokens made, text); its tokens, wall and CPU seconds, and text."""
    wall, cpu = time.perf_counter(), time.process_time()
    made, text = action()
    return Run(made, time.perf_counter() - wall, time.process_time() - cpu), text


def median_ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1000:.1f} ms"


def timed(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


# llama.cpp ------------------------------------------------------------------------------------


class LlamaEngine:
    """One sequence on llama.cpp, greedy, through a sampler chain as the llama backend builds."""

    def __init__(self, path: Path, threads: int) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        self.lib = llama_cpp
        self.model = LlamaModel(
            path_model=str(path), params=llama_cpp.llama_model_default_params(), verbose=False
        )
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = 2048
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = LlamaContext(model=self.model, params=params, verbose=False)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        self.vocabulary = self.model.n_vocab()
        chat = (
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{ASK}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        self.prompt = self.model.tokenize(chat.encode(), add_bos=False, special=True)

    def grammars(self) -> Any:
        """The backends' constraint compiler over this model's vocabulary."""
        from backends.llama.backend import _llguidance_tokenizer
        from backends.runtime.constrain import Grammars

        return Grammars(partial(_llguidance_tokenizer, self.model), self.vocabulary)

    def gbnf(self, schema: Any) -> Any:
        """llama.cpp's grammar sampler for a schema, from llama-cpp-python's converter."""
        from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

        text = (
            JSON_GBNF if schema == {"type": "object"} else json_schema_to_gbnf(json.dumps(schema))
        )
        sampler = self.lib.llama_sampler_init_grammar(
            self.model.vocab, text.encode("utf-8"), b"root"
        )
        if not sampler:
            raise ValueError("llama.cpp refused the grammar")
        return sampler

    def _decode(self, tokens: list[int], start: int) -> None:
        batch = self.batch
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        assert self.lib.llama_decode(self.ctx.ctx, batch) == 0

    def run(self, most: int, grammar: Any = None, constraint: Any = None) -> tuple[int, str]:
        """The prompt read, then up to `most` tokens: how many were made, and their text."""
        from backends.llama.batch import SamplerChain, Sampling

        settings = Sampling(0.0, 40, 0.95, 0.05, 1.0, 0.0, 0.0, 0)
        chain = SamplerChain(settings, self.vocabulary)
        if grammar is not None:  # before the chain's greedy pick, as llama-cpp-python put it
            self.lib.llama_sampler_chain_add(chain.chain, grammar)
            greedy = self.lib.llama_sampler_chain_remove(chain.chain, 0)
            self.lib.llama_sampler_chain_add(chain.chain, greedy)
        self.lib.llama_memory_clear(self.ctx.memory, True)
        self._decode(self.prompt, 0)
        position, made = len(self.prompt), list[int]()
        try:
            while len(made) < most:
                if constraint is not None:
                    logits = np.ctypeslib.as_array(
                        self.lib.llama_get_logits_ith(self.ctx.ctx, -1), shape=(self.vocabulary,)
                    )
                    assert constraint.forbid(logits), constraint.failure()
                token = chain.sample(self.ctx.ctx, -1)
                ends = self.lib.llama_vocab_is_eog(self.model.vocab, token)
                if ends and (grammar is not None or constraint is not None):
                    break  # the constrained answer is whole (a free run goes on to `most`)
                made.append(token)
                if constraint is not None:
                    failure = constraint.take(token)
                    assert failure is None, failure
                    if constraint.complete:
                        break
                self._decode([token], position)
                position += 1
        finally:
            chain.close()
        text = self.model.detokenize(made, special=False)
        return len(made), text.decode("utf-8", "replace")


def schema_request(schema: Any, most: int = 8) -> Any:
    """A chat request for SYSTEM and ASK; its output held to `schema` (None: free)."""
    from protos.hearth.backend.v1 import backend_pb2 as pb

    chat = pb.ChatInput(
        messages=[
            pb.ChatMessage(role="system", content=SYSTEM),
            pb.ChatMessage(role="user", content=ASK),
        ]
    )
    request = pb.GenerateRequest(
        chat=chat, sampling=pb.SamplingParams(max_tokens=most, temperature=0.0)
    )
    if schema is not None:
        request.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
        request.response_format.json_schema = json.dumps(schema)
    return request


def _gbnf_compile(engine: LlamaEngine, schema: Any, rounds: int, answer: Any) -> None:
    """In a child: the median time to make llama.cpp's grammar sampler for `schema`."""
    try:
        times = [timed(lambda: engine.lib.llama_sampler_free(engine.gbnf(schema)))]
        times += [
            timed(lambda: engine.lib.llama_sampler_free(engine.gbnf(schema)))
            for _ in range(rounds - 1)
        ]
        answer.put(median_ms(times))
    except Exception as exc:
        answer.put(f"refused: {str(exc)[:60]}")


def gbnf_compile_cell(engine: LlamaEngine, schema: Any, rounds: int) -> str:
    context = multiprocessing.get_context("fork")
    answer = context.SimpleQueue()
    child = context.Process(target=_gbnf_compile, args=(engine, schema, rounds, answer))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        child.join()
        return "over 120 s"
    if child.exitcode:
        return f"crashed (exit {child.exitcode})"
    return str(answer.get())


def llama_figures(path: Path, rounds: int, threads: int, tokens: int) -> list[str]:
    engine = LlamaEngine(path, threads)
    lines = ["## llama.cpp (SmolLM2 Q4_1 GGUF, llama-cpp-python), one sequence, greedy", ""]
    setups = [timed(engine.grammars()._llguidance_tokenizer) for _ in range(rounds)]
    grammars = engine.grammars()
    lines.append(
        f"llguidance's tokenizer from llama.cpp's vocabulary ({engine.vocabulary} tokens), "
        f"once per model: {median_ms(setups)}"
    )
    lines += ["", "| schema | GBNF compile | llguidance compile |", "| --- | --- | --- |"]
    for name, schema in SCHEMAS.items():
        gbnf_cell = gbnf_compile_cell(engine, schema, rounds)
        request = schema_request(schema)
        ours_cell = median_ms(
            [timed(partial(grammars.constraint, request, None)) for _ in range(rounds)]
        )
        lines.append(f"| {name} | {gbnf_cell} | {ours_cell} |")

    results: dict[str, list[Run]] = {"free": [], "gbnf": [], "llg": []}
    texts: dict[str, str] = {}
    engine.run(8)  # warm
    constrained = schema_request(RUN_SCHEMA)
    for index in range(rounds):
        order = ("gbnf", "llg", "free") if index % 2 == 0 else ("free", "llg", "gbnf")
        for mode in order:
            if mode == "gbnf":
                run, text = measure(partial(engine.run, tokens, grammar=engine.gbnf(RUN_SCHEMA)))
            elif mode == "llg":
                constraint = grammars.constraint(constrained, None)
                run, text = measure(partial(engine.run, tokens, constraint=constraint))
            else:  # as many tokens as the constrained answers
                most = max([r.tokens for r in results["gbnf"] + results["llg"]] or [tokens])
                run, text = measure(partial(engine.run, most))
            results[mode].append(run)
            texts[mode] = text
    lines += rate_table(results, "free")
    for mode in ("gbnf", "llg"):
        valid = _parses(texts[mode])
        lines.append(f"- {mode} answer parses as JSON: {valid}; starts {texts[mode][:70]!r}")
    return lines


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def rate_table(results: dict[str, list[Run]], base: str) -> list[str]:
    def wall(runs: list[Run]) -> float:
        return statistics.median(r.tokens / r.wall for r in runs)

    def cpu(runs: list[Run]) -> float:
        return statistics.median(r.tokens / r.cpu for r in runs)

    lines = [
        "",
        "| mode | tokens | tokens/s (wall) | vs free | tokens per CPU-second | vs free |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode, runs in results.items():
        tokens = statistics.median(r.tokens for r in runs)
        lines.append(
            f"| {mode} | {tokens:.0f} | {wall(runs):.1f} | {wall(runs) / wall(results[base]):.2f} "
            f"| {cpu(runs):.1f} | {cpu(runs) / cpu(results[base]):.2f} |"
        )
    return lines


# transformers ---------------------------------------------------------------------------------


def transformers_model(models: Path) -> Path:
    """SmolLM2 as a Transformers directory, converted from its GGUF once (kept in models)."""
    sys.path.insert(0, str(ROOT))
    from tests.test_transformers_structured import write_transformers_from_gguf

    directory = models / "smollm2-135m-instruct-transformers"
    if not directory.is_dir():
        entry = installed(MODEL, models)
        write_transformers_from_gguf(models / entry.model_path, directory)
    return directory


def tiny_model(scratch: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import write_tiny_transformers_llama

    return write_tiny_transformers_llama(scratch / "tiny-hf")


class BackendRunner:
    """A backend (llama or transformers) in this process, with 4 sequences."""

    def __init__(self, backend: Any, path: Path, threads: int) -> None:
        from protos.hearth.backend.v1 import backend_pb2 as pb

        self.backend = backend
        self.backend.load(
            pb.LoadRequest(model_path=str(path), model_name=path.name, threads=threads, parallel=4)
        )

    def request(self, most: int, schema: Any = None) -> Any:
        return schema_request(schema, most)

    def run(self, request: Any) -> tuple[int, str]:
        text, made = [], 0
        for item in self._stream(request):
            text.append(item.text)
            if item.finish_reason:
                made = item.usage.completion_tokens
        return made, "".join(text)

    def _stream(self, request: Any) -> Iterator[Any]:
        return self.backend.generate_stream(request, threading.Event())

    def compile_seconds(self, schema: Any) -> float:
        grammars = self.backend.grammars
        assert grammars is not None
        return timed(lambda: grammars.constraint(self.request(8, schema), None))


def together(runner: BackendRunner, requests: list[Any]) -> tuple[int, str]:
    with ThreadPoolExecutor(len(requests)) as pool:
        runs = list(pool.map(runner.run, requests))
    return sum(made for made, _ in runs), runs[0][1]


def one_by_one(runner: BackendRunner, requests: list[Any]) -> tuple[int, str]:
    runs = [runner.run(request) for request in requests]
    return sum(made for made, _ in runs), runs[0][1]


def backend_figures(
    label: str, backend: Any, path: Path, rounds: int, threads: int, tokens: int
) -> list[str]:
    runner = BackendRunner(backend, path, threads)
    grammars = runner.backend.grammars
    assert grammars is not None
    setup = timed(grammars._llguidance_tokenizer)  # the first constrained request pays it
    lines = [f"## {label}", ""]
    lines.append(
        f"llguidance's tokenizer, once per model: {setup * 1000:.0f} ms; compile "
        + ", ".join(
            f"{name} {median_ms([runner.compile_seconds(s) for _ in range(rounds)])}"
            for name, s in SCHEMAS.items()
        )
    )
    results: dict[str, list[Run]] = {
        "free": [],
        "json_schema": [],
        "4 at once, one batch": [],
        "4 one after another": [],
    }
    runner.run(runner.request(4))  # warm
    answer = ""
    constrained = runner.request(tokens, RUN_SCHEMA)
    for index in range(rounds):
        modes = list(results)
        for mode in modes if index % 2 == 0 else reversed(modes):
            if mode == "free":  # up to as many tokens as the constrained answer
                most = max([r.tokens for r in results["json_schema"]] or [tokens])
                run, _ = measure(partial(runner.run, runner.request(most)))
            elif mode == "json_schema":
                run, answer = measure(partial(runner.run, constrained))
            elif mode == "4 at once, one batch":
                run, _ = measure(partial(together, runner, [constrained] * 4))
            else:
                run, _ = measure(partial(one_by_one, runner, [constrained] * 4))
            results[mode].append(run)
    lines += rate_table(results, "free")
    lines.append(
        f"- the json_schema answer parses as JSON: {_parses(answer)}; starts {answer[:70]!r}"
    )
    runner.backend.unload()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "bench-models")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=200, help="most tokens a run makes")
    parser.add_argument("--skip", default="", help="comma-separated: llama, tiny, smollm2")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import llguidance

    print(f"llguidance {llguidance.get_version().splitlines()[0]}; {args.threads} threads\n")
    if "llama" not in skip:
        from backends.llama.backend import LlamaBackend

        entry = installed(MODEL, args.models_dir)
        path = args.models_dir / entry.model_path
        print("\n".join(llama_figures(path, args.rounds, args.threads, args.tokens)))
        print()
        label = "the llama backend: SmolLM2-135M-Instruct, Q4_1 GGUF"
        figures = backend_figures(
            label, LlamaBackend(), path, args.rounds, args.threads, args.tokens
        )
        print("\n".join(figures))
        print()
    if "tiny" not in skip:
        from backends.transformers.backend import TransformersBackend

        path = tiny_model(Path(tempfile.mkdtemp(prefix="hearth-bench-")))
        label = "transformers: tiny random Llama (400 tokens)"
        figures = backend_figures(
            label, TransformersBackend(), path, args.rounds, args.threads, args.tokens
        )
        print("\n".join(figures))
        print()
    if "smollm2" not in skip:
        from backends.transformers.backend import TransformersBackend

        path = transformers_model(args.models_dir)
        label = "transformers: SmolLM2-135M-Instruct, float32 (49152 tokens)"
        figures = backend_figures(
            label, TransformersBackend(), path, args.rounds, args.threads, args.tokens
        )
        print("\n".join(figures))


if __name__ == "__main__":
    main()
