"""`hearth doctor`: this machine for running models, as a report with advice."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.system.report import SystemReport


def register(commands: Any, models: Any) -> None:
    """Add this package's subcommands: `commands` is hearth's, `models` is `hearth models`'s."""
    del models
    parser = commands.add_parser(
        "doctor",
        help="check this machine for running models: CPU, memory, GPU, disk, engines, fit",
        description=(
            "Report this machine's CPU (cores, instruction sets), memory, GPUs, disk, sensors "
            "and engines, whether each gallery model fits and how fast it should run, and "
            "advice. The same report as GET /system."
        ),
    )
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=doctor)


def doctor(args: argparse.Namespace) -> int:
    import msgspec

    from gateway.cli import _budget, _settings
    from gateway.manager.footprint import FootprintBook
    from gateway.system.report import build_report, load_index

    settings = _settings(args)
    report = build_report(
        settings.models_dir,
        _budget(settings),
        FootprintBook(settings.models_dir),
        load_index(),
    )
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(report), indent=2).decode())
        sys.stdout.write("\n")
    else:
        print(render(report))
    return 0


def _gb(count: float | None) -> str:
    from gateway.units import format_size

    return "?" if count is None else format_size(count)


def _count(parameters: int | None) -> str:
    if not parameters:
        return "-"
    if parameters >= 1e9:
        return f"{parameters / 1e9:.1f}B"
    return f"{parameters / 1e6:.0f}M"


def _rate(value: float | None, unit: str = "tok/s") -> str:
    if value is None:
        return "-"
    return f"~{value:.0f} {unit}" if value >= 10 else f"~{value:.1f} {unit}"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        (indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip()
        for row in rows
    ]


def render(report: SystemReport) -> str:
    """The report as `hearth doctor` prints it."""
    lines = [*_machine(report), *_memory(report), *_gpus(report), *_disk(report)]
    lines += [*_sensors(report), *_engines(report), *_gallery(report), *_sizing(report)]
    lines.append("\nAdvice")
    for advice in report.advice:
        mark = "!" if advice.severity == "warning" else "-"
        lines.append(f"  {mark} {advice.message}")
    return "\n".join(lines)


def _machine(report: SystemReport) -> list[str]:
    cpu, speed = report.cpu, report.speed
    have = [name for name, present in cpu.features.items() if present]
    lacks = [name for name, present in cpu.features.items() if not present]
    features = " ".join(have) or "-"
    if lacks:
        features += f" (not: {' '.join(lacks)})"
    if speed.read_bytes_per_second and speed.flops_per_second:
        measured = (
            f"memory read {speed.read_bytes_per_second / 1e9:.1f} GB/s, matrix product "
            f"{speed.flops_per_second / 1e9:.0f} GFLOP/s ({speed.threads} thread(s))"
        )
        if speed.others_busy_share:
            measured += f"; other processes used {speed.others_busy_share:.0%} of the CPUs"
    else:
        measured = speed.basis
    return [
        "Machine",
        *_table(
            [
                ["CPU", f"{cpu.model or '?'} ({cpu.architecture})"],
                ["cores", f"{cpu.physical_cores} physical of {cpu.logical_cpus} logical"],
                ["for models", f"{cpu.cores_for_models} ({cpu.cores_from})"],
                ["features", features],
                ["speed", measured],
            ]
        ),
    ]


def _memory(report: SystemReport) -> list[str]:
    memory = report.memory
    swap = "none"
    if memory.swap_total_bytes:
        swap = f"{_gb(memory.swap_free_bytes)} free of {_gb(memory.swap_total_bytes)}"
    rows = [
        ["total", _gb(memory.total_bytes)],
        ["available", f"{_gb(memory.available_bytes)} ({memory.available_from})"],
        ["for models", f"{_gb(memory.for_models_bytes)} ({memory.for_models_from})"],
        ["swap", swap],
    ]
    return ["\nMemory", *_table(rows)]


def _gpus(report: SystemReport) -> list[str]:
    lines = ["\nGPU"]
    for gpu in report.gpus.devices:
        detail = []
        if gpu.memory_total_bytes is not None:
            used = gpu.memory_used_bytes
            detail.append(
                f"{_gb(gpu.memory_total_bytes)} VRAM"
                + (f" ({_gb(used)} in use)" if used is not None else "")
            )
        if gpu.driver:
            detail.append(f"driver {gpu.driver}")
        if gpu.temperature_celsius is not None:
            detail.append(f"{gpu.temperature_celsius:.0f} °C")
        if gpu.power_watts is not None:
            detail.append(f"{gpu.power_watts:.0f} W")
        name = gpu.name if gpu.name.startswith(gpu.vendor) else f"{gpu.vendor} {gpu.name}"
        lines.append(f"  {name}: {', '.join(detail) or '-'}")
    if report.gpus.note:
        lines.append(f"  {report.gpus.note}")
    return lines


def _disk(report: SystemReport) -> list[str]:
    disk = report.disk
    line = (
        f"  models dir  {disk.models_dir}: {_gb(disk.free_bytes)} free of {_gb(disk.total_bytes)}"
    )
    return ["\nDisk", line] + ([f"  ({disk.note})"] if disk.note else [])


def _sensors(report: SystemReport) -> list[str]:
    sensors = report.sensors
    if sensors.temperatures:
        shown = ", ".join(f"{r.sensor} {r.celsius:.0f} °C" for r in sensors.temperatures[:6])
        more = len(sensors.temperatures) - 6
        temperature = shown + (f" and {more} more" if more > 0 else "")
    else:
        temperature = f"unavailable: {sensors.temperature_note}"
    if sensors.power:
        power = ", ".join(f"{d.domain} {d.watts:.1f} W" for d in sensors.power)
    else:
        power = f"unavailable: {sensors.power_note}"
    return ["\nSensors", *_table([["temperature", temperature], ["power", power]])]


def _engines(report: SystemReport) -> list[str]:
    rows = []
    for engine in report.engines:
        version = ", ".join(f"{d} {v}" for d, v in engine.versions.items()) or "-"
        if not engine.installed:
            rows.append([engine.name, "-", engine.note or "not installed"])
            continue
        rows.append([engine.name, version, engine.note or _build(engine.name, engine.features)])
    return ["\nEngines", *_table(rows)]


def _build(name: str, features: dict[str, Any]) -> str:
    """An engine's build features in a line."""
    if name == "llama.cpp":
        gpu = "GPU offload" if features.get("gpu_offload") else "no GPU offload"
        other = " ".join(features.get("other", {})) or ""
        return f"CPU: {' '.join(features.get('cpu', [])) or '-'}; {gpu}" + (
            f"; {other}" if other else ""
        )
    if name == "torch":
        cuda = f"CUDA ({', '.join(features['cuda_devices'])})" if features.get("cuda") else ""
        cuda = cuda or ("CUDA build, no GPU" if features.get("cuda_build") else "CPU build")
        return f"CPU capability {features.get('cpu_capability', '?')}; {cuda}"
    if name == "faster-whisper":
        types = ", ".join(features.get("cpu_compute_types", [])) or "?"
        cuda = (
            f"; {features['cuda_devices']} CUDA device(s)" if features.get("cuda_devices") else ""
        )
        return f"CPU compute types: {types}{cuda}"
    if name == "onnxruntime":
        return f"providers: {', '.join(features.get('providers', [])) or '?'}"
    if name == "espeak-ng":
        return str(features.get("program", ""))
    return ""


def _gallery(report: SystemReport) -> list[str]:
    rows = [["NAME", "BACKEND", "INSTALLED", "DOWNLOAD", "PARAMS", "NEEDS", "FITS", "EXPECTED"]]
    for model in report.models:
        expected = model.expected
        if expected.tokens_per_second is not None:
            speed = _rate(expected.tokens_per_second)
            if expected.prompt_tokens_per_second:
                speed += f" (prompts {_rate(expected.prompt_tokens_per_second)})"
        elif expected.prompt_tokens_per_second is not None:
            speed = f"{_rate(expected.prompt_tokens_per_second)} embedded"
        else:
            speed = "-"
        rows.append(
            [
                model.name,
                model.backend or "?",
                "yes" if model.installed else "-",
                _gb(model.download_bytes),
                _count(model.parameters),
                "?" if model.memory_bytes is None else f"~{_gb(model.memory_bytes)}",
                model.verdict,
                speed,
            ]
        )
    lines = ["\nGallery (what each model needs, whether it fits, its expected speed)"]
    lines += _table(rows)
    lines.append(
        "  (expected: estimates for one request on the CPU, from this machine's measured speed "
        "and the model's files; `--json` gives each one's basis)"
    )
    lines += [f"  warning: {error}" for error in report.gallery_errors]
    return lines


def _sizing(report: SystemReport) -> list[str]:
    sizing = report.sizing
    rows = [["MODEL", "USUAL NEED", "THIS MACHINE", "AT Q4_K_M", "FITS THE BUDGET", "EXPECTED"]]
    for size in sizing.classes:
        need = f"{size.ram_bytes / 1e9:.0f} GB RAM"
        if size.vram_bytes:
            need += f" or {size.vram_bytes / 1e9:.0f} GB VRAM"
        has = (
            "?" if size.fits_ram is None else ("enough RAM" if size.fits_ram else "too little RAM")
        )
        if size.fits_vram is not None:
            has += ", enough VRAM" if size.fits_vram else ", too little VRAM"
        rows.append(
            [
                size.parameters,
                need,
                has,
                f"~{_gb(size.q4_loaded_bytes)}",
                "yes" if size.fits_budget else "no",
                _rate(size.tokens_per_second),
            ]
        )
    return [
        "\nSizing (the usual table, and this machine)",
        *_table(rows),
        f"  largest chat model at Q4_K_M for the budget: ~{sizing.largest_q4_billions:g}B "
        f"parameters ({sizing.basis})",
    ]
