"""What a model's files say it is (format, family, parameters, quantization, size), for the
listings that show more than a name: Ollama's /api/tags, /api/ps and /api/show.

Read from the files' headers (`manager.modelfiles`), never by loading the model, and kept per
file version (names, sizes, times), so a listing polled every few seconds reads each header once.
Whatever the files do not say is an empty string, as Ollama leaves its unknowns.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import ModelConfig, resolve_model_path
from gateway.manager.modelfiles import read_gguf, read_safetensors

log = logging.getLogger("hearth.gateway")

#: llama.cpp's file types (general.file_type), as its quantize tool names them.
GGUF_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
}  # fmt: skip
_TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
#: GGUF arrays (their reader gives only a length) are shown empty, as Ollama shows long arrays
#: unless asked for all of them. These keys are shown elsewhere (the template) or not at all
#: (as Ollama leaves them out).
_GGUF_HIDDEN = frozenset({"tokenizer.chat_template", "general.name"})


@dataclass(frozen=True)
class ModelFacts:
    """One model as its files describe it."""

    format: str
    family: str
    parameter_size: str
    quantization_level: str
    #: Bytes of its files.
    size: int
    #: Seconds since the epoch of the newest of its files and its YAML.
    modified: float
    #: Names its YAML and files (their names, sizes and times): changes when either does. Not a
    #: hash of the weights (hashing gigabytes on each listing would cost too much).
    digest: str
    #: Its chat template as its files hold it (a GGUF's), if any.
    template: str = ""
    #: Its header's metadata (a GGUF's keys; a Hugging Face config's main numbers).
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def families(self) -> list[str]:
        return [self.family] if self.family else []


def model_facts(config: ModelConfig, models_dir: Path) -> ModelFacts:
    """What `config`'s files say (blocking: file I/O)."""
    path: Path | None = None
    if config.model:
        try:
            path = resolve_model_path(models_dir, config.model)
        except ValueError:
            path = None
    files = _files(path, models_dir)
    described = _described(config.backend, str(path) if path else "", files)
    yaml = Path(config.source) if config.source else None
    try:
        yaml_text = yaml.read_bytes() if yaml is not None else b""
        yaml_time = yaml.stat().st_mtime_ns if yaml is not None else 0
    except OSError:
        yaml_text, yaml_time = b"", 0
    digest = hashlib.sha256(yaml_text + json.dumps(files).encode()).hexdigest()
    newest = max([yaml_time, *(mtime for _, _, mtime in files)])
    return ModelFacts(
        **described,
        size=sum(size for _, size, _ in files),
        modified=newest / 1e9,
        digest=digest,
    )


def _files(path: Path | None, models_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime_ns) of a model's file, or of the files under its folder (a link out
    of the models dir is not followed: nothing outside it is described)."""
    if path is None:
        return ()
    root = models_dir.resolve()
    try:
        items = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out = []
        for item in items:
            if not item.resolve().is_relative_to(root):
                continue
            stat = item.stat()
            name = item.name if item == path else str(item.relative_to(path))
            out.append((name, stat.st_size, stat.st_mtime_ns))
        return tuple(out)
    except OSError:
        return ()


@functools.lru_cache(maxsize=256)
def _described(backend: str, path: str, files: tuple[tuple[str, int, int], ...]) -> dict[str, Any]:
    """The header-derived facts of the files at `path` (`files` keys the cache: a new version
    of them is read afresh)."""
    empty: dict[str, Any] = {
        "format": "",
        "family": "",
        "parameter_size": "",
        "quantization_level": "",
    }
    if not path or not files:
        return {**empty, "family": "whisper" if backend == "whisper" else ""}
    folder = Path(path)
    try:
        if backend == "llama" and folder.is_file():
            return _gguf(folder)
        if backend == "whisper":
            return {**empty, "format": "ctranslate2", "family": "whisper"}
        if any(name.endswith(".safetensors") for name, _, _ in files):
            return _safetensors(folder)
    except Exception as exc:  # a file that lies about itself: the engine will say what
        log.warning("cannot read %s to describe it: %s", path, exc)
    return empty


def _gguf(path: Path) -> dict[str, Any]:
    header = read_gguf(path)
    metadata = header.metadata
    count = metadata.get("general.parameter_count")
    label = metadata.get("general.size_label")
    if isinstance(count, int) and count > 0:
        size = human_number(count)
    else:
        size = str(label) if isinstance(label, str) else ""
    file_type = metadata.get("general.file_type")
    info: dict[str, Any] = {}
    for key, value in metadata.items():
        if key in _GGUF_HIDDEN:
            continue
        info[key] = [] if key in header.arrays else value  # read as their length
    template = metadata.get("tokenizer.chat_template")
    return {
        "format": "gguf",
        "family": header.architecture,
        "parameter_size": size,
        "quantization_level": GGUF_FILE_TYPES.get(file_type, "")
        if isinstance(file_type, int)
        else "",
        "template": template if isinstance(template, str) else "",
        "info": info,
    }


def _safetensors(folder: Path) -> dict[str, Any]:
    # The model's folder is inside the models dir (resolve_model_path); links out of it are
    # not read.
    inside = folder if folder.is_dir() else folder.parent
    parameters = read_safetensors(folder, inside).parameters
    settings: dict[str, Any] = {}
    config_file = inside / "config.json"
    try:
        if not config_file.resolve().is_relative_to(inside.resolve()):
            raise OSError("outside the model's folder")
        loaded = json.loads(config_file.read_text())
        settings = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        pass
    family = str(settings.get("model_type") or "")
    info: dict[str, Any] = {}
    if family:
        info["general.architecture"] = family
        for key, setting in (
            ("context_length", "max_position_embeddings"),
            ("embedding_length", "hidden_size"),
            ("block_count", "num_hidden_layers"),
            ("attention.head_count", "num_attention_heads"),
            ("attention.head_count_kv", "num_key_value_heads"),
        ):
            if isinstance(settings.get(setting), int):
                info[f"{family}.{key}"] = settings[setting]
    if parameters:
        info["general.parameter_count"] = parameters
    return {
        "format": "safetensors",
        "family": family,
        "parameter_size": human_number(parameters) if parameters else "",
        "quantization_level": _TORCH_DTYPES.get(str(settings.get("torch_dtype")), ""),
        "info": info,
    }


def human_number(count: int) -> str:
    """A parameter count as Ollama writes it: 7.6B, 135.26M, 22M, 600K."""
    for unit, size, decimals in (("B", 10**9, 1), ("M", 10**6, 2), ("K", 10**3, 0)):
        if count >= size:
            value = count / size
            if value == int(value):
                return f"{int(value)}{unit}"
            return f"{value:.{decimals}f}{unit}"
    return str(count)
