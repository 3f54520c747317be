"""`hearth models quantize` and `hearth models convert`."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PHASES = {
    "fetching-converter": "fetching llama.cpp's converter (once)",
    "converting": "reading tensors",
    "writing": "writing the GGUF",
    "quantizing": "quantizing tensors",
    "checking": "checking that it loads and answers",
    "placing": "adding it to the models dir",
}


def register(commands: Any, models: Any) -> None:
    """Add this package's subcommands: `commands` is hearth's, `models` is `hearth models`'s."""
    del commands
    quantize = models.add_parser(
        "quantize",
        help="make a smaller GGUF model from a llama model (q4_k_m, q8_0, ...)",
        description="Make a new model: a llama model's GGUF quantized to another llama.cpp "
        "type, with its own YAML (the source's settings), checked to load and answer.",
    )
    quantize.add_argument("name", metavar="NAME", help="a llama model of the models dir")
    quantize.add_argument(
        "--type",
        required=True,
        metavar="TYPE",
        help="a llama.cpp type: q4_0, q4_k_m, q5_k_m, q6_k, q8_0, f16, ... (a wrong one lists "
        "them all)",
    )
    quantize.add_argument("--name", dest="new_name", metavar="NEW", help="default: NAME-TYPE")
    quantize.add_argument("--models-dir", type=Path)
    quantize.set_defaults(handler=models_quantize)

    convert = models.add_parser(
        "convert",
        help="make a GGUF model from a Hugging Face safetensors folder, or a GGUF LoRA variant "
        "from a PEFT adapter",
        description="Make a new llama model from a local Hugging Face model folder (config.json, "
        "model*.safetensors, tokenizer) with llama.cpp's own converter, fetched once. Given a "
        "PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) and --base, "
        "make a GGUF LoRA of it and add it as a variant of that model.",
    )
    convert.add_argument("source", metavar="SOURCE_DIR", nargs="?")
    convert.add_argument("--outtype", default="f16", help="f16 (default), bf16, f32 or q8_0")
    convert.add_argument(
        "--name",
        dest="new_name",
        metavar="NEW",
        help="default: the folder's name-OUTTYPE (an adapter: the folder's name)",
    )
    convert.add_argument(
        "--base",
        metavar="MODEL",
        help="an adapter: the llama model of the models dir it applies to",
    )
    convert.add_argument(
        "--base-config",
        type=Path,
        metavar="HF_DIR",
        help="an adapter: the Hugging Face folder of the model it was trained on (its "
        "config.json is read); default: adapter_config.json's base_model_name_or_path, if local",
    )
    convert.add_argument(
        "--scale",
        type=float,
        metavar="S",
        help="an adapter: how strongly the variant applies it (default 1.0, as trained)",
    )
    convert.add_argument("--models-dir", type=Path)
    convert.add_argument(
        "--fetch-converter",
        action="store_true",
        help="only fetch llama.cpp's converter into the cache (for an image, or before going "
        "offline)",
    )
    convert.set_defaults(handler=models_convert)


def models_quantize(args: argparse.Namespace) -> int:
    from gateway.cli import _settings
    from gateway.convert.errors import ConvertError
    from gateway.convert.make import plan_quantize, quantize

    models_dir = _settings(args).models_dir
    try:
        plan = plan_quantize(models_dir, args.name, args.type, args.new_name)
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{plan.name}: quantizing {plan.source} ({plan.source_type or 'type unknown'}) to "
        f"{plan.target.name}",
        flush=True,
    )
    return _carry_out(
        plan.name,
        models_dir,
        lambda report, cancelled: quantize(models_dir, plan, report=report, cancelled=cancelled),
    )


def models_convert(args: argparse.Namespace) -> int:
    from gateway.cli import _settings
    from gateway.convert.converter import provision_converter
    from gateway.convert.errors import ConvertError
    from gateway.convert.make import convert, plan_convert

    if args.fetch_converter:
        try:
            converter = provision_converter(lora=True)
        except ConvertError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(
            f"llama.cpp's converter ({converter.origin}) is in {converter.root}; it converts "
            f"{len(converter.architectures())} architectures, and LoRA adapters for them"
        )
        return 0
    if args.source is None:
        print(
            "error: give SOURCE_DIR, a Hugging Face model folder or a PEFT LoRA adapter folder",
            file=sys.stderr,
        )
        return 2
    if args.base is not None:
        return _convert_lora(args)
    options = (("--base-config", args.base_config), ("--scale", args.scale))
    given = [option for option, value in options if value is not None]
    if given:
        print(f"error: {given[0]} is for LoRA adapters, with --base MODEL", file=sys.stderr)
        return 2
    models_dir = _settings(args).models_dir
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        plan = plan_convert(models_dir, Path(args.source), args.outtype, args.new_name)
    except OSError as exc:
        print(f"error: cannot make the models dir {models_dir}: {exc}", file=sys.stderr)
        return 1
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{plan.name}: converting {plan.source.path} ({plan.source.architecture}) to "
        f"{plan.outtype} GGUF",
        flush=True,
    )
    return _carry_out(
        plan.name,
        models_dir,
        lambda report, cancelled: convert(models_dir, plan, report=report, cancelled=cancelled),
    )


def _convert_lora(args: argparse.Namespace) -> int:
    from gateway.cli import _settings
    from gateway.convert.errors import ConvertError
    from gateway.convert.make import convert_lora, plan_convert_lora

    models_dir = _settings(args).models_dir
    try:
        plan = plan_convert_lora(
            models_dir,
            Path(args.source),
            args.base,
            base_config=args.base_config,
            outtype=args.outtype,
            name=args.new_name,
            scale=1.0 if args.scale is None else args.scale,
        )
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    adapter = plan.adapter
    modules = f" on {', '.join(adapter.target_modules)}" if adapter.target_modules else ""
    print(
        f"{plan.name}: converting the LoRA adapter {adapter.path} ({plan.base_config.architecture}"
        f", rank {adapter.rank}{modules}) to a GGUF LoRA ({plan.outtype}) for {plan.base}",
        flush=True,
    )
    return _carry_out(
        plan.name,
        models_dir,
        lambda report, cancelled: convert_lora(
            models_dir, plan, report=report, cancelled=cancelled
        ),
    )


def _carry_out(name: str, models_dir: Path, work: Callable[[Any, threading.Event], Any]) -> int:
    """Run `work(report, cancelled)` with progress shown, then say what was made."""
    from gateway.convert.errors import ConvertCancelled, ConvertError

    # SIGTERM (`docker stop`) cancels: the child is ended, the staging folder removed.
    cancelled = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancelled.set())
    try:
        if sys.stdout.isatty():
            made = _with_bars(name, work, cancelled)
        else:
            made = work(_line_reporter(name), cancelled)
    except (ConvertCancelled, KeyboardInterrupt) as exc:
        print(f"stopped: {name} was not made (nothing of it was kept)", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM
    except ConvertError as exc:
        print(f"error: {name} was not made: {exc}", file=sys.stderr)
        return 1
    _summary(made, models_dir)
    return 0


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def _summary(made: Any, models_dir: Path) -> None:
    if made.embedding_size is not None:
        print(f"{made.name}: it loads and embeds ({made.embedding_size} dimensions)")
    elif made.base is not None:
        print(
            f"{made.name}: it applies to {made.base} and answers {made.prompt!r} with "
            f"{made.answer!r} ({made.tokens} tokens); {made.base} alone: {made.base_answer!r}"
        )
    else:
        print(
            f"{made.name}: it loads and answers {made.prompt!r} with {made.answer!r} "
            f"({made.tokens} tokens)"
        )
    ratio = f" ({made.bytes / made.source_bytes:.0%} of the size)" if made.source_bytes else ""
    print(
        f"{made.name}: {_megabytes(made.source_bytes)} -> {_megabytes(made.bytes)}{ratio}, "
        f"in {made.seconds:.1f} s"
    )
    for note in made.notes:
        print(f"note: {note}")
    variant = f" as a variant of {made.base}" if made.base is not None else ""
    print(f"{made.name}: added to {models_dir}{variant} ({made.yaml}, {made.file})")


def _line_reporter(name: str) -> Callable[[Any], None]:
    """Progress as plain lines (a log, a pipe): each phase, and every tenth of its work."""
    shown: dict[str, int] = {}

    def report(progress: Any) -> None:
        if progress.phase not in shown:
            shown[progress.phase] = -1
            print(f"{name}: {_PHASES.get(progress.phase, progress.phase)}", flush=True)
        done, total, unit = _amounts(progress)
        if not total:
            return
        tenth = min(10, done * 10 // total)
        if tenth != shown[progress.phase]:
            shown[progress.phase] = tenth
            amount = f"{done}/{total} {unit}"
            if unit == "bytes":
                amount = f"{_megabytes(done)} of {_megabytes(total)}"
            print(f"{name}: {tenth * 10}% ({amount})", flush=True)

    return report


def _amounts(progress: Any) -> tuple[int, int | None, str]:
    if progress.phase == "writing":
        return progress.bytes_done, progress.bytes_total, "bytes"
    if progress.phase == "quantizing":
        return progress.tensors_done, progress.tensors_total, "tensors"
    return 0, None, ""


def _with_bars(name: str, work: Callable[[Any, threading.Event], Any], cancelled: Any) -> Any:
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn())
    with Progress(*columns, TimeElapsedColumn()) as bars:
        tasks: dict[str, Any] = {}

        def report(progress: Any) -> None:
            phase = progress.phase
            if phase not in tasks:
                for other, task in tasks.items():  # a new phase: the others are done
                    if other != phase:
                        bars.update(task, total=1, completed=1)
                label = f"{name}: {_PHASES.get(phase, phase)}"
                tasks[phase] = bars.add_task(label, total=None)
            done, total, _ = _amounts(progress)
            bars.update(tasks[phase], completed=done, total=total)

        made = work(report, cancelled)
        for task in tasks.values():
            bars.update(task, total=1, completed=1)
        return made
