"""Quantizing and checking GGUF models with llama.cpp, in a process of its own.

    python -m gateway.convert.worker quantize SOURCE OUTPUT --ftype LLAMA_FTYPE_... [--requantize]
    python -m gateway.convert.worker check MODEL [--embeddings]
    python -m gateway.convert.worker check-lora MODEL LORA [--scale S]

The gateway never loads libllama itself: a crash here (or the SIGTERM of a cancel) ends this
process, nothing else. What it has to say goes to stdout as JSON lines, one event each:
`progress` (tensors done of total), `quantized` (llama.cpp's summary), `checked` (what the new
model answered; for a LoRA, what the model answered with it and without), `error` (why it
failed, then exit status 1). Everything llama.cpp prints goes
to stderr, so that stdout stays events only.

Standalone on purpose: it imports nothing of the gateway's but this package's bare __init__.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
import time
from collections import deque
from typing import Any, TextIO

#: What the check asks a chat model, or a model without a chat template to continue.
CHECK_QUESTION = "What is the capital of France?"
CHECK_PROMPT = "The capital of France is"
CHECK_TOKENS = 8
_TENSOR = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
_FALLBACK = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback")
_SIZE = re.compile(r"(model|quant) size\s*=\s*([\d.]+) MiB")
# ggml_log_level: 2 info, 3 warn, 4 error, 5 continues the previous line.
_LEVEL_WARN, _LEVEL_ERROR, _LEVEL_CONTINUE = 3, 4, 5


class _Events:
    """JSON lines on the stdout this process started with."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def send(self, event: str, **fields: Any) -> None:
        self.stream.write(json.dumps({"event": event, **fields}) + "\n")
        self.stream.flush()


class _LlamaLog:
    """llama.cpp's log, caught through llama_log_set: progress from the line it writes per
    tensor, its summary, and its warnings and errors for the message if it fails."""

    def __init__(self, events: _Events) -> None:
        self.events = events
        self.problems: deque[str] = deque(maxlen=12)
        self.summary: dict[str, Any] = {}
        self._level = 0
        self._shown = 0

    def write(self, level: int, text: str) -> None:
        if level != _LEVEL_CONTINUE:
            self._level = level
        sys.stderr.write(text)
        if self._level >= _LEVEL_WARN and text.strip():
            self.problems.append(text.strip())
        tensor = _TENSOR.match(text)
        if tensor:
            done, total = int(tensor[1]), int(tensor[2])
            if done != self._shown:
                self._shown = done
                self.events.send("progress", tensors_done=done, tensors_total=total)
        fallback = _FALLBACK.search(text)
        if fallback:
            self.summary["fallback_tensors"] = int(fallback[1])
        size = _SIZE.search(text)
        if size:
            self.summary[f"{size[1]}_mib"] = float(size[2])

    def reason(self) -> str:
        errors = [line for line in self.problems if line.startswith(("error", "ERROR"))]
        lines = errors or list(self.problems)
        return "; ".join(lines[-3:]) or "llama.cpp gave no reason"


#: Every log callback handed to llama.cpp: it may call one until the process ends.
_CALLBACKS: list[Any] = []


def _listen(llama: Any, log: _LlamaLog) -> None:
    """Send llama.cpp's log to `log`."""

    def callback(level: int, text: bytes, _user_data: Any) -> None:
        log.write(int(level), text.decode("utf-8", errors="replace"))

    _CALLBACKS.append(llama.llama_log_callback(callback))
    llama.llama_log_set(_CALLBACKS[-1], ctypes.c_void_p(0))


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def quantize(args: argparse.Namespace, events: _Events) -> int:
    import llama_cpp.llama_cpp as llama  # loads libllama: here, never in the gateway

    log = _LlamaLog(events)
    _listen(llama, log)
    params = llama.llama_model_quantize_default_params()
    params.nthread = args.threads or _threads()
    params.ftype = getattr(llama, args.ftype)
    params.allow_requantize = args.requantize
    started = time.monotonic()
    status = llama.llama_model_quantize(
        os.fsencode(args.source), os.fsencode(args.output), ctypes.byref(params)
    )
    if status != 0:
        events.send("error", message=f"llama.cpp could not quantize it: {log.reason()}")
        return 1
    events.send("quantized", seconds=round(time.monotonic() - started, 2), **log.summary)
    return check(args, events)


def check(args: argparse.Namespace, events: _Events) -> int:
    """Load the model and make it produce something: tokens, or for an embedding model a
    vector."""
    import llama_cpp
    import llama_cpp.llama_cpp as llama

    log = _LlamaLog(events)
    _listen(llama, log)
    model = args.output if args.command == "quantize" else args.model
    try:
        llm = llama_cpp.Llama(
            model_path=model,
            n_ctx=256,
            n_batch=64,
            n_threads=args.threads or _threads(),
            embedding=args.embeddings,
            seed=0,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        events.send("error", message=f"the new model does not load: {exc}: {log.reason()}")
        return 1
    try:
        if args.embeddings:
            vector = llm.embed("The capital of France")
            size = len(vector[0]) if vector and isinstance(vector[0], list) else len(vector)
            if not size:
                events.send("error", message="the new model loads but gives no embedding")
                return 1
            events.send("checked", embedding_size=size)
            return 0
        prompt, text, tokens = _answer(llm)
    except (ValueError, RuntimeError) as exc:
        events.send("error", message=f"the new model loads but fails to compute: {exc}")
        return 1
    if tokens == 0:
        events.send("error", message="the new model loads but generates no tokens")
        return 1
    events.send("checked", prompt=prompt, text=text, tokens=tokens)
    return 0


def check_lora(args: argparse.Namespace, events: _Events) -> int:
    """Load the base model, have it answer, then apply the LoRA the way the llama backend does
    (on the loaded model, for the context) and have it answer again."""
    import llama_cpp
    import llama_cpp.llama_cpp as llama

    log = _LlamaLog(events)
    _listen(llama, log)
    try:
        llm = llama_cpp.Llama(
            model_path=args.model,
            n_ctx=256,
            n_batch=64,
            n_threads=args.threads or _threads(),
            seed=0,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        events.send("error", message=f"the base model does not load: {exc}: {log.reason()}")
        return 1
    try:
        _, base_text, _ = _answer(llm)
        log.problems.clear()  # from here on, only what llama.cpp says of the adapter
        adapter = llama.llama_adapter_lora_init(llm._model.model, os.fsencode(args.lora))
        if not adapter:
            events.send(
                "error",
                message="llama.cpp cannot apply the LoRA to the base model (an adapter trained "
                f"for another model, or not a LoRA): {log.reason()}",
            )
            return 1
        handles = (llama.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(args.scale)
        if llama.llama_set_adapters_lora(llm._ctx.ctx, handles, 1, scales) != 0:
            events.send("error", message=f"llama.cpp cannot apply the LoRA: {log.reason()}")
            return 1
        llm.reset()  # nothing computed without the adapter is reused
        prompt, text, tokens = _answer(llm)
    except (ValueError, RuntimeError) as exc:
        events.send("error", message=f"the base model with the LoRA fails to compute: {exc}")
        return 1
    if tokens == 0:
        events.send("error", message="the base model with the LoRA generates no tokens")
        return 1
    events.send("checked", prompt=prompt, text=text, tokens=tokens, base_text=base_text)
    return 0


def _answer(llm: Any) -> tuple[str, str, int]:
    """A few greedy tokens: the answer to a question in the model's own chat template, or
    without one, the continuation of a sentence. (prompt, text, tokens)"""
    options: dict[str, Any] = {"max_tokens": CHECK_TOKENS, "temperature": 0.0}
    if llm.metadata.get("tokenizer.chat_template"):
        message = {"role": "user", "content": CHECK_QUESTION}
        reply: Any = llm.create_chat_completion(messages=[message], **options)
        text = reply["choices"][0]["message"]["content"] or ""
        return CHECK_QUESTION, str(text), int(reply["usage"]["completion_tokens"])
    answer: Any = llm.create_completion(CHECK_PROMPT, **options)
    return (
        CHECK_PROMPT,
        str(answer["choices"][0]["text"]),
        int(answer["usage"]["completion_tokens"]),
    )


def main(argv: list[str]) -> int:
    # Events go to the stdout we were given; anything printed (by C code too) goes to stderr.
    events = _Events(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)
    parser = argparse.ArgumentParser(prog="gateway.convert.worker")
    commands = parser.add_subparsers(dest="command", required=True)
    quantize_parser = commands.add_parser("quantize")
    quantize_parser.add_argument("source")
    quantize_parser.add_argument("output")
    quantize_parser.add_argument("--ftype", required=True, help="a LLAMA_FTYPE_* constant")
    quantize_parser.add_argument("--requantize", action="store_true")
    check_parser = commands.add_parser("check")
    check_parser.add_argument("model")
    for each in (quantize_parser, check_parser):
        each.add_argument("--embeddings", action="store_true")
    lora_parser = commands.add_parser("check-lora")
    lora_parser.add_argument("model")
    lora_parser.add_argument("lora")
    lora_parser.add_argument("--scale", type=float, default=1.0)
    for each in (quantize_parser, check_parser, lora_parser):
        each.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "quantize":
        return quantize(args, events)
    if args.command == "check-lora":
        return check_lora(args, events)
    return check(args, events)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
