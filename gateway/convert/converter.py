"""llama.cpp's converters (Hugging Face model → GGUF, PEFT LoRA adapter → GGUF LoRA), fetched
once into a cache.

`convert_hf_to_gguf.py` and `convert_lora_to_gguf.py` (with their `conversion/` package and
their own `gguf-py`) are not in the llama-cpp-python wheel, but they are in that release's
source distribution, as `vendor/llama.cpp/`. The first conversion fetches the sdist of exactly
the installed version with pip, and keeps just those files in `<cache>/llama.cpp-<version>/`
(the cache: `HEARTH_CACHE_DIR`, else `$XDG_CACHE_HOME/hearth`, else `~/.cache/hearth`): the
converter then writes the GGUF that the installed libllama reads. A cache from before the LoRA
converter was kept there is completed by the first LoRA conversion (the same fetch).
`HEARTH_LLAMA_CPP_DIR` names a llama.cpp checkout to use instead (offline machines, or a newer
converter).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from gateway.convert.errors import ConverterUnavailable, ConvertRefused
from gateway.convert.process import ChildFailed, child_environment, run_child

OVERRIDE_VARIABLE = "HEARTH_LLAMA_CPP_DIR"
CACHE_VARIABLE = "HEARTH_CACHE_DIR"
SCRIPT = "convert_hf_to_gguf.py"
LORA_SCRIPT = "convert_lora_to_gguf.py"
#: What the converter imports besides the standard library and its own files (the module
#: names; the packages are torch, transformers, sentencepiece, numpy, pyyaml, tqdm).
CONVERTER_IMPORTS = ("torch", "transformers", "sentencepiece", "numpy", "yaml", "tqdm")
_REGISTER = re.compile(r"@ModelBase\.register\(([^)]*)\)")
_QUOTED = re.compile(r"""["']([A-Za-z0-9_.]+)["']""")


def cache_dir() -> Path:
    """Where Hearth keeps what it fetched for itself (not models)."""
    given = os.environ.get(CACHE_VARIABLE)
    if given:
        return Path(given).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hearth"


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version (read without loading libllama)."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise ConverterUnavailable(
            "llama-cpp-python is not installed: converting makes models for the llama backend "
            "(pip install 'hearth[llama]')"
        ) from None


@dataclass(frozen=True)
class Converter:
    """A llama.cpp tree holding the converter: `convert_hf_to_gguf.py` and `gguf-py/` (and
    `convert_lora_to_gguf.py`, unless the tree is older than Hearth's LoRA conversion)."""

    root: Path
    #: Where it came from: llama-cpp-python's version, or the override's path.
    origin: str

    @property
    def script(self) -> Path:
        return self.root / SCRIPT

    @property
    def lora_script(self) -> Path:
        return self.root / LORA_SCRIPT

    @property
    def converts_lora(self) -> bool:
        return self.lora_script.is_file()

    def architectures(self) -> frozenset[str]:
        """The Hugging Face architectures (config.json `architectures`) it converts."""
        return _architectures(self.root)


def _is_converter(root: Path) -> bool:
    return (root / SCRIPT).is_file() and (root / "gguf-py" / "gguf").is_dir()


def find_converter(*, lora: bool = False) -> Converter | None:
    """The converter, if it is here already (the override, or the cache); no network. `lora`:
    one that converts LoRA adapters too."""
    override = os.environ.get(OVERRIDE_VARIABLE)
    if override:
        root = Path(override).expanduser()
        if not _is_converter(root):
            raise ConverterUnavailable(
                f"{OVERRIDE_VARIABLE}={override} is not a llama.cpp checkout: it has no {SCRIPT} "
                "and gguf-py/ (unset it to have Hearth fetch the converter itself)"
            )
        found = Converter(root, origin=str(root))
        if lora and not found.converts_lora:
            raise ConverterUnavailable(
                f"{OVERRIDE_VARIABLE}={override} has no {LORA_SCRIPT}, llama.cpp's LoRA "
                "converter: point it at a newer llama.cpp checkout, or unset it to have Hearth "
                "fetch the converters itself"
            )
        return found
    version = llama_cpp_version()
    cached = Converter(cache_dir() / f"llama.cpp-{version}", origin=f"llama-cpp-python {version}")
    if not _is_converter(cached.root) or (lora and not cached.converts_lora):
        return None
    return cached


def provision_converter(
    cancelled: threading.Event | None = None, *, lora: bool = False
) -> Converter:
    """The converter (`lora`: with the LoRA converter): found here, or fetched
    (llama-cpp-python's sdist, through pip) into the cache. ConverterUnavailable: it cannot be
    had, and the message says what to do."""
    found = find_converter(lora=lora)
    if found is not None:
        return found
    version = llama_cpp_version()
    target = cache_dir() / f"llama.cpp-{version}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".fetch-llama.cpp-", dir=target.parent))
    except OSError as exc:
        raise ConverterUnavailable(f"cannot write the cache {target.parent}: {exc}") from None
    try:
        sdist = _download_sdist(version, scratch / "download", cancelled or threading.Event())
        install_converter(sdist, target, scratch / "tree")
    except OSError as exc:
        raise ConverterUnavailable(f"cannot write the cache {target.parent}: {exc}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    fetched = Converter(target, origin=f"llama-cpp-python {version}")
    if lora and not fetched.converts_lora:
        raise ConverterUnavailable(
            f"the source of llama-cpp-python {version} holds no {LORA_SCRIPT}: point "
            f"{OVERRIDE_VARIABLE} at a newer llama.cpp checkout to convert LoRA adapters"
        )
    return fetched


def install_converter(sdist: Path, target: Path, scratch: Path) -> None:
    """Put the converters of the llama-cpp-python source `sdist` in `target`, extracting into
    the empty `scratch` first (on the same file system). A `target` that is there already (a
    cache kept before the LoRA converter was) gets the files it lacks; what it has is left as
    it is, since a conversion may be reading it."""
    _extract(sdist, scratch)
    try:
        scratch.rename(target)
        return
    except OSError:
        if not target.is_dir():
            raise
    # Another process may have put it there first, or it is an older layout: complete it.
    for path in sorted(scratch.rglob("*")):
        if not path.is_file():
            continue
        placed = target / path.relative_to(scratch)
        if not placed.exists():
            placed.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, placed)  # within one file system: it appears whole


def _download_sdist(version: str, into: Path, cancelled: threading.Event) -> Path:
    into.mkdir(parents=True)
    argv = ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(into)]
    argv += ["--disable-pip-version-check", f"llama-cpp-python=={version}"]
    try:
        # pip reads its own settings (index, proxy) from the environment, as it is.
        run_child([sys.executable, *argv], cwd=into, cancelled=cancelled, env=_pip_environment())
    except ChildFailed as exc:
        raise ConverterUnavailable(
            f"could not fetch llama.cpp's converter (the source of llama-cpp-python {version}) "
            f"with pip: {exc.last_line() or exc}. Run `hearth models convert --fetch-converter` "
            f"where the package index can be reached, or point {OVERRIDE_VARIABLE} at a llama.cpp "
            "checkout of the same version (its vendor/llama.cpp)"
        ) from None
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise ConverterUnavailable(f"pip fetched no source of llama-cpp-python {version}")
    return found[0]


def _pip_environment() -> dict[str, str]:
    env = child_environment()
    env.pop("PYTHONPATH", None)  # pip needs nothing of ours
    return env


def _wanted(relative: str) -> bool:
    """The files of `vendor/llama.cpp/` the converter runs from (and its licence)."""
    if relative in (SCRIPT, LORA_SCRIPT, "LICENSE", "gguf-py/LICENSE"):
        return True
    return relative.startswith(("conversion/", "gguf-py/gguf/")) and relative.endswith(".py")


def _extract(sdist: Path, into: Path) -> None:
    into.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            _top, _, rest = member.name.partition("/")
            relative = rest.removeprefix("vendor/llama.cpp/")
            if relative == rest or not member.isfile() or not _wanted(relative):
                continue
            # The "data" filter refuses links, absolute paths and `..`; the name is ours.
            archive.extract(member.replace(name=relative), into, filter="data")
    if not _is_converter(into):
        raise ConverterUnavailable(f"{sdist.name} holds no vendor/llama.cpp/{SCRIPT}")


@functools.cache
def _architectures(root: Path) -> frozenset[str]:
    """Read from the converter's text, never imported: its TEXT_MODEL_MAP (llama.cpp since the
    converter was split into `conversion/`), else its `@ModelBase.register(...)` decorators."""
    init = root / "conversion" / "__init__.py"
    if init.is_file():
        found = _text_model_map(init.read_text(encoding="utf-8"))
        if found:
            return found
    names: set[str] = set()
    for path in [root / SCRIPT, *sorted((root / "conversion").glob("*.py"))]:
        if path.is_file():
            for arguments in _REGISTER.findall(path.read_text(encoding="utf-8")):
                names.update(_QUOTED.findall(arguments))
    return frozenset(names)


def _text_model_map(text: str) -> frozenset[str]:
    for node in ast.parse(text).body:
        targets: list[ast.expr]
        if isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        named = any(isinstance(t, ast.Name) and t.id == "TEXT_MODEL_MAP" for t in targets)
        if named and isinstance(value, ast.Dict):
            return frozenset(
                key.value
                for key in value.keys
                if isinstance(key, ast.Constant) and isinstance(key.value, str)
            )
    return frozenset()


def check_architecture(architecture: str, converter: Converter) -> None:
    """ConvertRefused unless `converter` converts `architecture`."""
    supported = converter.architectures()
    if architecture in supported:
        return
    # A few well-known ones first, so that the message is useful at a glance.
    known = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
    known += ["Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"]
    examples = [name for name in known if name in supported]
    raise ConvertRefused(
        f"llama.cpp's converter ({converter.origin}) does not support the architecture "
        f"{architecture!r}; it converts {len(supported)} others, among them "
        f"{', '.join(examples or sorted(supported)[:6])}",
        param="source",
    )


def check_converter_imports() -> None:
    """ConverterUnavailable unless what the converter imports is installed."""
    missing = [name for name in CONVERTER_IMPORTS if importlib.util.find_spec(name) is None]
    if missing:
        raise ConverterUnavailable(
            f"llama.cpp's converter needs {', '.join(missing)}, which this Python lacks: "
            "install the transformers backend and sentencepiece "
            "(pip install 'hearth[transformers]' sentencepiece)"
        )
