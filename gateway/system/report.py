"""The system report: what `hearth doctor` prints and `GET /system` returns, built in one place
from the machine, the engines, the gallery and the budget the gateway uses."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from gateway.config import ConfigError
from gateway.gallery import GalleryIndex, gallery_path, load_gallery
from gateway.manager.budget import Machine, MachineBudget
from gateway.manager.footprint import FootprintBook
from gateway.system.advice import Advice, advise
from gateway.system.engines import SLOW_FACTS, Engine, MachineSpeed, SlowFacts, buffer_bytes
from gateway.system.hardware import (
    Cpu,
    Disk,
    Gpus,
    Memory,
    Sensors,
    cache_bytes,
    read_cpu,
    read_disk,
    read_gpus,
    read_memory,
    read_sensors,
)
from gateway.system.models import ModelFit, Sizing, gallery_fits, sizing


class SystemReport(msgspec.Struct, kw_only=True):
    """This machine for running models: hardware, engines, the gallery's fit, and advice."""

    object: str = "system"
    #: When it was made (Unix seconds).
    checked_at: int
    cpu: Cpu
    memory: Memory
    gpus: Gpus
    disk: Disk
    sensors: Sensors
    engines: list[Engine]
    #: This machine's measured memory read and matrix-product rates (the speed estimates' basis).
    speed: MachineSpeed
    #: Every gallery entry: fits or not, and how fast it is expected to run.
    models: list[ModelFit]
    #: Entries of the gallery index left out, and why (or why the index could not be read).
    gallery_errors: list[str]
    sizing: Sizing
    advice: list[Advice]


def load_index() -> GalleryIndex:
    """The gallery index, or an empty one carrying why it could not be read."""
    try:
        return load_gallery(gallery_path())
    except ConfigError as exc:
        return GalleryIndex(entries=[], errors=[f"the gallery index is broken: {exc}"])


def build_report(
    models_dir: Path,
    budget: MachineBudget,
    book: FootprintBook,
    index: GalleryIndex,
    machine: Machine | None = None,
    facts: SlowFacts = SLOW_FACTS,
) -> SystemReport:
    """The report for `models_dir` under `budget` (the gateway's, or what `hearth run` would
    use), with `book`'s footprints. Blocking (reads files, runs probes): not on an event loop."""
    machine = machine or Machine()
    cpu = read_cpu(machine, budget)
    memory = read_memory(machine, budget)
    engines, speed = facts.get(
        budget.cores, buffer_bytes(cache_bytes(machine.sys_cpu), memory.available_bytes)
    )
    gpus = read_gpus(machine.proc)
    vram = max((g.memory_total_bytes or 0 for g in gpus.devices), default=0) or None
    report = SystemReport(
        cpu=cpu,
        memory=memory,
        gpus=gpus,
        disk=read_disk(models_dir),
        sensors=read_sensors(),
        engines=engines,
        speed=speed,
        models=gallery_fits(index, models_dir, budget, book, speed),
        gallery_errors=list(index.errors),
        sizing=sizing(memory.total_bytes, vram, budget, speed),
        advice=[],
        checked_at=int(time.time()),
    )
    report.advice = advise(report)
    return report
