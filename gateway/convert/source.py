"""What a Hugging Face model folder must be before it is converted: safetensors weights (never
pickle), a tokenizer, no code of its own, and an architecture read from its config.json."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.convert.errors import ConvertRefused, SourceNotFound

#: Weights in Python's pickle format, which can run code when loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: The files whose `auto_map` makes transformers load Python code from the model's folder.
_CODE_MAPS = ("config.json", "tokenizer_config.json", "processor_config.json")
_JSON_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class HFModel:
    """A Hugging Face model folder that passed the checks."""

    path: Path
    #: The architecture llama.cpp's converter picks a converter class by.
    architecture: str


def _read_json(path: Path) -> Any:
    with path.open("rb") as handle:
        data = handle.read(_JSON_BYTES + 1)
    if len(data) > _JSON_BYTES:
        raise ConvertRefused(f"{path.name} is larger than {_JSON_BYTES} bytes", param="source")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ConvertRefused(f"{path.name} is not valid JSON: {exc}", param="source") from None


def check_source(path: Path, *, confined_to: Path | None = None) -> HFModel:
    """Check the folder `path` (see the module); ConvertRefused saying what is wrong, or
    SourceNotFound. With `confined_to`, every file in it must lie inside that folder (no link
    out of the models dir)."""
    if not path.is_dir():
        raise SourceNotFound(f"{path} is not a folder", param="source")
    names = sorted(os.listdir(path))
    if confined_to is not None:
        root = confined_to.resolve()
        for name in names:
            if not (path / name).resolve().is_relative_to(root):
                raise ConvertRefused(
                    f"{name} in {path.name} is a link out of the models dir", param="source"
                )
    if "config.json" not in names:
        raise ConvertRefused(
            f"{path} has no config.json: not a Hugging Face model folder", param="source"
        )
    config = _read_json(path / "config.json")
    if not isinstance(config, dict):
        raise ConvertRefused("config.json is not a JSON object", param="source")
    _refuse_custom_code(path, names, config)
    _check_weights(path, names)
    if not {"tokenizer.json", "tokenizer.model"} & set(names):
        raise ConvertRefused(
            f"{path} has no tokenizer (tokenizer.json or tokenizer.model): a GGUF carries its "
            "model's vocabulary",
            param="source",
        )
    return HFModel(path, _architecture(config))


def _refuse_custom_code(path: Path, names: list[str], config: dict[str, Any]) -> None:
    """The converter lets transformers load tokenizers with trust_remote_code=True: a model
    whose files map classes to its own code (`auto_map`) would have that code run. Refused
    here; gateway/convert/run_converter.py also disables loading such code outright."""
    maps: list[tuple[str, dict[str, Any]]] = [("config.json", config)]
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        maps.append(("config.json's text_config", text_config))
    for name in _CODE_MAPS[1:]:
        if name in names:
            data = _read_json(path / name)
            if isinstance(data, dict):
                maps.append((name, data))
    for where, data in maps:
        if "auto_map" in data:
            raise ConvertRefused(
                f"{where} has an auto_map: the model needs Python code of its own to load, and "
                "Hearth never runs a model's code",
                param="source",
            )


def _check_weights(path: Path, names: list[str]) -> None:
    # The converter's own rule: model*.safetensors (or their index), else pytorch_model*.bin.
    safetensors = [n for n in names if n.startswith("model") and n.endswith(".safetensors")]
    if safetensors or "model.safetensors.index.json" in names:
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ConvertRefused(
            f"{path} has its weights only in pickle files ({', '.join(pickles[:3])}), which "
            "can run code when loaded: Hearth converts safetensors (model*.safetensors) only. "
            "Get the model's safetensors release, or convert the weights yourself with a tool "
            "you trust",
            param="source",
        )
    raise ConvertRefused(f"{path} has no weights (model*.safetensors)", param="source")


def _architecture(config: dict[str, Any]) -> str:
    """The architecture the converter goes by: the text model's where config.json has one
    (multimodal models), else the first of `architectures`."""
    found = None
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        found = architectures[0]
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        inner = text_config.get("architectures")
        if isinstance(inner, list) and inner:
            found = inner[0]
    if not isinstance(found, str) or not found:
        raise ConvertRefused("config.json names no `architectures`", param="source")
    return found
