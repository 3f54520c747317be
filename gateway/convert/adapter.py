"""What a PEFT LoRA adapter folder must be before it is converted to a GGUF LoRA, and the base
model's Hugging Face config it is converted with.

An adapter is `adapter_config.json` (peft_type LORA) and `adapter_model.safetensors` (never the
pickled `adapter_model.bin`). llama.cpp's LoRA converter reads only its A and B matrices and one
`lora_alpha`, and llama.cpp scales each by alpha / rank: PEFT settings that change the update
otherwise (DoRA, per-module alphas, trained biases, whole modules saved beside the adapter) are
refused here rather than converted into an adapter that answers differently; rsLoRA's
alpha / sqrt(rank) is carried over as an alpha that gives the same scale.

The converter also needs the base model's config.json: its hyperparameters (llama-family q and k
rows are permuted as they were for the base's GGUF). It is checked against the base's GGUF
header, since a config of another size would permute rows wrongly without any error.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.convert.errors import ConvertRefused, SourceNotFound
from gateway.convert.source import _architecture, _read_json, _refuse_custom_code
from gateway.manager.modelfiles import GGUFHeader

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PICKLED_WEIGHTS = "adapter_model.bin"
_HEADER_BYTES = 64 * 1024 * 1024
#: The tensors llama.cpp's LoRA converter takes: A and B matrices (of linear layers and of
#: embeddings), and the norms mergekit-extract-lora adds.
_CONVERTED = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
#: config.json's names for what the GGUF header has under `<arch>.<key>`.
_HYPERPARAMETERS = (
    ("num_hidden_layers", "block_count"),
    ("hidden_size", "embedding_length"),
    ("intermediate_size", "feed_forward_length"),
    ("num_attention_heads", "attention.head_count"),
    ("num_key_value_heads", "attention.head_count_kv"),
)


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT LoRA adapter folder that passed the checks."""

    path: Path
    weights: Path
    rank: int
    #: The alpha to write, with which llama.cpp's alpha / rank is PEFT's scale.
    alpha: float
    target_modules: list[str]
    #: adapter_config.json's base_model_name_or_path, as it is written there.
    base_model: str | None


@dataclass(frozen=True)
class BaseConfig:
    """The base model's Hugging Face config.json, checked: its bytes (what the converter will
    read) and the architecture it names."""

    path: Path
    data: bytes
    architecture: str
    values: dict[str, Any]


def is_adapter(path: Path) -> bool:
    """Whether the folder `path` is a PEFT adapter (it has adapter_config.json)."""
    return (path / ADAPTER_CONFIG).is_file()


def check_adapter(path: Path, *, confined_to: Path | None = None) -> PeftAdapter:
    """Check the adapter folder `path` (see the module); ConvertRefused saying what is wrong,
    or SourceNotFound. With `confined_to`, its files must lie inside that folder."""
    if not path.is_dir():
        raise SourceNotFound(f"{path} is not a folder", param="source")
    names = sorted(os.listdir(path))
    if confined_to is not None:
        own = [n for n in names if n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)]
        _check_confined(path, own, confined_to, "source")
    if ADAPTER_CONFIG not in names:
        raise ConvertRefused(f"{path} has no {ADAPTER_CONFIG}: not a PEFT adapter", param="source")
    config = _read_json(path / ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise ConvertRefused(f"{ADAPTER_CONFIG} is not a JSON object", param="source")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ConvertRefused(
            f"{path.name} is a PEFT {kind or 'adapter of no peft_type'} adapter, not a LoRA: "
            "llama.cpp applies LoRA adapters only",
            param="source",
        )
    if ADAPTER_WEIGHTS not in names:
        if _PICKLED_WEIGHTS in names:
            raise ConvertRefused(
                f"{path} has its weights only as {_PICKLED_WEIGHTS}, a pickle, which can run "
                f"code when loaded: Hearth converts {ADAPTER_WEIGHTS} only. Save the adapter "
                "with safe_serialization=True (PEFT's default), or convert it yourself with a "
                "tool you trust",
                param="source",
            )
        raise ConvertRefused(f"{path} has no weights ({ADAPTER_WEIGHTS})", param="source")
    _refuse_unconvertible(path, config)
    rank = config.get("r", 8)
    alpha = config.get("lora_alpha", 8)
    if not _number(rank) or rank < 1 or not _number(alpha):
        raise ConvertRefused(
            f"{ADAPTER_CONFIG}'s r ({rank!r}) and lora_alpha ({alpha!r}) must be numbers",
            param="source",
        )
    if config.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(r), llama.cpp by alpha / r (r read from each tensor).
        alpha = alpha * math.sqrt(rank)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]  # a regular expression, in PEFT
    base_model = config.get("base_model_name_or_path")
    return PeftAdapter(
        path=path,
        weights=path / ADAPTER_WEIGHTS,
        rank=int(rank),
        alpha=float(alpha),
        target_modules=[str(t) for t in targets or []],
        base_model=base_model if isinstance(base_model, str) and base_model else None,
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _refuse_unconvertible(path: Path, config: dict[str, Any]) -> None:
    """ConvertRefused for PEFT settings the GGUF LoRA cannot carry (see the module)."""
    why = None
    if config.get("use_dora"):
        why = "it is a DoRA adapter (use_dora), whose magnitude vectors llama.cpp does not apply"
    elif config.get("alpha_pattern"):
        why = "it gives some modules an alpha of their own (alpha_pattern); a GGUF LoRA has one"
    elif config.get("use_rslora") and config.get("rank_pattern"):
        why = "it is rsLoRA with ranks that differ by module (rank_pattern)"
    elif config.get("alora_invocation_tokens") or config.get("invocation_string"):
        why = "it is an activated LoRA (alora_invocation_tokens), which Hearth does not serve"
    elif config.get("modules_to_save"):
        why = (
            "it saves whole modules beside the LoRA (modules_to_save: "
            f"{config['modules_to_save']}), which a GGUF LoRA cannot carry"
        )
    elif config.get("trainable_token_indices"):
        why = "it trains token embeddings of its own (trainable_token_indices)"
    elif config.get("bias", "none") != "none" or config.get("lora_bias"):
        why = "it trains biases (bias / lora_bias), which a GGUF LoRA cannot carry"
    elif config.get("layer_replication"):
        why = "it replicates layers of the base (layer_replication)"
    if why is None:
        why = _unconvertible_tensor(path / ADAPTER_WEIGHTS)
    if why is not None:
        raise ConvertRefused(
            f"{path.name} cannot be converted to a GGUF LoRA: {why}", param="source"
        )


def _unconvertible_tensor(weights: Path) -> str | None:
    """Why the safetensors file is not LoRA matrices only, if it is not: read from its header
    (its tensors' names), without loading any."""
    try:
        with weights.open("rb") as handle:
            size_bytes = handle.read(8)
            (size,) = struct.unpack("<Q", size_bytes) if len(size_bytes) == 8 else (-1,)
            if not 0 < size <= _HEADER_BYTES:
                return f"{ADAPTER_WEIGHTS} is not a safetensors file"
            header = json.loads(handle.read(size))
    except (OSError, ValueError) as exc:
        return f"{ADAPTER_WEIGHTS} cannot be read: {exc}"
    if not isinstance(header, dict):
        return f"{ADAPTER_WEIGHTS} is not a safetensors file"
    names = [name for name in header if name != "__metadata__"]
    if not names:
        return f"{ADAPTER_WEIGHTS} holds no tensors"
    for name in names:
        if not any(part in name for part in _CONVERTED) and "norm" not in name:
            return (
                f"{ADAPTER_WEIGHTS} holds {name}, which is not a LoRA matrix (a module saved "
                "whole, a bias or a DoRA magnitude)"
            )
    return None


def _check_confined(path: Path, names: list[str], root: Path, param: str) -> None:
    resolved_root = root.resolve()
    if not path.resolve().is_relative_to(resolved_root):
        raise ConvertRefused(f"{path} is outside the models dir", param=param)
    for name in names:
        if not (path / name).resolve().is_relative_to(resolved_root):
            raise ConvertRefused(
                f"{name} in {path.name} is a link out of the models dir", param=param
            )


def base_config_folder(
    adapter: PeftAdapter, given: Path | None, *, confined_to: Path | None = None
) -> Path:
    """The folder to read the base's config.json from: `given`, else the adapter's
    base_model_name_or_path where that is a local folder with one (inside `confined_to`, if
    given). ConvertRefused saying to give one, if neither; never a download."""
    if given is not None:
        return given
    named = adapter.base_model
    said = "adapter_config.json does not name its base (base_model_name_or_path)"
    if named:
        folder = Path(named).expanduser()
        inside = confined_to is None or folder.resolve().is_relative_to(confined_to.resolve())
        if (folder / "config.json").is_file():
            if inside:
                return folder
            said = f"adapter_config.json names its base {named!r}, a folder outside the models dir"
        else:
            said = (
                f"adapter_config.json names its base {named!r}, which is not a local folder "
                "with a config.json"
            )
    option = "base_config" if confined_to is not None else "--base-config DIR"
    raise ConvertRefused(
        f"the converter needs the base model's Hugging Face config.json, and {said}. Give "
        f"{option}: a local folder of the Hugging Face model the adapter was trained on "
        "(config.json is all that is read; Hearth never downloads it)",
        param="base_config",
    )


def check_base_config(folder: Path, *, confined_to: Path | None = None) -> BaseConfig:
    """Read and check the base model's config.json in `folder`: no code of its own, an
    architecture named."""
    if not folder.is_dir():
        raise SourceNotFound(f"{folder} is not a folder", param="base_config")
    if confined_to is not None:
        _check_confined(folder, ["config.json"], confined_to, "base_config")
    path = folder / "config.json"
    if not path.is_file():
        raise ConvertRefused(
            f"{folder} has no config.json: not a Hugging Face model folder", param="base_config"
        )
    data = path.read_bytes()
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ConvertRefused("config.json is not a JSON object", param="base_config")
    try:
        _refuse_custom_code(folder, ["config.json"], config)
        architecture = _architecture(config)
    except ConvertRefused as exc:
        raise ConvertRefused(f"{folder.name}: {exc}", param="base_config") from None
    text = config.get("text_config")
    values = {**config, **text} if isinstance(text, dict) else config
    return BaseConfig(folder, data, architecture, values)


def check_config_matches(config: BaseConfig, header: GGUFHeader, base: str) -> None:
    """ConvertRefused unless the config's sizes are the base GGUF's (layers, widths, heads)."""
    for name, key in _HYPERPARAMETERS:
        wanted = header.get(key)
        given = config.values.get(name)
        if name == "num_key_value_heads" and given is None:
            given = config.values.get("num_attention_heads")  # Hugging Face's default
        if isinstance(wanted, int) and isinstance(given, int) and wanted != given:
            raise ConvertRefused(
                f"{config.path} is not the config of {base}'s model: its {name} is {given}, "
                f"{base}'s GGUF has {wanted}. Give the Hugging Face folder of the model "
                f"{base} was made from (and the adapter was trained on)",
                param="base_config",
            )
