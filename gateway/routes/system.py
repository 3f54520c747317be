"""GET /system: this machine for running models (what `hearth doctor` prints), admin only."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency

from gateway.config import ConfigError
from gateway.gallery import GalleryIndex, Installer
from gateway.manager import BackendManager
from gateway.system.report import build_report


class SystemController(Controller):
    path = "/system"

    @get()
    async def system(
        self, manager: NamedDependency[BackendManager], installer: NamedDependency[Installer]
    ) -> dict[str, Any]:
        """The report with the running gateway's budget and footprints. The first call
        measures the machine and asks each engine about its build (seconds); later calls
        reuse that and read only what changes (memory, disk, sensors, GPUs, the models)."""
        try:
            index = await installer.load_index()
        except ConfigError as exc:
            index = GalleryIndex(entries=[], errors=[f"the gallery index is broken: {exc}"])
        report = await asyncio.to_thread(
            build_report,
            installer.models_dir,
            manager.budget,
            manager.footprints,
            index,
            manager.machine,
        )
        result: dict[str, Any] = msgspec.to_builtins(report)
        return result
