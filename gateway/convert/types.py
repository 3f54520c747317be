"""The quantization types llama.cpp makes, read from llama-cpp-python's own constants.

The names are llama.cpp's file types (`LLAMA_FTYPE_MOSTLY_Q4_K_M` is `q4_k_m`), read from the
text of the installed `llama_cpp/llama_cpp.py`, so that the gateway process never loads
libllama to learn them, and a newer llama-cpp-python brings its new types with it.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from gateway.convert.errors import ConverterUnavailable, ConvertRefused

#: The types `llama-quantize` also takes under a shorter name.
_ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}
#: Unquantized file types: quantizing from these loses the least.
FLOAT_TYPES = frozenset({"f32", "f16", "bf16"})
#: Types llama.cpp refuses to make without an importance matrix (llama-quant.cpp's
#: tensor_requires_imatrix): the result would be garbage.
_NEED_IMATRIX = frozenset({"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs"})
_IMATRIX_MADE = frozenset({"q2_k_s"})


@dataclass(frozen=True)
class QuantizationType:
    """One llama.cpp file type: its name (`q4_k_m`), its constant, and its enum value."""

    name: str
    constant: str
    value: int


def _llama_cpp_source() -> Path:
    spec = importlib.util.find_spec("llama_cpp")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConverterUnavailable(
            "llama-cpp-python is not installed: quantizing needs the llama backend "
            "(pip install 'hearth[llama]')"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "llama_cpp.py"


@functools.cache
def file_types() -> dict[str, QuantizationType]:
    """Every file type the installed llama-cpp-python names, by lower-case name."""
    tree = ast.parse(_llama_cpp_source().read_text(encoding="utf-8"))
    found: dict[str, QuantizationType] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target, value = node.targets[0], node.value
        if not isinstance(target, ast.Name) or not target.id.startswith("LLAMA_FTYPE_"):
            continue
        if not isinstance(value, ast.Constant) or not isinstance(value.value, int):
            continue
        name = target.id.removeprefix("LLAMA_FTYPE_").lower()
        name = name.removeprefix("mostly_").removeprefix("all_")
        if name == "guessed":  # "not given in the file": not a type to make
            continue
        found[name] = QuantizationType(name, target.id, value.value)
    return found


def type_name(value: int) -> str | None:
    """The name of a GGUF's `general.file_type`, if llama.cpp knows it."""
    return next((t.name for t in file_types().values() if t.value == value), None)


def quantization_type(name: str) -> QuantizationType:
    """The type `name` (any case; q4_k for q4_k_m), if it can be made here; ConvertRefused
    saying why not, with the valid names, if not."""
    wanted = name.strip().lower()
    wanted = _ALIASES.get(wanted, wanted)
    types = file_types()
    if wanted in _NEED_IMATRIX or wanted in _IMATRIX_MADE:
        raise ConvertRefused(
            f"{wanted} needs an importance matrix (llama.cpp's imatrix, computed by running the "
            "model over sample text), which Hearth does not make: the result would be garbage "
            f"without one. Types that need none: {', '.join(makeable())}",
            param="quantization",
        )
    if wanted.startswith("iq"):
        # llama.cpp makes these without a matrix, but they are designed around one: without it
        # a k-quant of the same size does better.
        raise ConvertRefused(
            f"{wanted} is an i-quant, made to be used with an importance matrix, which Hearth "
            f"does not make; use a k-quant of about its size instead (q3_k_m, q4_k_s, q4_k_m). "
            f"Types that need none: {', '.join(makeable())}",
            param="quantization",
        )
    if wanted not in types:
        raise ConvertRefused(
            f"unknown quantization type {name!r}; valid types: {', '.join(makeable())}",
            param="quantization",
        )
    return types[wanted]


def makeable() -> list[str]:
    """The type names `quantization_type` accepts, in llama.cpp's order."""
    types = sorted(file_types().values(), key=lambda t: t.value)
    return [t.name for t in types if not t.name.startswith("iq") and t.name not in _IMATRIX_MADE]
