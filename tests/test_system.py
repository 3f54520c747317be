"""`hearth doctor` and GET /system: this machine's real figures, a verdict for every gallery
model, advice that follows from what the machine exposes, and an admin-only route."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import yaml

from gateway.gallery import DEFAULT_INDEX
from gateway.system.advice import advise
from gateway.system.engines import _result, parse_llama_system_info
from gateway.system.hardware import (
    Gpu,
    Gpus,
    parse_cpuinfo,
    read_cpu,
    read_gpus,
    read_power,
    read_temperatures,
)
from gateway.system.models import gguf_parameters
from gateway.system.report import SystemReport
from gateway.units import GIB
from tests.conftest import Gateway, hearth, write_model
from tests.test_security import ADMIN_KEY, INFERENCE_KEY

# A Raspberry Pi 4 (Cortex-A72): NEON, but no dot-product instructions.
ARM_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

processor\t: 1
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08

Hardware\t: BCM2835
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""

# An x86 CPU from before AVX2 (Sandy Bridge).
OLD_X86_CPUINFO = """\
processor\t: 0
model name\t: Intel(R) Core(TM) i5-2400 CPU @ 3.10GHz
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 popcnt aes xsave avx
"""


@pytest.fixture(scope="module")
def doctor(real_models: Path) -> dict[str, Any]:
    """`hearth doctor --json` on the default models, installed."""
    result = hearth("doctor", "--json", "--models-dir", str(real_models))
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _report(doctor: dict[str, Any], **changes: Any) -> SystemReport:
    """The real report with some sections replaced (for advice on other machines)."""
    report = msgspec.convert(doctor, SystemReport)
    return msgspec.structs.replace(report, **changes)


def _physical_cores() -> int:
    """Distinct (physical id, core id) among the CPUs this process may use, per /proc/cpuinfo."""
    allowed = os.sched_getaffinity(0)
    cores, blocks = set(), Path("/proc/cpuinfo").read_text().split("\n\n")
    for block in blocks:
        fields = {
            k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in block.splitlines())
        }
        if "processor" in fields and int(fields["processor"]) in allowed:
            if "core id" not in fields:
                return len(allowed)
            cores.add((fields.get("physical id"), fields["core id"]))
    return len(cores)


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


def test_doctor_reports_this_machine(doctor: dict[str, Any]) -> None:
    cpu = doctor["cpu"]
    assert cpu["logical_cpus"] == len(os.sched_getaffinity(0))
    assert cpu["physical_cores"] == _physical_cores()
    flags = _cpu_flags()
    if "avx" in flags:  # x86
        assert cpu["features"]["avx2"] == ("avx2" in flags)
        assert cpu["features"]["avx512f"] == ("avx512f" in flags)
    mem_total = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    assert doctor["memory"]["total_bytes"] == mem_total
    assert 0 < doctor["memory"]["for_models_bytes"] < mem_total
    free = os.statvfs(doctor["disk"]["measured_path"])
    # Within what the other work on this machine may write meanwhile.
    assert doctor["disk"]["free_bytes"] == pytest.approx(free.f_bavail * free.f_frsize, abs=2 * GIB)
    # The machine's speed was measured, and each sensor is a value or says why there is none.
    assert doctor["speed"]["read_bytes_per_second"] > 1e8
    assert doctor["speed"]["flops_per_second"] > 1e8
    sensors = doctor["sensors"]
    assert (sensors["cpu_celsius"] is None) == bool(sensors["temperature_note"])
    assert sensors["power"] or sensors["power_note"]
    if not doctor["gpus"]["devices"]:
        assert "no GPU found: models run on the CPU" in doctor["gpus"]["note"]
    llama = next(e for e in doctor["engines"] if e["name"] == "llama.cpp")
    assert llama["installed"]
    assert llama["versions"]["llama-cpp-python"]
    assert ("AVX2" in llama["features"]["cpu"]) == ("AVX2 = 1" in llama["features"]["system_info"])
    assert {a["severity"] for a in doctor["advice"]} <= {"info", "warning"}


def test_doctor_gives_every_gallery_entry_a_verdict(
    doctor: dict[str, Any], real_models: Path
) -> None:
    index = yaml.safe_load(DEFAULT_INDEX.read_text())["entries"]
    rows = {row["name"]: row for row in doctor["models"]}
    assert list(rows) == [entry["name"] for entry in index]
    for entry in index:
        row = rows[entry["name"]]
        sized = all("size" in f for f in entry["files"])
        assert row["verdict"] in ({"fits", "too big"} if sized else {"unknown"}), row
        assert row["fits"] is {"fits": True, "too big": False, "unknown": None}[row["verdict"]]
    # As `hearth models available` says: same memory figure, same verdict.
    available = hearth("models", "available", "--models-dir", str(real_models))
    assert available.returncode == 0, available.stderr
    for line in available.stdout.splitlines()[1:]:
        name, _, _, _, needs, fits, _ = line.split("\t")
        row = rows[name]
        assert fits == {"fits": "fits", "too big": "too big", "unknown": "?"}[row["verdict"]]
        if row["memory_bytes"] is not None:
            assert needs.startswith(f"~{_size(row['memory_bytes'])}")
    chat = rows["smollm2-135m-instruct"]
    assert chat["installed"]
    assert chat["verdict"] == "fits"
    assert 130e6 < chat["parameters"] < 140e6  # SmolLM2-135M: 134.5M
    assert chat["expected"]["tokens_per_second"] > 1
    assert "GB/s" in chat["expected"]["basis"]
    embeddings = rows["all-minilm-l6-v2"]
    assert 22e6 < embeddings["parameters"] < 24e6  # all-MiniLM-L6-v2: 22.7M
    assert embeddings["expected"]["prompt_tokens_per_second"] > 1
    transcription = rows["whisper-base"]
    assert transcription["expected"]["tokens_per_second"] is None
    assert transcription["expected"]["basis"].startswith("not estimated")
    sizes = [c["parameters"] for c in doctor["sizing"]["classes"]]
    assert sizes == ["7B", "13B", "70B"]
    for size in doctor["sizing"]["classes"]:
        assert size["fits_ram"] == (doctor["memory"]["total_bytes"] >= size["ram_bytes"])


def _size(count: int) -> str:
    from gateway.units import format_size

    return format_size(count)


def test_doctor_prints_sections_and_advice(doctor: dict[str, Any], real_models: Path) -> None:
    result = hearth("doctor", "--models-dir", str(real_models))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for section in ("Machine", "Memory", "GPU", "Disk", "Sensors", "Engines", "Gallery", "Advice"):
        assert f"\n{section}" in f"\n{text}"
    cpu = doctor["cpu"]
    assert f"{cpu['physical_cores']} physical of {cpu['logical_cpus']} logical" in text
    features = next(line for line in text.splitlines() if line.strip().startswith("features"))
    present = features.split("(not:")[0].split()
    assert ("avx2" in present) == ("avx2" in _cpu_flags())
    for row in doctor["models"]:
        assert any(
            line.split()[:1] == [row["name"]] and row["verdict"] in line
            for line in text.splitlines()
        )


@pytest.fixture(scope="module")
def keyed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    models = tmp_path_factory.mktemp("system-models")
    write_model(models, "echo", "backend: echo")
    env = {
        "HEARTH_API_KEYS": INFERENCE_KEY,
        "HEARTH_ADMIN_KEYS": ADMIN_KEY,
        "HEARTH_CPUS": "1",
        "HEARTH_MEMORY": "1G",
    }
    running = Gateway(models, env=env).start()
    yield running
    running.cleanup()


def test_system_route_is_the_report_for_admins(
    keyed_gateway: Gateway, doctor: dict[str, Any]
) -> None:
    url = f"{keyed_gateway.url}/system"
    assert httpx.get(url, timeout=60).status_code == 401
    refused = httpx.get(url, headers={"authorization": f"Bearer {INFERENCE_KEY}"}, timeout=60)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_scope"
    response = httpx.get(url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
    assert response.status_code == 200, response.text
    report = response.json()
    assert set(report) == set(doctor)
    assert report["cpu"]["physical_cores"] == doctor["cpu"]["physical_cores"]
    assert report["cpu"]["features"] == doctor["cpu"]["features"]
    assert [m["name"] for m in report["models"]] == [m["name"] for m in doctor["models"]]
    # The running gateway's budget (HEARTH_CPUS, HEARTH_MEMORY), not the machine's.
    assert report["cpu"]["cores_for_models"] == 1
    assert report["memory"]["for_models_bytes"] == GIB
    assert report["memory"]["for_models_from"] == "HEARTH_MEMORY"
    assert not any(c["fits_budget"] for c in report["sizing"]["classes"])
    assert any(
        a["severity"] == "warning" and a["message"].startswith("only 1.0 GiB for models")
        for a in report["advice"]
    )


# Parsers and advice, on other machines' files -------------------------------------------------


def test_an_arm_cpu_is_read_and_its_missing_dotprod_advised(
    doctor: dict[str, Any], tmp_path: Path
) -> None:
    model, _flags = parse_cpuinfo(ARM_CPUINFO)
    assert model == "Raspberry Pi 4 Model B Rev 1.4"
    (tmp_path / "cpuinfo").write_text(ARM_CPUINFO)
    from gateway.manager.budget import Machine

    machine = Machine(proc=tmp_path, sys_cpu=tmp_path / "none", affinity={0, 1})
    cpu = read_cpu(machine, machine.budget(memory=GIB), architecture="aarch64")
    assert cpu.features == {
        "neon": True,
        "fp16": False,
        "dotprod": False,
        "i8mm": False,
        "bf16": False,
        "sve": False,
        "sve2": False,
    }
    assert cpu.physical_cores == cpu.logical_cpus == 2  # no topology: each CPU a core
    messages = [a.message for a in advise(_report(doctor, cpu=cpu))]
    assert any("lacks the dot-product instructions" in m for m in messages)
    assert not any("AVX2" in m for m in messages)


def test_a_cpu_without_avx2_is_warned_about(doctor: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(OLD_X86_CPUINFO)
    from gateway.manager.budget import Machine

    machine = Machine(proc=tmp_path, sys_cpu=tmp_path / "none", affinity={0})
    cpu = read_cpu(machine, machine.budget(memory=GIB), architecture="x86_64")
    assert cpu.model == "Intel(R) Core(TM) i5-2400 CPU @ 3.10GHz"
    assert cpu.features["avx"]
    assert not cpu.features["avx2"]
    warnings = [a for a in advise(_report(doctor, cpu=cpu)) if a.severity == "warning"]
    assert warnings[0].message.startswith("this CPU lacks AVX2")


def test_temperatures_from_thermal_zones_and_hwmon(doctor: dict[str, Any], tmp_path: Path) -> None:
    thermal, hwmon = tmp_path / "thermal", tmp_path / "hwmon"
    for name, kind, temp in (
        ("thermal_zone0", "acpitz", "41000"),
        ("thermal_zone1", "x86_pkg_temp", "92500"),
        ("thermal_zone2", "iwlwifi_1", None),  # a zone whose temp cannot be read
    ):
        (thermal / name).mkdir(parents=True)
        (thermal / name / "type").write_text(f"{kind}\n")
        if temp is not None:
            (thermal / name / "temp").write_text(f"{temp}\n")
    (hwmon / "hwmon3").mkdir(parents=True)
    (hwmon / "hwmon3" / "name").write_text("k10temp\n")
    (hwmon / "hwmon3" / "temp1_input").write_text("67250\n")
    (hwmon / "hwmon3" / "temp1_label").write_text("Tctl\n")
    readings, cpu, note = read_temperatures(thermal, hwmon)
    assert [(r.sensor, r.celsius) for r in readings] == [
        ("thermal_zone0 (acpitz)", 41.0),
        ("thermal_zone1 (x86_pkg_temp)", 92.5),
        ("k10temp Tctl", 67.25),
    ]
    assert cpu == 92.5
    assert note is None
    sensors = msgspec.structs.replace(
        _report(doctor).sensors, cpu_celsius=cpu, temperature_note=None
    )
    hot = [a for a in advise(_report(doctor, sensors=sensors)) if "running hot" in a.message]
    assert hot
    assert hot[0].severity == "warning"
    assert "92 °C" in hot[0].message
    # Nothing exposed (a container): no figure, and why.
    assert read_temperatures(tmp_path / "none", tmp_path / "none")[1:] == (
        None,
        "no temperature sensors are exposed here (no readable thermal zone or hwmon sensor, as "
        "is usual in containers and virtual machines)",
    )


def _rapl(root: Path, energy: int) -> Path:
    zone = root / "intel-rapl:0"
    (zone / "intel-rapl:0:0").mkdir(parents=True)  # a subzone (core): not counted again
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    return zone


def test_power_from_rapl_and_why_it_is_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zone = _rapl(tmp_path, 1_000_000)

    def five_joules_later(seconds: float) -> None:
        (zone / "energy_uj").write_text("6000000\n")

    domains, watts, note = read_power(tmp_path, interval=0.25, sleep=five_joules_later)
    assert [(d.domain, d.watts) for d in domains] == [("package-0", 20.0)]
    assert watts == 20.0
    assert note is None
    # Root-only counters, as on Linux 5.10 and later (the tests may run as root: the refusal
    # is the kernel's answer, made here).
    reading = Path.read_text

    def refuse(path: Path, *args: Any, **kwargs: Any) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return reading(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    domains, watts, note = read_power(tmp_path, sleep=lambda _: None)
    assert domains == []
    assert watts is None
    assert note is not None
    assert "readable by root only" in note
    monkeypatch.undo()
    assert read_power(tmp_path / "none")[2] == (
        "no RAPL energy counters are exposed here (usual in VMs and containers)"
    )


def test_nvidia_gpus_and_a_cpu_only_llama_cpp(doctor: dict[str, Any]) -> None:
    answer = "NVIDIA H200, 143771, 512, 570.86.15, 31, [N/A]\n"
    seen: list[list[str]] = []

    def nvidia_smi(command: list[str]) -> str:
        seen.append(command)
        return answer

    gpus = read_gpus(Path("/nonexistent"), Path("/nonexistent"), nvidia_smi, "nvidia-smi")
    assert seen[0][1].startswith("--query-gpu=name,memory.total,memory.used,driver_version")
    assert gpus == Gpus(
        devices=[
            Gpu(
                vendor="NVIDIA",
                name="NVIDIA H200",
                memory_total_bytes=143771 * 1024**2,
                memory_used_bytes=512 * 1024**2,
                driver="570.86.15",
                temperature_celsius=31.0,
                power_watts=None,
                source="nvidia-smi",
            )
        ]
    )
    report = _report(doctor, gpus=gpus)
    llama = next(e for e in report.engines if e.name == "llama.cpp")
    llama.features["gpu_offload"] = False
    messages = [a.message for a in advise(report) if a.severity == "warning"]
    assert any("llama.cpp here is built for the CPU only" in m for m in messages)
    assert not any(a.message.startswith("no GPU found") for a in advise(report))


def test_an_engine_that_cannot_run_here_is_a_warning(doctor: dict[str, Any]) -> None:
    # A build for another CPU dies on its first instruction this one lacks: SIGILL.
    child = subprocess.Popen(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    data, why = _result(child, time.monotonic() + 30)
    assert data is None
    assert why.startswith("it was killed by SIGILL (an instruction this CPU does not have")
    report = _report(doctor)
    llama = next(e for e in report.engines if e.name == "llama.cpp")
    llama.note = f"could not be asked about its build: {why}"
    espeak = next(e for e in report.engines if e.name == "espeak-ng")
    espeak.installed = False
    espeak.note = "not installed: the piper backend reads text with it (apt-get install espeak-ng)"
    next(m for m in report.models if m.name == "joe-us-piper").installed = True
    warnings = [a.message for a in advise(report) if a.severity == "warning"]
    assert any(
        m.startswith(
            "llama.cpp is installed but could not be asked about its build: it was killed by SIGILL"
        )
        and "will not load on this CPU" in m
        for m in warnings
    )
    assert any(m.startswith("espeak-ng is not installed") and "joe-us-piper" in m for m in warnings)


def test_llama_system_info_is_read_by_section() -> None:
    text = "CPU : SSE3 = 1 | AVX2 = 0 | OPENMP = 1 | CUDA : ARCHS = 890 | USE_GRAPHS = 1 | "
    assert parse_llama_system_info(text) == {
        "CPU": {"SSE3": "1", "AVX2": "0", "OPENMP": "1"},
        "CUDA": {"ARCHS": "890", "USE_GRAPHS": "1"},
    }


def test_gguf_parameters_match_the_gguf_package(tiny_gguf: Path, real_models: Path) -> None:
    from gguf import GGUFReader

    smollm2 = real_models / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    for path in (tiny_gguf, smollm2):
        expected = sum(int(t.n_elements) for t in GGUFReader(path).tensors)
        assert gguf_parameters(path) == expected


def test_an_adapter_takes_its_bases_verdict_wherever_the_index_lists_it(tmp_path: Path) -> None:
    from gateway.gallery import load_gallery
    from gateway.manager.budget import MachineBudget
    from gateway.manager.footprint import FootprintBook
    from gateway.system.engines import MachineSpeed
    from gateway.system.models import gallery_fits

    file = {"filename": "{}.gguf", "sha256": "0" * 64, "uri": "https://example.com/{}.gguf"}
    adapter = {"name": "pirate", "base": "chat", "config": {}, "model": "pirate.gguf"}
    chat = {"name": "chat", "config": {"backend": "llama"}, "model": "chat.gguf"}
    entries = [
        {**adapter, "files": [{k: v.format("pirate") for k, v in file.items()} | {"size": 9}]},
        {**chat, "files": [{k: v.format("chat") for k, v in file.items()} | {"size": 10**9}]},
    ]
    index_file = tmp_path / "index.yaml"
    index_file.write_text(yaml.safe_dump({"entries": entries}))
    index = load_gallery(index_file)
    assert not index.errors
    speed = MachineSpeed(10e9, 100e9, 2, "given")
    models = tmp_path / "models"
    for memory, verdict in ((64 * GIB, "fits"), (GIB // 4, "too big")):
        budget = MachineBudget(2, memory, "given", "given")
        rows = gallery_fits(index, models, budget, FootprintBook(models), speed)
        assert [row.name for row in rows] == ["pirate", "chat"]  # the index's order
        pirate, base = rows
        assert (pirate.base, pirate.verdict, base.verdict) == ("chat", verdict, verdict)
        assert pirate.memory_bytes == base.memory_bytes
        assert pirate.expected.tokens_per_second == base.expected.tokens_per_second > 0
