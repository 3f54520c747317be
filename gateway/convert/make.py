"""Making a new llama model: quantizing a GGUF, converting a Hugging Face folder to one, or
converting a PEFT LoRA adapter to a GGUF LoRA, added as a variant of the model it applies to.

All go the same way. A plan is made first and refused (ConvertRefused, nothing touched) if the
request cannot be carried out: an unknown type, a source that is not fit, a name already in use.
The work then runs in child processes (llama.cpp's quantizer, llama.cpp's converter) writing into
a private staging folder inside the models dir; the new GGUF is loaded and made to answer (the
output check; an adapter, on the model it applies to) before anything is added. Only then its
folder `<models dir>/<name>/` is made, the GGUF and a manifest moved into it (so that `hearth
models remove` deletes exactly them), and last its YAML, `<name>.yaml` (for an adapter, a
variant's: `base:` and `lora:`): the model appears whole or not at all, and nothing that exists
is ever replaced. A failure, a cancel or Ctrl-C removes the staging folder and leaves no trace.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.config import (
    ConfigError,
    ModelConfig,
    load_catalog,
    load_model_file,
    resolve_model_path,
)
from gateway.convert.adapter import (
    BaseConfig,
    PeftAdapter,
    base_config_folder,
    check_adapter,
    check_base_config,
    check_config_matches,
    is_adapter,
)
from gateway.convert.converter import (
    LORA_SCRIPT,
    SCRIPT,
    Converter,
    check_architecture,
    check_converter_imports,
    find_converter,
    provision_converter,
)
from gateway.convert.errors import (
    ConvertCancelled,
    ConvertError,
    ConvertRefused,
    NameTaken,
    SourceNotFound,
)
from gateway.convert.process import ChildFailed, child_environment, python_module, run_child
from gateway.convert.results import MadeModel, Progress, ProgressCallback
from gateway.convert.source import HFModel, check_source
from gateway.convert.types import FLOAT_TYPES, QuantizationType, quantization_type, type_name
from gateway.gallery.disk import (
    MANIFEST,
    Folder,
    Manifest,
    ManifestFile,
    UnsafePath,
    model_files,
)
from gateway.manager.modelfiles import GGUFHeader, ModelFileError, read_gguf
from gateway.safe_yaml import YAMLLoadError, load_yaml

#: What `hearth models convert` writes (the converter's --outtype values we offer).
CONVERT_TYPES = ("f16", "bf16", "f32", "q8_0")
#: A new model's name: also its folder's and its YAML's, so one path segment.
_NEW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Settings of the source's YAML that do not carry over to a quantized copy: its identity, and
#: `memory`, which was the source's size in memory.
_NOT_CARRIED = frozenset({"name", "model", "description", "source", "memory"})
_STAGING = re.compile(r"^\.hearth-(?:quantize|convert)-.+-(\d+)-[A-Za-z0-9_]+$")
_CONVERTED_TENSOR = re.compile(r"^INFO:hf-to-gguf:\S+,\s+torch\.\w+ --> \w+, shape")
_WRITE_PLAN = re.compile(r"n_tensors = (\d+), total_size = ([\d.]+)([KMGT]?)")
_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
#: A LoRA's scale: what a model YAML's `lora:` takes.
_SCALES = (-100.0, 100.0)
#: Hugging Face's libraries told to stay off the network, overriding the user's settings.
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# Names -------------------------------------------------------------------------------------------


def default_name(base: str, kind: str) -> str:
    """`<base>-<kind>`, made a valid model name (one path segment)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{base}-{kind}").strip("-._")
    return cleaned[:128] or kind


def folder_name(folder: Path) -> str:
    """A folder's name, lower-cased and made a valid model name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.resolve().name.lower()).strip("-._")
    return cleaned[:128] or "adapter"


def check_new_name(models_dir: Path, name: str) -> None:
    """ConvertRefused unless `name` can name a new model; NameTaken if a model, a YAML or a
    folder of the models dir has it already."""
    if not _NEW_NAME.match(name) or name.lower() in ("backends", "backends.yaml"):
        raise ConvertRefused(
            f"{name!r} cannot name a model: use letters, digits, '.', '_' and '-' (at most 128, "
            "starting with a letter or digit); it names its folder and YAML too",
            param="name",
        )
    if not models_dir.is_dir():
        return
    spellings = {f"{name.lower()}.yaml", f"{name.lower()}.yml", name.lower()}
    for existing in os.listdir(models_dir):
        if existing.lower() in spellings:
            raise NameTaken(f"{existing} is already in {models_dir}: pick another name")
    for other in model_files(models_dir):
        if other.name == name:
            raise NameTaken(f"{other.filename} already names a model {name!r}: pick another name")


# Quantize ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizePlan:
    """A quantization decided and checked, not yet begun."""

    source: str
    source_file: Path
    source_type: str | None
    target: QuantizationType
    name: str
    #: The new YAML's settings (the source's, less what does not carry over).
    settings: dict[str, Any]
    tensor_count: int

    @property
    def requantizing(self) -> bool:
        return self.source_type not in FLOAT_TYPES


def plan_quantize(
    models_dir: Path, model: str, quantization: str, name: str | None = None
) -> QuantizePlan:
    """Check a quantization of `model` to `quantization` (see the module)."""
    target = quantization_type(quantization)
    config = load_catalog(models_dir).models.get(model)
    if config is None:
        raise SourceNotFound(
            f"no model named {model!r} in {models_dir} (`hearth models list` lists them)",
            param="model",
        )
    if config.base is not None:
        raise ConvertRefused(
            f"{model} is a variant of {config.base} (its weights with LoRA adapters): quantize "
            f"{config.base}, then make a variant of the result",
            param="model",
        )
    if config.backend != "llama" or not config.model or not config.model.endswith(".gguf"):
        raise ConvertRefused(
            f"{model} is a {config.backend} model: quantizing makes GGUF files for llama.cpp, so "
            "only llama models whose `model:` is a .gguf file can be quantized",
            param="model",
        )
    path = resolve_model_path(models_dir, config.model)
    if not path.is_file():
        raise ConvertRefused(f"{model}'s file {config.model} is missing", param="model")
    try:
        header = read_gguf(path)
    except (ModelFileError, OSError) as exc:
        raise ConvertRefused(
            f"{config.model} cannot be read as GGUF: {exc}", param="model"
        ) from None
    file_type = header.metadata.get("general.file_type")
    source_type = type_name(file_type) if isinstance(file_type, int) else None
    if source_type == target.name:
        raise ConvertRefused(f"{model} is {target.name} already", param="quantization")
    new = name or default_name(model, target.name)
    check_new_name(models_dir, new)
    try:
        raw = load_yaml(Path(config.source))
    except YAMLLoadError as exc:
        raise ConvertRefused(str(exc), param="model") from None
    settings = {k: v for k, v in raw.items() if k not in _NOT_CARRIED}
    return QuantizePlan(
        model, path, source_type, target, new, settings, tensor_count=header.tensor_count
    )


def quantize(
    models_dir: Path,
    plan: QuantizePlan,
    *,
    report: ProgressCallback | None = None,
    cancelled: threading.Event | None = None,
) -> MadeModel:
    """Carry out `plan`: quantize, check, add. ConvertError (ConvertCancelled): nothing added."""
    report = report or (lambda _: None)
    cancelled = cancelled or threading.Event()
    started = time.monotonic()
    progress = Progress(phase="quantizing", tensors_total=plan.tensor_count)
    report(progress)
    with _staging(models_dir, "quantize", plan.name) as staging:
        output = staging / f"{plan.name}.gguf"
        argv = [str(plan.source_file), str(output), "--ftype", plan.target.constant]
        if plan.requantizing:
            argv.append("--requantize")
        if plan.settings.get("embeddings") or plan.settings.get("rerank"):
            argv.append("--embeddings")
        events = _run_worker(["quantize", *argv], staging, progress, report, cancelled)
        made = MadeModel(
            name=plan.name,
            yaml=f"{plan.name}.yaml",
            file=f"{plan.name}/{output.name}",
            source=plan.source,
            type=plan.target.name,
            source_bytes=plan.source_file.stat().st_size,
            bytes=output.stat().st_size,
            seconds=0.0,
        )
        _take_check(made, events)
        made.fallback_tensors = events.get("quantized", {}).get("fallback_tensors")
        if plan.requantizing:
            made.notes.append(
                f"{plan.source} is quantized already ({plan.source_type or 'its type unknown'}): "
                "quantizing it again loses more quality than quantizing from an f16 or bf16 "
                "GGUF (`hearth models convert` makes one from the Hugging Face release)"
            )
        if made.fallback_tensors:
            made.notes.append(
                f"llama.cpp gave {made.fallback_tensors} of {plan.tensor_count} tensors a "
                "fallback type: their rows are not a multiple of the block size of the type it "
                "chose for them (256 for k-quants)"
            )
        if made.bytes >= made.source_bytes:
            made.notes.append(
                f"the {plan.target.name} file is not smaller than the source "
                f"({plan.source_type or 'its type'})"
            )
        source_type = plan.source_type or "a GGUF"
        description = (
            f"{plan.source} ({source_type}) quantized to {plan.target.name} by "
            "`hearth models quantize`"
        )
        data = {
            "name": plan.name,
            "backend": plan.settings.get("backend", "llama"),
            "model": made.file,
            "description": description,
        }
        data.update({k: v for k, v in plan.settings.items() if k != "backend"})
        progress.phase = "placing"
        report(progress)
        _place(models_dir, plan.name, staging, output, data, cancelled)
    made.seconds = time.monotonic() - started
    return made


# Convert -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertPlan:
    """A conversion decided and checked (as far as can be without the converter)."""

    source: HFModel
    outtype: str
    name: str


def plan_convert(
    models_dir: Path,
    source: Path,
    outtype: str = "f16",
    name: str | None = None,
    *,
    confined: bool = False,
) -> ConvertPlan:
    """Check a conversion of the Hugging Face folder `source` (see the module). `confined`: the
    source must lie inside the models dir (requests over HTTP)."""
    wanted = _outtype(outtype)
    check_converter_imports()
    if source.is_dir() and is_adapter(source):
        raise ConvertRefused(
            f"{source.name} is a PEFT LoRA adapter (adapter_config.json): name the installed "
            "model it applies to (--base MODEL; `base` over HTTP), and it is converted to a "
            "GGUF LoRA and added as a variant of that model",
            param="base",
        )
    model = check_source(source, confined_to=models_dir if confined else None)
    new = name or default_name(source.resolve().name.lower(), wanted)
    check_new_name(models_dir, new)
    converter = find_converter()
    if converter is not None:  # else checked once it is fetched
        check_architecture(model.architecture, converter)
    return ConvertPlan(model, wanted, new)


def _outtype(outtype: str) -> str:
    wanted = outtype.strip().lower()
    if wanted not in CONVERT_TYPES:
        raise ConvertRefused(
            f"unknown outtype {outtype!r}: the converter writes {', '.join(CONVERT_TYPES)} "
            "(quantize the result for other types)",
            param="outtype",
        )
    return wanted


def convert(
    models_dir: Path,
    plan: ConvertPlan,
    *,
    report: ProgressCallback | None = None,
    cancelled: threading.Event | None = None,
) -> MadeModel:
    """Carry out `plan`: fetch the converter if need be, convert, check, add. ConvertError
    (ConvertCancelled): nothing added."""
    report = report or (lambda _: None)
    cancelled = cancelled or threading.Event()
    started = time.monotonic()
    progress = Progress(phase="fetching-converter")
    if find_converter() is None:
        report(progress)
    converter = provision_converter(cancelled)
    check_architecture(plan.source.architecture, converter)
    progress.phase = "converting"
    report(progress)
    with _staging(models_dir, "convert", plan.name) as staging:
        output = staging / f"{plan.name}.gguf"
        arguments = [str(plan.source.path.resolve()), "--outtype", plan.outtype]
        _run_converter(converter, SCRIPT, arguments, output, staging, progress, report, cancelled)
        events = _run_worker(["check", str(output)], staging, progress, report, cancelled)
        made = MadeModel(
            name=plan.name,
            yaml=f"{plan.name}.yaml",
            file=f"{plan.name}/{output.name}",
            source=str(plan.source.path),
            type=plan.outtype,
            source_bytes=_weights_bytes(plan.source.path),
            bytes=output.stat().st_size,
            seconds=0.0,
        )
        _take_check(made, events)
        data = {
            "name": plan.name,
            "backend": "llama",
            "model": made.file,
            "description": (
                f"{plan.source.path.name} ({plan.source.architecture}) converted to "
                f"{plan.outtype} GGUF by `hearth models convert`"
            ),
        }
        progress.phase = "placing"
        report(progress)
        _place(models_dir, plan.name, staging, output, data, cancelled)
    made.seconds = time.monotonic() - started
    return made


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model*.safetensors") if p.is_file())


def _run_converter(
    converter: Converter,
    script: str,
    arguments: list[str],
    output: Path,
    staging: Path,
    progress: Progress,
    report: ProgressCallback,
    cancelled: threading.Event,
    *,
    offline: bool = False,
) -> None:
    """Run llama.cpp's `script` with `arguments` (and --outfile `output`), following its log.
    `offline`: Hugging Face's libraries may not reach the network at all, whatever the
    environment says."""

    def on_line(line: str) -> None:
        if _CONVERTED_TENSOR.match(line):
            progress.tensors_done += 1
            report(progress)
            return
        planned = _WRITE_PLAN.search(line)
        if planned:
            progress.phase = "writing"
            progress.tensors_total = int(planned[1])
            progress.bytes_total = int(float(planned[2]) * _UNITS[planned[3]])
            report(progress)

    def on_tick() -> None:
        if progress.phase == "writing":
            with contextlib.suppress(OSError):
                size = output.stat().st_size
                progress.bytes_done = min(size, progress.bytes_total or size)
                report(progress)

    argv = python_module("gateway.convert.run_converter", str(converter.root), script)
    argv += [*arguments, "--outfile", str(output)]
    env = child_environment(_OFFLINE if offline else None)
    try:
        run_child(
            argv,
            cwd=staging,
            cancelled=cancelled,
            on_stderr=on_line,
            every_tick=on_tick,
            env=env,
        )
    except ChildFailed as exc:
        reason = exc.last_line()
        if "pre-tokenizer was not recognized" in reason:
            reason += (
                " (llama.cpp recognises a BPE tokenizer by the tokens it makes of a test text, "
                "and does not know this one's: a newer llama.cpp may, see HEARTH_LLAMA_CPP_DIR)"
            )
        which = "LoRA converter" if script == LORA_SCRIPT else "converter"
        raise ConvertError(f"llama.cpp's {which} failed: {reason}") from None
    if not output.is_file():
        raise ConvertError("llama.cpp's converter wrote no file")
    # The plan's total counted tensor data only: the file (its header too) is the real one.
    progress.bytes_done = progress.bytes_total = output.stat().st_size
    report(progress)


# Convert a LoRA adapter ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraPlan:
    """A LoRA adapter's conversion decided and checked (as far as can be without the
    converter): the adapter, the llama model it applies to, and the variant to add."""

    adapter: PeftAdapter
    base: str
    base_file: Path
    base_config: BaseConfig
    outtype: str
    name: str
    scale: float


def plan_convert_lora(
    models_dir: Path,
    source: Path,
    base: str,
    *,
    base_config: Path | None = None,
    outtype: str = "f16",
    name: str | None = None,
    scale: float = 1.0,
    confined: bool = False,
) -> LoraPlan:
    """Check a conversion of the PEFT LoRA folder `source` for the llama model `base`, with
    the base's Hugging Face config from `base_config` (else the adapter's own
    base_model_name_or_path, if that is a local folder). `confined`: every folder given must
    lie inside the models dir (requests over HTTP)."""
    wanted = _outtype(outtype)
    if not (isinstance(scale, int | float) and _SCALES[0] <= scale <= _SCALES[1]):
        raise ConvertRefused(
            f"scale {scale!r} is out of range: {_SCALES[0]:g} to {_SCALES[1]:g} (1.0 applies "
            "the adapter as trained)",
            param="scale",
        )
    check_converter_imports()
    within = models_dir if confined else None
    adapter = check_adapter(source, confined_to=within)
    config, base_file, header = _lora_base(models_dir, base)
    folder = base_config_folder(adapter, base_config, confined_to=within)
    hf_config = check_base_config(folder, confined_to=within)
    check_config_matches(hf_config, header, base)
    new = name or _lora_name(models_dir, source)
    check_new_name(models_dir, new)
    converter = find_converter(lora=True)
    if converter is not None:  # else checked once it is fetched
        _check_base_architecture(hf_config, converter)
    return LoraPlan(adapter, config.name, base_file, hf_config, wanted, new, float(scale))


def _lora_name(models_dir: Path, source: Path) -> str:
    """The adapter folder's name, lower-cased; `<name>-lora` if that folder is at the top of
    the models dir, where the new model's folder would go."""
    name = folder_name(source)
    if source.resolve().parent == models_dir.resolve():
        return f"{name}-lora"
    return name


def _lora_base(models_dir: Path, base: str) -> tuple[ModelConfig, Path, GGUFHeader]:
    """The model a LoRA is for: a llama model of the models dir (not a variant), that
    generates text, with its GGUF there. (config, GGUF, its header)"""
    config = load_catalog(models_dir).models.get(base)
    if config is None:
        raise SourceNotFound(
            f"no model named {base!r} in {models_dir} (`hearth models list` lists them)",
            param="base",
        )
    if config.base is not None:
        raise ConvertRefused(
            f"{base} is itself a variant (of {config.base}): name its base, {config.base}",
            param="base",
        )
    if config.backend != "llama" or not config.model or not config.model.endswith(".gguf"):
        raise ConvertRefused(
            f"{base} is a {config.backend} model: a GGUF LoRA applies to llama models whose "
            "`model:` is a .gguf file (the transformers backend takes the PEFT folder as it is, "
            "in `lora:`)",
            param="base",
        )
    if config.embeddings or config.rerank:
        raise ConvertRefused(f"{base} is not a text generation model", param="base")
    path = resolve_model_path(models_dir, config.model)
    if not path.is_file():
        raise ConvertRefused(f"{base}'s file {config.model} is missing", param="base")
    try:
        header = read_gguf(path)
    except (ModelFileError, OSError) as exc:
        raise ConvertRefused(
            f"{config.model} cannot be read as GGUF: {exc}", param="base"
        ) from None
    return config, path, header


def _check_base_architecture(config: BaseConfig, converter: Converter) -> None:
    try:
        check_architecture(config.architecture, converter)
    except ConvertRefused as exc:
        raise ConvertRefused(str(exc), param="base_config") from None


def convert_lora(
    models_dir: Path,
    plan: LoraPlan,
    *,
    report: ProgressCallback | None = None,
    cancelled: threading.Event | None = None,
) -> MadeModel:
    """Carry out `plan`: fetch the converter if need be, convert, check that llama.cpp applies
    it to the base, add the variant. ConvertError (ConvertCancelled): nothing added."""
    report = report or (lambda _: None)
    cancelled = cancelled or threading.Event()
    started = time.monotonic()
    progress = Progress(phase="fetching-converter")
    if find_converter(lora=True) is None:
        report(progress)
    converter = provision_converter(cancelled, lora=True)
    _check_base_architecture(plan.base_config, converter)
    progress.phase = "converting"
    report(progress)
    with _staging(models_dir, "convert", plan.name) as staging:
        adapter, base_config = _stage_inputs(plan, staging)
        output = staging / f"{plan.name}.gguf"
        arguments = ["--base", str(base_config), "--outtype", plan.outtype, str(adapter)]
        _run_converter(
            converter,
            LORA_SCRIPT,
            arguments,
            output,
            staging,
            progress,
            report,
            cancelled,
            offline=True,  # with --base it reads no hub; should it try, it fails, not fetches
        )
        check = ["check-lora", str(plan.base_file), str(output), "--scale", repr(plan.scale)]
        events = _run_worker(check, staging, progress, report, cancelled)
        made = MadeModel(
            name=plan.name,
            yaml=f"{plan.name}.yaml",
            file=f"{plan.name}/{output.name}",
            source=str(plan.adapter.path),
            type=plan.outtype,
            source_bytes=plan.adapter.weights.stat().st_size,
            bytes=output.stat().st_size,
            seconds=0.0,
            base=plan.base,
        )
        _take_check(made, events)
        made.base_answer = str(events["checked"].get("base_text", ""))
        if made.answer == made.base_answer:
            made.notes.append(
                f"with the adapter, {plan.base} answered the check as it does without: the "
                "adapter may change other answers only, or barely (scale "
                f"{plan.scale:g}; an adapter fresh from initialisation changes nothing)"
            )
        data = {
            "name": plan.name,
            "base": plan.base,
            "lora": [{"path": made.file, "scale": plan.scale}],
            "description": (
                f"{plan.base} with the LoRA adapter {plan.adapter.path.name}, converted to a "
                f"GGUF LoRA ({plan.outtype}) by `hearth models convert`"
            ),
        }
        progress.phase = "placing"
        report(progress)
        _place(models_dir, plan.name, staging, output, data, cancelled)
    made.seconds = time.monotonic() - started
    return made


def _stage_inputs(plan: LoraPlan, staging: Path) -> tuple[Path, Path]:
    """What the LoRA converter reads, in the staging folder: the adapter (its weights, and a
    config of just what the converter uses, with the alpha llama.cpp needs and no base name it
    could look up), and the base's config.json as it was checked. (adapter, config folder)"""
    adapter = staging / "adapter"
    adapter.mkdir()
    settings = {"peft_type": "LORA", "r": plan.adapter.rank, "lora_alpha": plan.adapter.alpha}
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    (adapter / plan.adapter.weights.name).symlink_to(plan.adapter.weights.resolve())
    base_config = staging / "base-config"
    base_config.mkdir()
    (base_config / "config.json").write_bytes(plan.base_config.data)
    return adapter, base_config


# Both --------------------------------------------------------------------------------------------


def _run_worker(
    argv: list[str],
    staging: Path,
    progress: Progress,
    report: ProgressCallback,
    cancelled: threading.Event,
) -> dict[str, dict[str, Any]]:
    """Run gateway.convert.worker; its last event of each kind, by kind. ConvertError with the
    worker's own reason if it failed."""
    events: dict[str, dict[str, Any]] = {}

    def on_event(line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        kind = str(event.pop("event", ""))
        events[kind] = event
        if kind == "progress":
            progress.tensors_done = int(event["tensors_done"])
            progress.tensors_total = int(event["tensors_total"])
            report(progress)
        elif kind == "quantized":
            progress.phase = "checking"
            report(progress)

    if argv[0].startswith("check"):
        progress.phase = "checking"
        report(progress)
    try:
        run_child(
            python_module("gateway.convert.worker", *argv),
            cwd=staging,
            cancelled=cancelled,
            on_stdout=on_event,
        )
    except ChildFailed as exc:
        if "error" in events:
            raise ConvertError(str(events["error"]["message"])) from None
        raise ConvertError(
            f"llama.cpp's worker process ended with status {exc.status}: "
            f"{exc.last_line() or 'no message'}"
        ) from None
    if "checked" not in events:
        raise ConvertError("the output check did not run")
    return events


def _take_check(made: MadeModel, events: dict[str, dict[str, Any]]) -> None:
    checked = events["checked"]
    made.prompt = str(checked.get("prompt", ""))
    made.answer = str(checked.get("text", ""))
    made.tokens = int(checked.get("tokens", 0))
    size = checked.get("embedding_size")
    made.embedding_size = int(size) if size is not None else None


@contextlib.contextmanager
def _staging(models_dir: Path, kind: str, name: str) -> Iterator[Path]:
    """A private folder in the models dir (so that the result moves into place without a
    copy), removed on the way out, whatever happened."""
    if not models_dir.is_dir():
        raise ConvertError(f"the models dir {models_dir} does not exist")
    _remove_abandoned_staging(models_dir)
    try:
        staging = Path(
            tempfile.mkdtemp(prefix=f".hearth-{kind}-{name}-{os.getpid()}-", dir=models_dir)
        )
    except OSError as exc:
        raise ConvertError(f"cannot write in the models dir {models_dir}: {exc}") from None
    try:
        yield staging.resolve()  # children run in it: a relative path would be theirs
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_abandoned_staging(models_dir: Path) -> None:
    """Staging folders of processes that are gone (killed with no chance to clean up)."""
    for entry in os.listdir(models_dir):
        match = _STAGING.match(entry)
        if match and not _alive(int(match[1])):
            shutil.rmtree(models_dir / entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _place(
    models_dir: Path,
    name: str,
    staging: Path,
    output: Path,
    data: dict[str, Any],
    cancelled: threading.Event,
) -> None:
    """Make `<name>/`, move the GGUF and a manifest into it, then write `<name>.yaml`; never
    replacing anything. A failure takes back what this placed."""
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()
    config_file = staging / f"{name}.yaml"
    config_file.write_bytes(text)
    config_file.chmod(0o644)
    files = [ManifestFile(path=output.name, sha256=_sha256(output), size=output.stat().st_size)]
    manifest = staging / MANIFEST
    manifest.write_bytes(Manifest(entry=name, files=files).encode())
    manifest.chmod(0o644)
    output.chmod(0o644)
    if cancelled.is_set():
        raise ConvertCancelled("cancelled")
    check_new_name(models_dir, name)  # the work took a while: look again
    with Folder.root(models_dir) as root:
        try:
            os.mkdir(name, 0o755, dir_fd=root.fd)
        except FileExistsError:
            raise NameTaken(
                f"{name}/ appeared in {models_dir} meanwhile; nothing was added"
            ) from None
        placed: list[str] = []
        try:
            folder = root.child(name)
            assert folder is not None  # just made
            with folder:
                for path in (output, manifest):
                    folder.place(path, path.name)
                    placed.append(path.name)
            # Read with its files in place (a variant's `lora:` must name a file that is
            # there): never add a YAML the gateway would refuse.
            try:
                load_model_file(config_file, models_dir)
            except ConfigError as exc:
                raise ConvertError(f"the new model's YAML would be invalid: {exc}") from None
            # The model exists from here on, whole.
            root.place(config_file, f"{name}.yaml")
        except BaseException as exc:
            _take_back(root, name, placed)
            if isinstance(exc, FileExistsError):
                raise NameTaken(f"{name}.yaml appeared meanwhile; nothing was added") from None
            if isinstance(exc, OSError):
                raise ConvertError(f"cannot write the new model: {exc}") from None
            raise


def _take_back(root: Folder, name: str, placed: list[str]) -> None:
    """Undo a `_place` that failed halfway: the files it moved in, then the folder it made."""
    with contextlib.suppress(OSError, UnsafePath):
        folder = root.child(name)
        if folder is not None:
            with folder:
                for placed_name in placed:
                    with contextlib.suppress(FileNotFoundError):
                        folder.unlink(placed_name)
        root.rmdir(name)
