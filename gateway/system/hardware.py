"""What the machine is made of, read from /proc and /sys (and `nvidia-smi`): the CPU and its
instruction sets, memory, GPUs, the disk under the models dir, temperatures and power draw.

Every reader takes its roots as parameters (for tests). A figure the machine does not expose (a
container hides its sensors, RAPL counters are root's) is None with the reason, never a guess.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from gateway.manager.budget import Machine, MachineBudget

#: The instruction sets that decide how fast (and whether) an engine's build runs: name → the
#: /proc/cpuinfo flags that mean it (any one of them).
X86_FEATURES: dict[str, tuple[str, ...]] = {
    "sse4_2": ("sse4_2",),
    "avx": ("avx",),
    "avx2": ("avx2",),
    "fma": ("fma",),
    "f16c": ("f16c",),
    "avx512f": ("avx512f",),
    "avx512bw": ("avx512bw",),
    "avx512_vnni": ("avx512_vnni",),
    "avx512_bf16": ("avx512_bf16",),
    "avx_vnni": ("avx_vnni",),
    "amx": ("amx_tile",),
}
ARM_FEATURES: dict[str, tuple[str, ...]] = {
    "neon": ("asimd", "neon"),  # "neon" on 32-bit ARM
    "fp16": ("asimdhp",),
    "dotprod": ("asimddp",),
    "i8mm": ("i8mm",),
    "bf16": ("bf16",),
    "sve": ("sve",),
    "sve2": ("sve2",),
}
_ARM_MACHINES = ("aarch64", "arm64", "armv7l", "armv8l", "armv6l")
#: hwmon drivers and thermal zone types that measure the CPU (package or die).
_CPU_SENSORS = (
    "coretemp",
    "k10temp",
    "zenpower",
    "x86_pkg_temp",
    "cpu_thermal",
    "cpu-thermal",
    "soc_thermal",
    "cpu",
)
_NVIDIA_QUERY = "name,memory.total,memory.used,driver_version,temperature.gpu,power.draw"
_NVIDIA_TIMEOUT_S = 10
#: Two readings of the RAPL energy counters this far apart give the power drawn between them.
RAPL_INTERVAL_S = 0.25


class Cpu(msgspec.Struct):
    """The CPU: its model, how many cores models compute on, and its instruction sets."""

    model: str | None
    architecture: str
    #: The logical CPUs this process may run on (hyperthreads count).
    logical_cpus: int
    #: The physical cores among them.
    physical_cores: int
    #: The cores the gateway's backends compute on (its budget: a cgroup quota or HEARTH_CPUS).
    cores_for_models: int
    cores_from: str
    #: Each instruction set of X86_FEATURES or ARM_FEATURES: whether this CPU has it.
    features: dict[str, bool]
    #: Where the features were read (None: nowhere, so `features` is empty).
    features_from: str | None


class Memory(msgspec.Struct):
    total_bytes: int | None
    available_bytes: int | None
    #: "MemAvailable", or "cgroup limit" where a container's limit leaves less.
    available_from: str
    #: A cgroup's limit less its use, where one applies.
    cgroup_headroom_bytes: int | None
    swap_total_bytes: int | None
    swap_free_bytes: int | None
    #: What the gateway lets loaded models take, as `hearth run` computes it.
    for_models_bytes: int
    for_models_from: str


class Gpu(msgspec.Struct):
    vendor: str
    name: str
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    driver: str | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    #: Where it was found: nvidia-smi, /proc/driver/nvidia, /sys/class/drm.
    source: str = ""


class Gpus(msgspec.Struct):
    devices: list[Gpu]
    #: Said when there are none (or what could not be asked).
    note: str | None = None


class Disk(msgspec.Struct):
    """Room in the models dir (or, before it exists, in the folder it will be made in)."""

    models_dir: str
    measured_path: str
    free_bytes: int | None
    total_bytes: int | None
    note: str | None = None


class Reading(msgspec.Struct):
    sensor: str
    celsius: float


class PowerDomain(msgspec.Struct):
    domain: str
    watts: float


class Sensors(msgspec.Struct):
    temperatures: list[Reading]
    #: The hottest reading of a CPU sensor (None: none is exposed).
    cpu_celsius: float | None
    temperature_note: str | None
    power: list[PowerDomain]
    #: The CPU packages' power draw over RAPL_INTERVAL_S (None: not readable).
    cpu_watts: float | None
    power_note: str | None


# CPU --------------------------------------------------------------------------------------------


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """The CPU's model name and its feature flags, from /proc/cpuinfo (x86 or ARM)."""
    model: str | None = None
    flags: set[str] = set()
    fallback: dict[str, str] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if not colon:
            continue
        key, value = key.strip(), value.strip()
        if key == "model name" and model is None:
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key in ("Model", "Hardware", "CPU implementer", "CPU part"):
            fallback.setdefault(key, value)
    if model is None:  # ARM: a board name where the kernel has one, else the part number
        model = fallback.get("Model") or fallback.get("Hardware")
        if model is None and "CPU implementer" in fallback:
            part = fallback.get("CPU part", "?")
            model = f"ARM (implementer {fallback['CPU implementer']}, part {part})"
    return model, flags


def cpu_features(flags: set[str], architecture: str) -> dict[str, bool]:
    """X86_FEATURES or ARM_FEATURES, each as this CPU has it or not ({} for other CPUs)."""
    machine = architecture.lower()
    if machine in _ARM_MACHINES:
        table = ARM_FEATURES
    elif machine in ("x86_64", "amd64", "i686", "i386"):
        table = X86_FEATURES
    else:
        return {}
    return {name: any(flag in flags for flag in names) for name, names in table.items()}


def read_cpu(machine: Machine, budget: MachineBudget, architecture: str | None = None) -> Cpu:
    """The CPU as this process sees it (its affinity), with the budget's cores."""
    architecture = architecture or platform.machine()
    path = machine.proc / "cpuinfo"
    try:
        model, flags = parse_cpuinfo(path.read_text(errors="replace"))
        features_from: str | None = str(path)
    except OSError:
        model, flags, features_from = None, set(), None
    allowed = machine.cpus()
    features = cpu_features(flags, architecture) if features_from else {}
    return Cpu(
        model=model,
        architecture=architecture,
        logical_cpus=len(allowed),
        physical_cores=machine.physical_cores(allowed),
        cores_for_models=budget.cores,
        cores_from=budget.cores_from,
        features=features,
        features_from=features_from if features else None,
    )


def cache_bytes(sys_cpu: Path = Path("/sys/devices/system/cpu")) -> int | None:
    """The largest cache of CPU 0 (its last level), from sysfs."""
    sizes = []
    for index in (sys_cpu / "cpu0" / "cache").glob("index*"):
        with contextlib.suppress(OSError, ValueError):
            raw = (index / "size").read_text().strip().upper()
            scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(raw[-1:], 1)
            sizes.append(int(raw.rstrip("KMG")) * scale)
    return max(sizes) if sizes else None


# Memory -----------------------------------------------------------------------------------------


def read_memory(machine: Machine, budget: MachineBudget) -> Memory:
    info = machine.meminfo()
    available, available_from = machine.available_memory()
    return Memory(
        total_bytes=info.get("MemTotal"),
        available_bytes=available or None,
        available_from=available_from,
        cgroup_headroom_bytes=machine.cgroup_headroom(),
        swap_total_bytes=info.get("SwapTotal"),
        swap_free_bytes=info.get("SwapFree"),
        for_models_bytes=budget.memory_bytes,
        for_models_from=budget.memory_from,
    )


# GPUs -------------------------------------------------------------------------------------------

Runner = Callable[[list[str]], str]


def _run_nvidia_smi(command: list[str]) -> str:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=_NVIDIA_TIMEOUT_S, check=True
    )
    return done.stdout


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=<_NVIDIA_QUERY> --format=csv,noheader,nounits` (MiB, °C, W)."""
    gpus = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) < 4 or not fields[0]:
            continue
        fields += [""] * (6 - len(fields))
        total, used = _number(fields[1]), _number(fields[2])
        gpus.append(
            Gpu(
                vendor="NVIDIA",
                name=fields[0],
                memory_total_bytes=None if total is None else int(total * 1024**2),
                memory_used_bytes=None if used is None else int(used * 1024**2),
                driver=fields[3] or None,
                temperature_celsius=_number(fields[4]),
                power_watts=_number(fields[5]),
                source="nvidia-smi",
            )
        )
    return gpus


def _number(text: str) -> float | None:
    """A figure of nvidia-smi's ("[N/A]", "[Not Supported]": None)."""
    try:
        return float(text)
    except ValueError:
        return None


def read_gpus(
    proc: Path = Path("/proc"),
    drm: Path = Path("/sys/class/drm"),
    run: Runner | None = None,
    nvidia_smi: str | None = None,
) -> Gpus:
    """NVIDIA GPUs through nvidia-smi (else the driver's /proc entries), AMD ones through
    amdgpu's sysfs files."""
    devices: list[Gpu] = []
    notes = []
    program = nvidia_smi if nvidia_smi is not None else shutil.which("nvidia-smi")
    if program:
        command = [program, f"--query-gpu={_NVIDIA_QUERY}", "--format=csv,noheader,nounits"]
        try:
            devices += parse_nvidia_smi((run or _run_nvidia_smi)(command))
        except (OSError, subprocess.SubprocessError) as exc:
            notes.append(f"nvidia-smi failed: {exc}")
    if not devices:
        devices += _nvidia_from_proc(proc / "driver" / "nvidia" / "gpus")
    devices += _amd_from_sysfs(drm)
    note = "; ".join(notes) or None
    if not devices:
        note = (note + "; " if note else "") + "no GPU found: models run on the CPU"
    return Gpus(devices=devices, note=note)


def _nvidia_from_proc(root: Path) -> list[Gpu]:
    """The driver's own list (no memory figures): where nvidia-smi is not installed."""
    gpus = []
    for information in sorted(root.glob("*/information")):
        with contextlib.suppress(OSError):
            fields = dict(
                (key.strip(), value.strip())
                for key, _, value in (
                    line.partition(":") for line in information.read_text().splitlines()
                )
            )
            gpus.append(
                Gpu(vendor="NVIDIA", name=fields.get("Model", "NVIDIA GPU"), source=str(root))
            )
    return gpus


def _amd_from_sysfs(drm: Path) -> list[Gpu]:
    gpus = []
    for card in sorted(drm.glob("card[0-9]*")):
        device = card / "device"
        total = _read_int(device / "mem_info_vram_total")
        if total is None or "-" in card.name:  # card0-DP-1 and such are its outputs
            continue
        name = _read_text(device / "product_name") or "AMD GPU"
        gpus.append(
            Gpu(
                vendor="AMD",
                name=name,
                memory_total_bytes=total,
                memory_used_bytes=_read_int(device / "mem_info_vram_used"),
                source=str(card),
            )
        )
    return gpus


# Disk -------------------------------------------------------------------------------------------


def read_disk(models_dir: Path) -> Disk:
    where = models_dir.resolve()
    note = None
    while not where.exists() and where != where.parent:
        where = where.parent
    if where != models_dir.resolve():
        note = f"{models_dir} does not exist yet: measured where it would be made"
    try:
        usage = shutil.disk_usage(where)
    except OSError as exc:
        return Disk(str(models_dir.resolve()), str(where), None, None, f"not readable: {exc}")
    return Disk(str(models_dir.resolve()), str(where), usage.free, usage.total, note)


# Sensors ----------------------------------------------------------------------------------------


def read_temperatures(
    thermal: Path = Path("/sys/class/thermal"), hwmon: Path = Path("/sys/class/hwmon")
) -> tuple[list[Reading], float | None, str | None]:
    """Every thermal zone and hwmon temperature, the hottest CPU one, and why there is none."""
    readings: list[tuple[Reading, bool]] = []
    for zone in sorted(thermal.glob("thermal_zone*")):
        kind = _read_text(zone / "type") or zone.name
        millidegrees = _read_int(zone / "temp", signed=True)
        if millidegrees is not None:
            reading = Reading(f"{zone.name} ({kind})", millidegrees / 1000)
            readings.append((reading, kind.lower() in _CPU_SENSORS))
    for chip in sorted(hwmon.glob("hwmon*")):
        driver = _read_text(chip / "name") or chip.name
        for source in sorted(chip.glob("temp*_input")):
            millidegrees = _read_int(source, signed=True)
            if millidegrees is None:
                continue
            label = _read_text(chip / source.name.replace("_input", "_label"))
            name = f"{driver} {label}" if label else f"{driver} {source.name.split('_')[0]}"
            readings.append((Reading(name, millidegrees / 1000), driver.lower() in _CPU_SENSORS))
    plausible = [(r, cpu) for r, cpu in readings if -40 < r.celsius < 150]  # not a sentinel
    cpu_values = [r.celsius for r, cpu in plausible if cpu]
    note = None
    if not plausible:
        note = (
            "no temperature sensors are exposed here (no readable thermal zone or hwmon "
            "sensor, as is usual in containers and virtual machines)"
        )
    elif not cpu_values:
        note = "none of the sensors exposed here is the CPU's"
    return [r for r, _ in plausible], max(cpu_values) if cpu_values else None, note


def read_power(
    powercap: Path = Path("/sys/class/powercap"),
    interval: float = RAPL_INTERVAL_S,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[PowerDomain], float | None, str | None]:
    """Watts of each RAPL domain, from its energy counter read twice `interval` apart."""
    zones = sorted(z for z in powercap.glob("*rapl:*") if z.name.count(":") == 1)  # packages
    if not zones:
        return [], None, "no RAPL energy counters are exposed here (usual in VMs and containers)"
    first: dict[Path, int] = {}
    refused: list[str] = []
    for zone in zones:
        try:
            first[zone] = int((zone / "energy_uj").read_text())
        except PermissionError:
            refused.append(zone.name)
        except (OSError, ValueError):
            continue
    if not first:
        why = (
            "the RAPL energy counters are readable by root only (Linux has kept them from "
            "other users since 5.10)"
            if refused
            else "the RAPL energy counters could not be read"
        )
        return [], None, why
    start = time.monotonic()
    sleep(interval)
    domains = []
    for zone, before in first.items():
        after = _read_int(zone / "energy_uj")
        if after is None:
            continue
        if after < before:  # the counter wrapped
            after += _read_int(zone / "max_energy_range_uj") or 0
        elapsed = max(time.monotonic() - start, interval)
        name = _read_text(zone / "name") or zone.name
        domains.append(PowerDomain(name, round((after - before) / 1e6 / elapsed, 1)))
    packages = [d.watts for d in domains if d.domain.startswith("package")]
    return domains, round(sum(packages), 1) if packages else None, None


def read_sensors(
    thermal: Path = Path("/sys/class/thermal"),
    hwmon: Path = Path("/sys/class/hwmon"),
    powercap: Path = Path("/sys/class/powercap"),
) -> Sensors:
    temperatures, cpu_celsius, temperature_note = read_temperatures(thermal, hwmon)
    power, cpu_watts, power_note = read_power(powercap)
    return Sensors(temperatures, cpu_celsius, temperature_note, power, cpu_watts, power_note)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _read_int(path: Path, signed: bool = False) -> int | None:
    raw = _read_text(path)
    with contextlib.suppress(ValueError):
        value = int(raw)
        return value if signed or value >= 0 else None
    return None
