"""The engines installed for the backends, their versions and build features, and this
machine's speed (memory read rate, matrix-product rate): all measured in short-lived child
processes (`gateway.system.child`), once per process, since they take seconds."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from gateway.units import MIB

log = logging.getLogger("hearth.system")

#: A child that takes longer is stopped (a first import of torch from a slow disk takes ~20 s).
CHILD_TIMEOUT_S = 60.0
#: The memory-speed buffer: several times the largest cache, so that it is read from memory.
_BUFFER_MIN, _BUFFER_MAX, _BUFFER_CACHES = 256 * MIB, 1024 * MIB, 4
#: Other processes' share of the CPUs past which the speed figures are said to be low.
BUSY_SHARE = 0.15


@dataclass(frozen=True)
class EngineSpec:
    """An engine: the module that tells whether it is installed, the distributions whose
    versions are shown, the backends that need it, what is lost without it, and its child
    probe (if any)."""

    name: str
    module: str
    distributions: tuple[str, ...]
    backends: tuple[str, ...]
    without: str
    probe: str | None = None


ENGINES = (
    EngineSpec(
        "llama.cpp",
        "llama_cpp",
        ("llama-cpp-python",),
        ("llama",),
        "the llama backend (GGUF models) cannot run",
        "llama_cpp",
    ),
    EngineSpec(
        "torch",
        "torch",
        ("torch",),
        ("transformers", "diffusers"),
        "the transformers and diffusers backends cannot run",
        "torch",
    ),
    EngineSpec(
        "transformers",
        "transformers",
        ("transformers",),
        ("transformers", "diffusers"),
        "the transformers and diffusers backends cannot run",
    ),
    # Only LoRA adapters of Transformers models need it: no backend stops without it.
    EngineSpec("peft", "peft", ("peft",), (), "Transformers models cannot take LoRA adapters"),
    EngineSpec(
        "diffusers", "diffusers", ("diffusers",), ("diffusers",), "the diffusers backend cannot run"
    ),
    EngineSpec(
        "faster-whisper",
        "faster_whisper",
        ("faster-whisper", "ctranslate2"),
        ("whisper",),
        "the whisper backend cannot run",
        "ctranslate2",
    ),
    EngineSpec(
        "onnxruntime",
        "onnxruntime",
        ("onnxruntime",),
        ("piper",),
        "the piper backend cannot run",
        "onnxruntime",
    ),
)


class Engine(msgspec.Struct):
    name: str
    installed: bool
    #: The backends that need it.
    backends: list[str]
    #: Distribution → version, of those installed.
    versions: dict[str, str]
    #: What its build can use (llama.cpp: the CPU instruction sets it was compiled for).
    features: dict[str, Any]
    note: str | None = None


class MachineSpeed(msgspec.Struct):
    """How fast this machine's cores read memory and multiply matrices, with as many threads
    as the gateway's backends compute with."""

    read_bytes_per_second: float | None
    flops_per_second: float | None
    threads: int
    #: How it was measured, or why it was not.
    basis: str
    #: Other processes' share of the CPUs while it was measured.
    others_busy_share: float | None = None


def _child(what: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.system.child", what, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).resolve().parents[2],  # where `gateway` imports from
    )


def _result(child: subprocess.Popen[str], deadline: float) -> tuple[dict[str, Any] | None, str]:
    """The child's JSON, or None with why there is none."""
    try:
        out, err = child.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return None, f"no answer within {CHILD_TIMEOUT_S:.0f} s"
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        why = f"it was killed by {name}"
        if name == "SIGILL":
            why += " (an instruction this CPU does not have: a build for another CPU)"
        return None, why
    if child.returncode != 0:
        last = (err.strip().splitlines() or ["no message"])[-1]
        return None, f"it failed: {last[:300]}"
    try:
        data = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, "it printed no result"
    return (data, "") if isinstance(data, dict) else (None, "it printed no result")


def parse_llama_system_info(text: str) -> dict[str, dict[str, str]]:
    """`llama_print_system_info()`: "CPU : SSE3 = 1 | AVX2 = 1 | ... | CUDA : ARCHS = 890 | ..."
    as {"CPU": {"SSE3": "1", "AVX2": "1"}, "CUDA": {"ARCHS": "890"}}."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for item in text.split("|"):
        item = item.strip()
        if not item:
            continue
        head, colon, rest = item.partition(":")
        if colon and "=" not in head:  # a new section: "CPU : SSE3 = 1"
            current = sections.setdefault(head.strip(), {})
            item = rest.strip()
        if current is None:
            current = sections.setdefault("", {})
        key, equals, value = item.partition("=")
        if key.strip():
            current[key.strip()] = value.strip() if equals else "1"
    return sections


def _versions(spec: EngineSpec) -> dict[str, str]:
    versions = {}
    for distribution in spec.distributions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[distribution] = importlib.metadata.version(distribution)
    return versions


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _features(spec: EngineSpec, data: dict[str, Any]) -> dict[str, Any]:
    if spec.probe == "llama_cpp":
        sections = parse_llama_system_info(str(data.get("system_info", "")))
        cpu = sections.pop("CPU", {})
        return {
            "cpu": sorted(k for k, v in cpu.items() if v == "1"),
            "cpu_missing": sorted(k for k, v in cpu.items() if v == "0"),
            "gpu_offload": bool(data.get("gpu_offload")),
            "other": sections,
            "system_info": data.get("system_info", ""),
        }
    return data


def probe_engines() -> list[Engine]:
    """Every engine of ENGINES, its child probes run side by side (each imports one engine)."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    children: dict[str, subprocess.Popen[str]] = {}
    for spec in ENGINES:
        if spec.probe and _installed(spec.module):
            try:
                children[spec.name] = _child(spec.probe)
            except OSError as exc:
                log.warning("cannot start the %s probe: %s", spec.name, exc)
    engines = []
    for spec in ENGINES:
        installed = _installed(spec.module)
        note = None if installed else f"not installed: {spec.without}"
        features: dict[str, Any] = {}
        if spec.name in children:
            data, why = _result(children[spec.name], deadline)
            if data is None:
                note = f"could not be asked about its build: {why}"
            else:
                features = _features(spec, data)
        engines.append(
            Engine(spec.name, installed, list(spec.backends), _versions(spec), features, note)
        )
    piper = shutil.which("espeak-ng")
    engines.append(
        Engine(
            "espeak-ng",
            piper is not None,
            ["piper"],
            {},
            {"program": piper} if piper else {},
            None
            if piper
            else "not installed: the piper backend reads text with it (apt-get install espeak-ng)",
        )
    )
    return engines


def _busy_jiffies(stat: Path) -> tuple[int, int] | None:
    """(busy, all) jiffies of every CPU together, from /proc/stat."""
    try:
        fields = stat.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9] if v.isdigit()]
    if len(values) < 4:
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def buffer_bytes(cache: int | None, available: int | None) -> int:
    """The memory-speed buffer: several times the last cache, within bounds and a share of
    what is available."""
    size = max(_BUFFER_MIN, min(_BUFFER_MAX, _BUFFER_CACHES * (cache or 0)))
    if available:
        size = min(size, available // 8)
    return max(16 * MIB, size)


def measure_speed(threads: int, total_bytes: int, stat: Path = Path("/proc/stat")) -> MachineSpeed:
    """The read rate and matrix-product rate of `threads` threads, and how busy the machine
    was with other work meanwhile (the figures are low when it was)."""
    threads = max(1, threads)
    pinned = {name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    pinned["MKL_NUM_THREADS"] = str(threads)
    before, own_before = _busy_jiffies(stat), _children_seconds()
    started = time.monotonic()
    try:
        child = _child("bandwidth", str(threads), str(total_bytes), env=pinned)
    except OSError as exc:
        return MachineSpeed(None, None, threads, f"not measured: {exc}")
    data, why = _result(child, time.monotonic() + CHILD_TIMEOUT_S)
    if data is None:
        return MachineSpeed(None, None, threads, f"not measured (numpy is needed): {why}")
    wall, after, own = time.monotonic() - started, _busy_jiffies(stat), _children_seconds()
    others = None
    if before and after and after[1] > before[1]:
        ticks = os.sysconf("SC_CLK_TCK")
        busy = (after[0] - before[0]) / ticks - (own - own_before)
        cpus = (after[1] - before[1]) / ticks / max(wall, 1e-3)  # CPUs the kernel counts
        others = round(min(1.0, max(0.0, busy / max(wall * cpus, 1e-3))), 2)
    basis = (
        f"measured with {threads} thread(s): a {total_bytes / MIB:.0f} MiB buffer read "
        "(numpy sum, best of 5), a float32 matrix product (numpy, best of 3)"
    )
    return MachineSpeed(
        float(data["read_bytes_per_second"]),
        float(data["flops_per_second"]),
        threads,
        basis,
        others,
    )


def _children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class SlowFacts:
    """The engines and the machine's speed, measured once (they take seconds) and kept for
    the life of the process; one caller measures while the others wait for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: list[Engine] | None = None
        self._speed: MachineSpeed | None = None

    def get(self, threads: int, total_bytes: int) -> tuple[list[Engine], MachineSpeed]:
        with self._lock:
            if self._speed is None:  # first, alone: the engines' imports would skew it
                self._speed = measure_speed(threads, total_bytes)
            if self._engines is None:
                self._engines = probe_engines()
            return self._engines, self._speed


#: One per process: `hearth doctor` asks once, a gateway's GET /system every time.
SLOW_FACTS = SlowFacts()
