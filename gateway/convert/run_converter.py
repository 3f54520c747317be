"""Run one of llama.cpp's converters with a model's own code and pickle loading disabled:

    python -m gateway.convert.run_converter LLAMA_CPP_DIR SCRIPT CONVERTER_ARGS...

SCRIPT is convert_hf_to_gguf.py (a Hugging Face model) or convert_lora_to_gguf.py (a PEFT LoRA
adapter, which reads its base model's config.json through transformers too). The converter
asks transformers for tokenizers with `trust_remote_code=True`. A folder that maps classes to
its own Python (`auto_map`) is refused before it gets here (gateway/convert/source.py); in case
one slips through, this process replaces the functions through which transformers loads a
model's code with ones that refuse, before any of transformers' Auto classes is imported (they
bind those functions by name when imported). torch.load, the converters' way to read pickled
weights, refuses too: we convert safetensors.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any, NoReturn

#: The converters this runs: nothing else of a llama.cpp tree.
SCRIPTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")


class CustomCodeRefused(RuntimeError):
    """The model asked to run Python code of its own."""


def _refuse_code(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise CustomCodeRefused(
        "this model needs Python code of its own (an auto_map), and Hearth never runs a "
        "model's code"
    )


def _refuse_pickle(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise CustomCodeRefused("pickled weights can run code when loaded: convert safetensors")


def _disable_custom_code() -> None:
    import transformers.dynamic_module_utils as dynamic

    replaced = {}
    for name in ("get_class_from_dynamic_module", "get_cached_module_file", "get_class_in_module"):
        replaced[id(getattr(dynamic, name))] = name
        setattr(dynamic, name, _refuse_code)
    # Any module of transformers' that bound one already gets the refusal too.
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("transformers."):
            for attribute, value in list(vars(module).items()):
                if id(value) in replaced:
                    setattr(module, attribute, _refuse_code)


def _disable_pickle() -> None:
    import torch

    torch.load = _refuse_pickle


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in SCRIPTS:
        sys.exit(
            "usage: python -m gateway.convert.run_converter LLAMA_CPP_DIR "
            f"{{{','.join(SCRIPTS)}}} ARGS..."
        )
    root = Path(argv[0]).resolve()
    script = root / argv[1]
    _disable_custom_code()
    _disable_pickle()
    # As `python SCRIPT ARGS` would have it: its folder first (its `conversion` package), and
    # its own gguf-py rather than the gguf installed here (which it inserts itself too, unless
    # NO_LOCAL_GGUF is set).
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    for name in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
        del sys.modules[name]
    sys.argv = [str(script), *argv[2:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
