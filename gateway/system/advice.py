"""What a report means for a home user: short findings to act on, each "info" or "warning"."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from gateway.system.engines import BUSY_SHARE, Engine
from gateway.units import GIB, format_size

if TYPE_CHECKING:
    from gateway.system.report import SystemReport

#: Less free space than this in the models dir is worth a warning (a 7B Q4 GGUF is ~4.4 GB).
LOW_DISK_BYTES = 10 * GIB
#: CPU temperatures (°C) past which sustained generation is slowed by throttling.
HOT_CELSIUS, WARM_CELSIUS = 90.0, 80.0


class Advice(msgspec.Struct):
    severity: str  # "info" or "warning"
    message: str


def advise(report: SystemReport) -> list[Advice]:
    """The findings of `report`, warnings first."""
    found = [
        *_cpu(report),
        *_engines(report),
        *_gpus(report),
        *_memory(report),
        *_disk(report),
        *_sensors(report),
        *_models(report),
        *_speed(report),
    ]
    return sorted(found, key=lambda a: a.severity != "warning")


def _engine(report: SystemReport, name: str) -> Engine | None:
    return next((e for e in report.engines if e.name == name and e.installed), None)


def _cpu(report: SystemReport) -> list[Advice]:
    cpu, found = report.cpu, []
    features = cpu.features
    llama = _engine(report, "llama.cpp")
    built = set(llama.features.get("cpu", [])) if llama else set()
    if features.get("avx") is not None and not features.get("avx2"):
        found.append(
            Advice(
                "warning",
                "this CPU lacks AVX2: a llama.cpp built for AVX2 (the Docker image's is) stops "
                "with 'illegal instruction'; build it on this machine (`make run` compiles it "
                "for this CPU), and expect generation several times slower than on an AVX2 CPU",
            )
        )
    if features.get("avx512f") and built and "AVX512" not in built:
        found.append(
            Advice(
                "info",
                "this CPU has AVX-512 but llama.cpp here was built without it (a portable "
                "build): compiled for this CPU it reads prompts faster: "
                'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --force-reinstall --no-cache-dir '
                "llama-cpp-python",
            )
        )
    if features.get("neon") is not None and not features.get("dotprod"):
        found.append(
            Advice(
                "info",
                "this ARM CPU lacks the dot-product instructions (dotprod): quantized models "
                "run well below what newer ARM cores (Cortex-A76, Apple, Graviton 2 on) reach",
            )
        )
    if cpu.logical_cpus > cpu.physical_cores:
        found.append(
            Advice(
                "info",
                f"{cpu.logical_cpus} logical CPUs are {cpu.physical_cores} physical cores: "
                "Hearth computes on the physical ones (hyperthreads add little to llama.cpp)",
            )
        )
    found.append(
        Advice(
            "info",
            f"{cpu.cores_for_models} core(s) for models ({cpu.cores_from}): a model computing "
            f"alone uses {cpu.cores_for_models} threads; HEARTH_CPUS changes that, and `hearth "
            "tune NAME` measures what is fastest for a model",
        )
    )
    return found


def _engines(report: SystemReport) -> list[Advice]:
    found = []
    installed_backends = {m.backend for m in report.models if m.installed}
    for engine in report.engines:
        if engine.installed and engine.note:  # installed, but its probe failed
            message = f"{engine.name} is installed but {engine.note}"
            if "SIGILL" in engine.note:
                message += (
                    ": its models will not load on this CPU; build it on this machine "
                    "(`make run` compiles llama.cpp for this CPU)"
                )
            found.append(Advice("warning", message))
        elif not engine.installed and installed_backends & set(engine.backends):
            users = sorted(
                m.name for m in report.models if m.installed and m.backend in engine.backends
            )
            found.append(
                Advice("warning", f"{engine.name} is {engine.note}; installed: {', '.join(users)}")
            )
    return found


def _gpus(report: SystemReport) -> list[Advice]:
    speed = report.speed.read_bytes_per_second
    if not report.gpus.devices:
        rate = f" (measured here: {speed / 1e9:.0f} GB/s)" if speed else ""
        return [
            Advice(
                "info",
                "no GPU found: models run on the CPU, where a chat model generates about as "
                f"fast as memory can be read{rate}, so smaller and more quantized models are "
                "faster",
            )
        ]
    found = []
    names = ", ".join(g.name for g in report.gpus.devices)
    llama = _engine(report, "llama.cpp")
    if llama is not None and not llama.features.get("gpu_offload", True):
        found.append(
            Advice(
                "warning",
                f"found {names}, but llama.cpp here is built for the CPU only: rebuild it with "
                'GPU support (NVIDIA: CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall '
                "--no-cache-dir llama-cpp-python) and set `options: {gpu_layers: 99}` in a "
                "model's YAML",
            )
        )
    elif llama is not None:
        found.append(
            Advice(
                "info",
                "llama.cpp can offload to the GPU: set `options: {gpu_layers: 99}` in a GGUF "
                "model's YAML to use it (Hearth loads on the CPU by default)",
            )
        )
    torch = _engine(report, "torch")
    nvidia = any(g.vendor == "NVIDIA" for g in report.gpus.devices)
    if nvidia and torch is not None and not torch.features.get("cuda", True):
        found.append(
            Advice(
                "warning",
                "torch here cannot use the NVIDIA GPU (a CPU build): `make run TORCH_BUILD=cuda` "
                "installs the CUDA build, for the Transformers and Diffusers backends",
            )
        )
    return found


def _memory(report: SystemReport) -> list[Advice]:
    memory, sizing, found = report.memory, report.sizing, []
    fitting = [c.parameters for c in sizing.classes if c.fits_budget]
    if fitting:
        best = next(c for c in reversed(sizing.classes) if c.fits_budget)
        speed = (
            f", generating about {best.tokens_per_second:.0f} tok/s on this CPU"
            if best.tokens_per_second
            else ""
        )
        message = (
            f"{format_size(memory.for_models_bytes)} for models: chat models up to about "
            f"{sizing.largest_q4_billions:g}B parameters at Q4_K_M fit (a {best.parameters} "
            f"takes ~{format_size(best.q4_loaded_bytes)}{speed})"
        )
        found.append(Advice("info", message))
    else:
        found.append(
            Advice(
                "warning",
                f"only {format_size(memory.for_models_bytes)} for models: a 7B chat model at "
                f"Q4_K_M (~{format_size(sizing.classes[0].q4_loaded_bytes)}) does not fit; "
                f"models up to about {sizing.largest_q4_billions:g}B parameters do",
            )
        )
    if memory.available_from == "cgroup limit" and memory.total_bytes:
        found.append(
            Advice(
                "info",
                "a container memory limit applies: models get "
                f"{format_size(memory.for_models_bytes)} of the machine's "
                f"{format_size(memory.total_bytes)}",
            )
        )
    return found


def _disk(report: SystemReport) -> list[Advice]:
    free = report.disk.free_bytes
    if free is None or free >= LOW_DISK_BYTES:
        return []
    wanted = [
        m for m in report.models if not m.installed and m.download_bytes and m.download_bytes > free
    ]
    extra = f"; too little for {', '.join(m.name for m in wanted)}" if wanted else ""
    return [
        Advice(
            "warning",
            f"only {format_size(free)} free in the models dir ({report.disk.measured_path}): a 7B "
            f"model at Q4 takes about 4.4 GB of disk{extra}",
        )
    ]


def _sensors(report: SystemReport) -> list[Advice]:
    hot = report.sensors.cpu_celsius
    if hot is None:
        return []
    if hot >= HOT_CELSIUS:
        return [
            Advice(
                "warning",
                f"running hot: the CPU is at {hot:.0f} °C; under sustained generation it "
                "slows itself down to cool: check the fans, the airflow and the dust",
            )
        ]
    if hot >= WARM_CELSIUS:
        return [Advice("info", f"the CPU is warm ({hot:.0f} °C): long generations may throttle it")]
    return []


def _models(report: SystemReport) -> list[Advice]:
    too_big = [m.name for m in report.models if m.verdict == "too big"]
    if not too_big:
        return []
    return [
        Advice(
            "warning",
            f"too big for this machine's budget for models: {', '.join(too_big)} "
            "(HEARTH_MEMORY raises the budget if the machine has more to give)",
        )
    ]


def _speed(report: SystemReport) -> list[Advice]:
    busy = report.speed.others_busy_share
    if busy is None or busy < BUSY_SHARE:
        return []
    return [
        Advice(
            "info",
            f"other processes kept {busy:.0%} of the CPUs busy while this machine's speed was "
            "measured: the expected speeds are lower than an idle machine's",
        )
    ]
