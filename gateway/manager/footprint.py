"""How much memory a model takes once loaded: estimated from its files, then measured.

The estimate adds what each engine keeps resident: the backend process with its engine imported
(`RUNTIME_BYTES`), the weights as the engine holds them, and the engine's own buffers (llama.cpp:
the KV cache for `context_size` and a share of its compute buffers, read from the GGUF header).
After a load the gateway measures the process's resident memory, keeps its peak while it
serves, and records it in `<models dir>/.hearth/footprints.json`: the next load of the same model
with the same settings is planned with what was measured, not with the formula.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import ModelConfig, resolve_model_path
from gateway.manager.modelfiles import folder_bytes, read_gguf, read_safetensors
from gateway.units import MIB, format_size

log = logging.getLogger("hearth.manager")
#: One read-modify-write of a footprints.json at a time, whichever book or thread does it.
_BOOK_LOCK = threading.Lock()

#: Resident memory of a backend process with its engine imported and no model (measured on
#: x86-64 Linux with Python 3.11: interpreter, grpc, protobuf, and the engine's libraries).
RUNTIME_BYTES = {
    "echo": 45 * MIB,
    "llama": 80 * MIB,
    "transformers": 330 * MIB,
    "whisper": 185 * MIB,  # with PyAV's decoders and the buffers of a warm-up transcription
    "diffusers": 450 * MIB,
    "piper": 90 * MIB,  # onnxruntime, numpy and PyAV
}
#: A custom backend we know nothing about, until it has been measured once.
UNKNOWN_BYTES = 256 * MIB
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# CTranslate2 holds weights in the compute type: int8 halves a float16 file, float32 doubles it
# (on a CPU "float16" and "default" run as float32, which is what a CPU supports).
_CT2_FACTOR = {
    "int8": 0.55,
    "int8_float32": 0.55,
    "int8_float16": 0.55,
    "float32": 2.0,
    "float16": 2.0,
    "default": 2.0,
}
_WHISPER_CACHE_PER_BEAM = 0.06
# onnxruntime holds a Piper voice's weights at about 1.7 times its .onnx file (with the buffers
# of the warm-up), and its buffers grow with the audio of one model call, which the backend
# bounds by phoneme ids (300 at speed 1, fewer when slower): about 15 s for the text that makes
# the most audio per id. Measured on en_US-joe-medium (63 MB of .onnx, 187 MiB loaded), peaks
# of 4,100 characters: 228 MiB for one short sentence, 291 MiB for prose, 353 MiB for
# "77, 77, ..." (350 MiB at speed 0.25), 373 MiB for "no, no, ...", 533 MiB for "s: s: ..."
# (15 s calls; 504 MiB at speed 0.25). 6.5 is 584 MiB in all, a tenth over the worst.
_PIPER_WEIGHTS_FACTOR = 1.7
_PIPER_SPEAKING_FACTOR = 6.5
# llama.cpp reserves compute buffers for its largest graph (a full batch of prompt tokens, with
# every logit) but touches them only as far as requests use them: measured after load and after
# a long prompt, a quarter covers what is touched.
_COMPUTE_SHARE = 0.25
# Architectures llama.cpp runs without a KV cache (encoders: embedding models).
_ENCODERS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "t5encoder"})
_DEFAULT_CONTEXT = 4096
_DEFAULT_BATCH = 512
#: Generations a text model computes together when its YAML does not say (`parallel:`); the
#: manager loads it with one where the caches of this many would not fit the memory budget.
DEFAULT_PARALLEL = 4
#: Backends whose text models batch generations, each with a cache of its own.
BATCHING_BACKENDS = frozenset({"llama", "transformers"})


def sequences(config: ModelConfig) -> int:
    """How many generations `config`'s model holds a cache for."""
    if config.embeddings or config.backend not in BATCHING_BACKENDS:
        return 1
    return config.parallel or DEFAULT_PARALLEL


@dataclass(frozen=True)
class Footprint:
    """Memory a model takes loaded, where that figure came from, and what it is made of."""

    bytes: int
    #: "estimate" (from files), "measured" (an earlier load), "declared" (YAML `memory:`),
    #: "remote" (another machine's memory), or "unknown" (a custom backend not yet measured).
    source: str
    parts: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.parts:
            return f"{format_size(self.bytes)} ({self.source})"
        detail = " + ".join(f"{name} {format_size(n)}" for name, n in self.parts.items())
        return f"{format_size(self.bytes)} ({self.source}: {detail})"


def estimate(config: ModelConfig, models_dir: Path) -> Footprint:
    """The formula's figure for `config` from its files (an `unknown` one where there is none)."""
    runtime = RUNTIME_BYTES.get(config.backend)
    if runtime is None:
        return Footprint(UNKNOWN_BYTES, "unknown")
    parts = {"runtime": runtime}
    path = resolve_model_path(models_dir, config.model) if config.model else None
    try:
        if path is not None and path.exists():
            parts.update(_ENGINE_PARTS.get(config.backend, _no_parts)(config, path))
    except Exception as exc:  # unreadable, or lying about itself: the engine will say what
        log.warning("cannot read %s to estimate its memory: %s", config.name, exc)
        parts.update(_size_only(path))
    return Footprint(sum(parts.values()), "estimate", parts)


def _size_only(path: Path | None) -> dict[str, int]:
    """The weights as the files' size, when the files cannot be read as what they claim."""
    try:
        return {"weights": folder_bytes(path)} if path is not None and path.exists() else {}
    except OSError:
        return {}


def estimate_before_download(backend: str, config: dict[str, Any], file_bytes: int) -> Footprint:
    """A rougher figure for a gallery model not yet downloaded: runtime plus weights."""
    runtime = RUNTIME_BYTES.get(backend, UNKNOWN_BYTES)
    options = config.get("options") or {}
    weights = file_bytes
    if backend == "whisper":
        weights = int(file_bytes * _CT2_FACTOR.get(str(options.get("compute_type")), 0.55))
    parts = {"runtime": runtime, "weights": weights}
    if backend == "piper":
        parts = {"runtime": runtime, **_piper_parts(file_bytes)}
    if backend == "llama":
        # Without the header, the KV cache and buffers are guessed as a tenth of the weights.
        parts["buffers"] = weights // 10
    return Footprint(sum(parts.values()), "estimate", parts)


def _no_parts(config: ModelConfig, path: Path) -> dict[str, int]:
    return {}


def _llama(config: ModelConfig, path: Path) -> dict[str, int]:
    header = read_gguf(path)
    # llama.cpp rounds each sequence's share of the cache up to a multiple of 256.
    context = -(-(config.context_size or _DEFAULT_CONTEXT) // 256) * 256
    batch = min(config.batch_size or _DEFAULT_BATCH, context)
    layers = int(header.get("block_count", 0) or 0)
    width = int(header.get("embedding_length", 0) or 0)
    heads = int(header.get("attention.head_count", 0) or 0)
    kv_heads = int(header.get("attention.head_count_kv", heads) or heads)
    head_width = width // heads if heads else 0
    key_width = int(header.get("attention.key_length", head_width) or head_width)
    value_width = int(header.get("attention.value_length", head_width) or head_width)
    vocabulary = int(header.metadata.get("tokenizer.ggml.tokens", 0) or 0)
    parts = {"weights": header.tensor_bytes}
    if header.architecture not in _ENCODERS:
        # f16 keys and values for every position of the context, in every layer, for every
        # sequence computed together.
        parts["kv_cache"] = (
            sequences(config) * context * layers * kv_heads * (key_width + value_width) * 2
        )
    # The largest of: a batch's logits, a batch's attention scores over the whole context; plus
    # the batch's activations.
    compute = max(vocabulary, (heads + 1) * context) * batch * 4 + 8 * width * batch * 4
    parts["compute"] = int(compute * _COMPUTE_SHARE)
    return parts


def _transformers(config: ModelConfig, path: Path) -> dict[str, int]:
    summary = read_safetensors(path)
    dtype = str(config.options.get("dtype", "float32"))
    per_parameter = _DTYPE_BYTES.get(dtype)
    weights = summary.parameters * per_parameter if per_parameter else summary.bytes
    parts = {"weights": weights}
    if not config.embeddings:
        settings = _json(path / "config.json")
        layers = int(settings.get("num_hidden_layers", 0) or 0)
        heads = int(settings.get("num_attention_heads", 0) or 0)
        kv_heads = int(settings.get("num_key_value_heads", heads) or heads)
        width = int(settings.get("hidden_size", 0) or 0)
        head_width = int(settings.get("head_dim", 0) or (width // heads if heads else 0))
        positions = int(settings.get("max_position_embeddings", 0) or 2048)
        context = config.context_size or positions
        per_sequence = context * layers * kv_heads * head_width * 2 * (per_parameter or 4)
        parts["kv_cache"] = sequences(config) * per_sequence
    return parts


def _whisper(config: ModelConfig, path: Path) -> dict[str, int]:
    compute_type = str(config.options.get("compute_type", "int8"))
    file_bytes = folder_bytes(path, ("model.bin",))
    weights = int(file_bytes * _CT2_FACTOR.get(compute_type, 1.0))
    beams = int(config.options.get("beam_size", 5) or 1)
    # The decoder's attention caches grow with each beam and with the model's width; their
    # size tracks the weights' (measured on tiny.en and base, after 24 s of speech).
    return {"weights": weights, "decoding": int(beams * _WHISPER_CACHE_PER_BEAM * file_bytes)}


def _diffusers(config: ModelConfig, path: Path) -> dict[str, int]:
    summary = read_safetensors(path)
    per_parameter = _DTYPE_BYTES.get(str(config.options.get("dtype", "float32")), 4)
    weights = summary.parameters * per_parameter
    # Activations of the denoiser and the VAE decoder grow with the image: a fifth of the
    # weights covers a 512x512 image on Stable Diffusion 1.5-sized pipelines.
    return {"weights": weights, "activations": weights // 5}


def _piper(config: ModelConfig, path: Path) -> dict[str, int]:
    return _piper_parts(folder_bytes(path, (".onnx",)))


def _piper_parts(onnx_bytes: int) -> dict[str, int]:
    """Every voice of the model is loaded; each one spoken with keeps buffers of its own."""
    return {
        "weights": int(onnx_bytes * _PIPER_WEIGHTS_FACTOR),
        "speaking": int(onnx_bytes * _PIPER_SPEAKING_FACTOR),
    }


_ENGINE_PARTS = {
    "llama": _llama,
    "transformers": _transformers,
    "whisper": _whisper,
    "diffusers": _diffusers,
    "piper": _piper,
}


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def fingerprint(config: ModelConfig, models_dir: Path) -> str:
    """What decides a model's footprint: its files (size, mtime) and its load settings."""
    files: list[tuple[str, int, int]] = []
    if config.model:
        with contextlib.suppress(OSError, ValueError):
            path = resolve_model_path(models_dir, config.model)
            items = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            for item in items:
                stat = item.stat()
                files.append((item.name, stat.st_size, stat.st_mtime_ns))
    settings = {
        "backend": config.backend,
        "model": config.model,
        "files": files,
        "context_size": config.context_size,
        "batch_size": config.batch_size,
        "embeddings": config.embeddings,
        "parallel": config.parallel,
        "options": config.options,
    }
    encoded = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def fit(footprint: Footprint | None, budget_bytes: int) -> dict[str, Any]:
    """How a model's memory compares with the machine's budget, as the model lists show it."""
    if footprint is None:
        return {"memory_bytes": None, "memory_from": None, "fits": None}
    return {
        "memory_bytes": footprint.bytes,
        "memory_from": footprint.source,
        "fits": footprint.source == "remote" or footprint.bytes <= budget_bytes,
    }


class FootprintBook:
    """Footprints of the models dir's models: declared, measured, or estimated, in that order.

    What was measured is kept in `<models dir>/.hearth/footprints.json`, read afresh at each use
    (it is small, and read only when a model loads or stops), so that the CLI and the gateway
    see the same book. Changes asked for on an event loop (the manager records as a backend
    stops) are made by the book's writer thread, in order; elsewhere, before returning.
    """

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.path = models_dir / ".hearth" / "footprints.json"
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def _measured(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return (
            {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}
        )

    def footprint(self, config: ModelConfig, remote: bool = False) -> Footprint:
        if remote:
            return Footprint(0, "remote")
        declared = config.memory_bytes()
        if declared is not None:
            return Footprint(declared, "declared")
        self._settle()
        known = self._measured().get(config.name)
        if known is not None and known.get("fingerprint") == fingerprint(config, self.models_dir):
            with contextlib.suppress(TypeError, ValueError):
                return Footprint(int(known["bytes"]), "measured")
        return estimate(config, self.models_dir)

    def record(self, config: ModelConfig, measured: int) -> None:
        """Keep the most a model was seen to take, for the next load of the same files and
        settings (a run that served only short prompts does not lower it)."""
        self._change(lambda: self._record(config, measured))

    def forget(self, name: str) -> None:
        """Drop a removed model's record (and the book itself once it is empty)."""
        self._change(lambda: self._forget(name))

    def _change(self, change: Callable[[], None]) -> None:
        """Run `change` now, or, on an event loop, hand it to the writer thread."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            with _BOOK_LOCK:
                change()
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="hearth-footprints")
        self._pending = self._writer.submit(self._locked, change)
        self._pending.add_done_callback(_log_failure)

    @staticmethod
    def _locked(change: Callable[[], None]) -> None:
        with _BOOK_LOCK:
            change()

    def _settle(self) -> None:
        """Off the event loop, wait for the writer thread's changes (one thread, in order: the
        last one done means all are)."""
        pending = self._pending
        if pending is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pending.exception()  # waits; a failure was logged by _log_failure

    def _record(self, config: ModelConfig, measured: int) -> None:
        book = self._measured()
        key = fingerprint(config, self.models_dir)
        known = book.get(config.name)
        if known is not None and known.get("fingerprint") == key:
            with contextlib.suppress(TypeError, ValueError):
                if int(known["bytes"]) >= measured:
                    return
        book[config.name] = {"fingerprint": key, "bytes": measured, "measured_at": int(time.time())}
        self._write(book)

    def _forget(self, name: str) -> None:
        book = self._measured()
        if book.pop(name, None) is not None:
            self._write(book)

    def _write(self, book: dict[str, dict[str, Any]]) -> None:
        try:
            if not book:
                self.path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()
                return
            self.path.parent.mkdir(exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            try:
                with os.fdopen(descriptor, "w") as handle:
                    json.dump(book, handle, indent=1, sort_keys=True)
                os.replace(temporary, self.path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as exc:  # a read-only models dir: measurements are not kept
            log.debug("cannot record footprints in %s: %s", self.path, exc)


def _log_failure(done: Future[None]) -> None:
    exc = None if done.cancelled() else done.exception()
    if exc is not None:
        log.error("could not update the footprint book", exc_info=exc)
