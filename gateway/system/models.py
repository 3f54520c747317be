"""Every gallery model against this machine: whether it fits (as `hearth models available`
says), how many parameters it has, and how fast it is expected to run; and the usual sizing
table (7B → 16 GB, ...) for this machine.

Speed is estimated from first principles, with constants measured on llama.cpp:

- Generating a token reads every weight once: on a CPU that is bound by how fast the cores can
  read memory. llama.cpp's kernels reached 75-95 % of a plain multi-threaded read (numpy sum)
  on GGUFs of 0.3-1.1 GB (Q4_0, Q8_0, F16) on our 2-core test machine, so a token takes
  `bytes / (LLAMA_READ_EFFICIENCY * read rate)`, plus `LLAMA_LAYER_SECONDS` per layer of
  fixed work (thread handoffs, small operations) that dominates tiny models: SmolLM2-135M
  (97 MB, 30 layers) generated 114-120 tok/s there, where reading alone would allow ~270.
- Reading a prompt and computing embeddings are bound by arithmetic: 2 operations per
  parameter per token, at about the rate of a float32 matrix product (numpy's BLAS) on the same
  cores.
"""

from __future__ import annotations

import contextlib
import mmap
from pathlib import Path
from typing import Any

import msgspec

from gateway.config import resolve_model_path
from gateway.gallery import GalleryEntry, GalleryIndex, entry_footprint, is_installed
from gateway.manager.budget import MachineBudget
from gateway.manager.footprint import FootprintBook, fit
from gateway.manager.modelfiles import ModelFileError, _Reader, read_gguf, read_safetensors
from gateway.system.engines import MachineSpeed
from gateway.units import format_size

#: The share of the measured read rate llama.cpp's generation reaches (see the docstring).
LLAMA_READ_EFFICIENCY = 0.8
#: Fixed work per layer per generated token, in seconds (measured: ~0.15 ms on 2 cores).
LLAMA_LAYER_SECONDS = 150e-6
#: Below this, prompts are read well under the matrix-product rate (SmolLM2-135M: ~0.4 of it).
SMALL_PARAMETERS = 300_000_000
#: Q4_K_M weights: about 4.85 bits a parameter.
Q4_BYTES_PER_PARAMETER = 0.6
#: A 4096-token KV cache, compute buffers and the engine add about a fifth to the weights.
LOADED_OVER_WEIGHTS = 1.2
#: The usual sizing table: parameters (billions), RAM, VRAM (where it gives one), and the
#: layers of such a model (Llama 2's), for its speed.
SIZE_CLASSES = (
    ("7B", 7.0, 16_000_000_000, 8_000_000_000, 32),
    ("13B", 13.0, 24_000_000_000, None, 40),
    ("70B", 70.0, 64_000_000_000, None, 80),
)
_KINDS = {"whisper": "transcription", "piper": "speech", "diffusers": "images"}


class Expected(msgspec.Struct):
    """How fast a model is expected to run here: None where it is not estimated, and why."""

    tokens_per_second: float | None = None
    prompt_tokens_per_second: float | None = None
    basis: str = ""


class ModelFit(msgspec.Struct):
    name: str
    backend: str | None
    kind: str
    installed: bool
    download_bytes: int | None
    #: What it takes loaded, as `hearth models available` says, and where that came from.
    memory_bytes: int | None
    memory_from: str | None
    #: "fits", "too big", or "unknown".
    verdict: str
    fits: bool | None
    why: str
    parameters: int | None
    expected: Expected
    #: For an adapter: the gallery model it adapts.
    base: str | None = None


class SizeClass(msgspec.Struct):
    parameters: str
    #: The table's figures.
    ram_bytes: int
    vram_bytes: int | None
    fits_ram: bool | None
    fits_vram: bool | None
    #: Our own figure: what such a model takes loaded at Q4_K_M, and fits the budget.
    q4_loaded_bytes: int
    fits_budget: bool
    #: Its expected generation speed on this CPU.
    tokens_per_second: float | None


class Sizing(msgspec.Struct):
    classes: list[SizeClass]
    #: The memory the table's RAM column is compared with (MemTotal).
    ram_bytes: int | None
    #: The largest GPU's memory, if there is a GPU that says.
    vram_bytes: int | None
    #: The most parameters (billions) of a Q4_K_M model the budget for models holds.
    largest_q4_billions: float
    basis: str


def gguf_parameters(path: Path) -> int:
    """The parameters of a GGUF file: the elements of every tensor its header lists."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ModelFileError(f"{path.name} is not a GGUF file")
        reader = _Reader(data)
        reader.at = 8  # magic, version
        tensors, entries = reader.take("<Q", 8), reader.take("<Q", 8)
        for _ in range(entries):
            reader.skip_string()
            reader.value(reader.take("<I", 4))
        total = 0
        for _ in range(tensors):
            reader.skip_string()
            dims = reader.take("<I", 4)
            if dims > 8:
                raise ModelFileError(f"{path.name}: a tensor has {dims} dimensions")
            count = 1
            for _ in range(dims):
                count *= reader.take("<Q", 8)
            reader.at += 4 + 8  # type, offset
            total += count
    return total


def kind_of(backend: str | None, config: dict[str, Any]) -> str:
    if backend in _KINDS:
        return _KINDS[backend]
    if config.get("rerank"):
        return "rerank"
    return "embeddings" if config.get("embeddings") else "chat"


def llama_tokens_per_second(
    read_bytes: int, layers: int | None, speed: MachineSpeed
) -> float | None:
    """Generation speed of one stream of a GGUF with `read_bytes` of weights."""
    if not speed.read_bytes_per_second or read_bytes <= 0:
        return None
    seconds = read_bytes / (LLAMA_READ_EFFICIENCY * speed.read_bytes_per_second)
    seconds += (layers or 0) * LLAMA_LAYER_SECONDS
    return seconds and 1 / seconds


def compute_tokens_per_second(parameters: int | None, speed: MachineSpeed) -> float | None:
    """Tokens per second where the arithmetic bounds it: 2 operations a parameter a token."""
    if not parameters or not speed.flops_per_second:
        return None
    return speed.flops_per_second / (2 * parameters)


def _installed_path(entry: GalleryEntry, models_dir: Path) -> Path | None:
    for relative in (entry.model_path, entry.model):
        if relative is None:
            continue
        with contextlib.suppress(ValueError, OSError):
            path = resolve_model_path(models_dir, relative)
            if path.exists():
                return path
    return None


def _weights(path: Path, models_dir: Path) -> tuple[int | None, int | None, int | None]:
    """(bytes read a token, layers, parameters) of an installed model's files."""
    with contextlib.suppress(ModelFileError, OSError, ValueError):
        if path.is_file() and path.name.lower().endswith(".gguf"):
            header = read_gguf(path)
            layers = header.get("block_count")
            return (
                header.tensor_bytes,
                layers if isinstance(layers, int) else None,
                gguf_parameters(path),
            )
        if path.is_dir() and any(path.rglob("*.safetensors")):
            summary = read_safetensors(path, inside=models_dir)
            return summary.bytes, None, summary.parameters
    return None, None, None


def _expected(
    backend: str | None,
    kind: str,
    read_bytes: int | None,
    layers: int | None,
    parameters: int | None,
    installed: bool,
    speed: MachineSpeed,
) -> Expected:
    if not speed.read_bytes_per_second:
        return Expected(basis=f"not estimated: this machine's speed was {speed.basis}")
    if kind == "chat" and backend in ("llama", "transformers"):
        if read_bytes is None:
            return Expected(basis="not estimated: the index gives no size for its files")
        generate = llama_tokens_per_second(read_bytes, layers, speed)
        prompt = compute_tokens_per_second(parameters, speed)
        rate = f"{speed.read_bytes_per_second / 1e9:.1f} GB/s"
        basis = (
            f"one stream on the CPU: {format_size(read_bytes)} of weights read a token at "
            f"{LLAMA_READ_EFFICIENCY:.0%} of the measured {rate}"
        )
        if layers:
            basis += f", plus {layers} layers' fixed work"
        if not installed:
            basis += " (from the download size: the layers are known once it is installed)"
        if backend == "transformers":
            basis += "; Transformers adds Python work a token: expect less"
        if prompt:
            basis += "; prompts: 2 operations a parameter a token at the measured matrix rate"
            if parameters and parameters < SMALL_PARAMETERS:
                basis += " (an upper bound: a small model's small matrices compute slower)"
        return Expected(generate, prompt, basis)
    if kind in ("embeddings", "rerank"):
        tokens = compute_tokens_per_second(parameters, speed)
        if tokens is None:
            why = "known once it is installed" if not installed else "not read from its files"
            return Expected(basis=f"not estimated: its parameter count is {why}")
        return Expected(
            None,
            tokens,
            "tokens embedded a second in batches: 2 operations a parameter a token at the "
            f"measured matrix rate ({speed.flops_per_second / 1e9:.0f} GFLOP/s)"
            if speed.flops_per_second
            else "",
        )
    what = {
        "transcription": "transcription speed depends on the audio, the language and beams",
        "speech": "speech speed depends on the voice and the text",
        "images": "image speed depends on the steps and the size",
    }.get(kind, "no estimate for this kind of model")
    return Expected(basis=f"not estimated: {what}")


def gallery_fits(
    index: GalleryIndex,
    models_dir: Path,
    budget: MachineBudget,
    book: FootprintBook,
    speed: MachineSpeed,
) -> list[ModelFit]:
    """Each gallery entry: fits or not (as `hearth models available` computes it), its
    parameters, and its expected speed."""
    rows: dict[str, ModelFit] = {}
    # Models first, then adapters, which take their base's row wherever the index lists it.
    for entry in sorted(index.entries, key=lambda e: e.base is not None):
        base = index.get(entry.base) if entry.base else None
        config = entry.config if base is None else {**base.config, **entry.config}
        backend = config.get("backend")
        kind = kind_of(backend, config)
        installed = is_installed(entry, models_dir)
        if entry.base is not None:
            known = rows.get(base.name) if base is not None else None
            rows[entry.name] = _adapter_row(entry, backend, kind, installed, known)
            continue
        view = fit(entry_footprint(entry, models_dir, book), budget.memory_bytes)
        read_bytes, layers, parameters = None, None, None
        path = _installed_path(entry, models_dir) if installed else None
        if path is not None:
            read_bytes, layers, parameters = _weights(path, models_dir)
        elif kind == "chat":
            read_bytes = entry.download_bytes()
        if view["fits"] is None:
            verdict, why = "unknown", "the index gives no file sizes: known once it is installed"
        elif view["fits"]:
            verdict, why = "fits", _needs(view, budget)
        else:
            verdict, why = "too big", _needs(view, budget)
        rows[entry.name] = ModelFit(
            name=entry.name,
            backend=backend,
            kind=kind,
            installed=installed,
            download_bytes=entry.download_bytes(),
            memory_bytes=view["memory_bytes"],
            memory_from=view["memory_from"],
            verdict=verdict,
            fits=view["fits"],
            why=why,
            parameters=parameters,
            expected=_expected(backend, kind, read_bytes, layers, parameters, installed, speed),
        )
    return [rows[entry.name] for entry in index.entries if entry.name in rows]


def _adapter_row(
    entry: GalleryEntry, backend: str | None, kind: str, installed: bool, known: ModelFit | None
) -> ModelFit:
    """An adapter runs in its base's process: it fits where its base (`known`, its row) does,
    at its speed."""
    verdict = known.verdict if known else "unknown"
    why = f"an adapter of {entry.base}: it runs in its base's process, with a few MB more"
    return ModelFit(
        name=entry.name,
        backend=backend,
        kind=kind,
        installed=installed,
        download_bytes=entry.download_bytes(),
        memory_bytes=known.memory_bytes if known else None,
        memory_from=known.memory_from if known else None,
        verdict=verdict,
        fits=known.fits if known else None,
        why=why,
        parameters=known.parameters if known else None,
        expected=known.expected if known else Expected(basis=f"not estimated: {why}"),
        base=entry.base,
    )


def _needs(view: dict[str, Any], budget: MachineBudget) -> str:
    return (
        f"needs ~{format_size(view['memory_bytes'])} ({view['memory_from']}) of the "
        f"{format_size(budget.memory_bytes)} for models"
    )


def sizing(
    total_ram: int | None, vram: int | None, budget: MachineBudget, speed: MachineSpeed
) -> Sizing:
    """The usual table (7B → 16 GB RAM or 8 GB VRAM, 13B → 24 GB, 70B → 64 GB+) against this
    machine, and what a Q4_K_M model of each size takes and how fast it would generate here."""
    per_billion = Q4_BYTES_PER_PARAMETER * LOADED_OVER_WEIGHTS * 1e9
    classes = []
    for label, billions, ram, class_vram, layers in SIZE_CLASSES:
        weights = int(billions * 1e9 * Q4_BYTES_PER_PARAMETER)
        classes.append(
            SizeClass(
                parameters=label,
                ram_bytes=ram,
                vram_bytes=class_vram,
                fits_ram=None if total_ram is None else total_ram >= ram,
                fits_vram=None if vram is None or class_vram is None else vram >= class_vram,
                q4_loaded_bytes=int(billions * per_billion),
                fits_budget=billions * per_billion <= budget.memory_bytes,
                tokens_per_second=llama_tokens_per_second(weights, layers, speed),
            )
        )
    return Sizing(
        classes=classes,
        ram_bytes=total_ram,
        vram_bytes=vram,
        largest_q4_billions=round(budget.memory_bytes / per_billion, 1),
        basis=(
            f"Q4_K_M weights take ~{Q4_BYTES_PER_PARAMETER} GB per billion parameters, "
            f"x{LOADED_OVER_WEIGHTS} loaded (a 4096-token cache, buffers, the engine); "
            "speed as for the gallery's GGUF models"
        ),
    )
