"""The machine budget: how many cores and how much memory the gateway's backends may use.

Cores are physical cores (SMT siblings share one core's arithmetic units, so llama.cpp gains
little from them) among the CPUs this process may run on, capped by a cgroup CPU quota.
Memory is what the kernel says is available (MemAvailable), or the cgroup's headroom where a
container limit is tighter, less a reserve for the rest of the system. `HEARTH_CPUS` and
`HEARTH_MEMORY` override either.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from gateway.units import MIB, format_size

#: Kept free for the system, the gateway and page cache: this share of what is available...
RESERVE_FRACTION = 0.10
#: ...but at least this much.
RESERVE_MINIMUM = 512 * MIB
#: A cgroup v1 limit at or above this means "no limit" (the kernel writes ~2^63).
_UNLIMITED = 1 << 60
#: The memory budget where the machine does not say what it has.
UNLIMITED = 1 << 62


@dataclass(frozen=True)
class MachineBudget:
    """What backends may use, and where each figure came from."""

    cores: int
    memory_bytes: int
    cores_from: str
    memory_from: str

    def describe(self) -> str:
        if self.memory_bytes >= UNLIMITED:
            memory = "no memory limit"
        else:
            memory = f"{format_size(self.memory_bytes)} of memory for models"
        return (
            f"machine budget: {self.cores} core(s) ({self.cores_from}); "
            f"{memory} ({self.memory_from})"
        )


class Machine:
    """Reads the CPU and memory facts of this machine (roots are parameters, for tests)."""

    def __init__(
        self,
        proc: Path = Path("/proc"),
        sys_cpu: Path = Path("/sys/devices/system/cpu"),
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        affinity: set[int] | None = None,
    ) -> None:
        self.proc = proc
        self.sys_cpu = sys_cpu
        self.cgroup_root = cgroup_root
        self._affinity = affinity

    # CPU --------------------------------------------------------------------------------------

    def cpus(self) -> set[int]:
        """The logical CPUs this process may run on."""
        if self._affinity is not None:
            return set(self._affinity)
        try:
            return set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return set(range(os.cpu_count() or 1))

    def physical_cores(self, cpus: set[int]) -> int:
        """Distinct (package, core) pairs among `cpus`; the CPU count where topology is hidden."""
        cores = set()
        for cpu in cpus:
            topology = self.sys_cpu / f"cpu{cpu}" / "topology"
            try:
                package = (topology / "physical_package_id").read_text().strip()
                core = (topology / "core_id").read_text().strip()
            except OSError:
                return len(cpus)
            cores.add((package, core))
        return len(cores) or len(cpus)

    def cpu_quota(self) -> float | None:
        """The cgroup CPU quota in CPUs (1.5 = one and a half), or None when unlimited."""
        quotas = []
        for directory in self._cgroup_chain("cpu"):
            v2 = directory / "cpu.max"
            if v2.is_file():
                quota, _, period = _read(v2).partition(" ")
                if quota != "max" and period:
                    quotas.append(int(quota) / int(period))
                continue
            quota_file, period_file = (
                directory / "cpu.cfs_quota_us",
                directory / "cpu.cfs_period_us",
            )
            if quota_file.is_file() and period_file.is_file():
                quota_us = int(_read(quota_file) or -1)
                if quota_us > 0:
                    quotas.append(quota_us / int(_read(period_file)))
        return min(quotas) if quotas else None

    # Memory -----------------------------------------------------------------------------------

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo in bytes."""
        values = {}
        try:
            text = (self.proc / "meminfo").read_text()
        except OSError:
            return {}
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
        return values

    def available_memory(self) -> tuple[int, str]:
        """Bytes available to new processes now, and which limit said so."""
        info = self.meminfo()
        available = info.get("MemAvailable") or info.get("MemFree") or 0
        source = "MemAvailable"
        headroom = self.cgroup_headroom()
        if headroom is not None and (not available or headroom < available):
            available, source = headroom, "cgroup limit"
        return available, source

    def cgroup_headroom(self) -> int | None:
        """The tightest cgroup memory limit less what that cgroup uses (page cache aside)."""
        best: int | None = None
        for directory in self._cgroup_chain("memory"):
            limit = used = None
            if (directory / "memory.max").is_file():  # v2
                raw = _read(directory / "memory.max")
                limit = None if raw in ("", "max") else int(raw)
                used = _int(directory / "memory.current")
                inactive = _stat(directory / "memory.stat", "inactive_file")
            else:  # v1
                raw = _read(directory / "memory.limit_in_bytes")
                limit = int(raw) if raw and int(raw) < _UNLIMITED else None
                used = _int(directory / "memory.usage_in_bytes")
                inactive = _stat(directory / "memory.stat", "total_inactive_file")
            if limit is None:
                continue
            headroom = max(0, limit - max(0, (used or 0) - (inactive or 0)))
            best = headroom if best is None else min(best, headroom)
        return best

    def _cgroup_chain(self, controller: str) -> list[Path]:
        """This process's cgroup folders for `controller`, from its own up to the mount root."""
        root = self.cgroup_root
        try:
            lines = (self.proc / "self" / "cgroup").read_text().splitlines()
        except OSError:
            lines = []
        if (root / "cgroup.controllers").is_file():  # v2, unified at the root
            mount, relative = root, next((ln[3:] for ln in lines if ln.startswith("0::")), "/")
        else:
            found = [root / name for name in _v1_mounts(controller) if (root / name).is_dir()]
            if not found:
                return []
            mount = found[0]
            relative = "/"
            for line in lines:
                _, controllers, path = line.split(":", 2)
                if controller in controllers.split(","):
                    relative = path
                    break
        leaf = mount / relative.lstrip("/")
        if not leaf.is_dir():  # a cgroup namespace: our cgroup is the mount itself
            leaf = mount
        chain = [leaf]
        while chain[-1] != mount and mount in chain[-1].parents:
            chain.append(chain[-1].parent)
        return chain

    # The budget -------------------------------------------------------------------------------

    def budget(self, cpus: int | None = None, memory: int | None = None) -> MachineBudget:
        """The budget, with `cpus` / `memory` (HEARTH_CPUS, HEARTH_MEMORY) taking precedence."""
        if cpus is not None:
            cores, cores_from = max(1, cpus), "HEARTH_CPUS"
        else:
            allowed = self.cpus()
            cores = self.physical_cores(allowed)
            cores_from = f"{cores} physical of {len(allowed)} logical CPU(s)"
            quota = self.cpu_quota()
            if quota is not None and math.floor(quota) < cores:
                cores = max(1, math.floor(quota))
                cores_from += f", cgroup quota {quota:g} CPUs"
        if memory is not None:
            memory_bytes, memory_from = memory, "HEARTH_MEMORY"
        else:
            memory_bytes, memory_from = self._memory_for_models(0)
        return MachineBudget(cores, memory_bytes, cores_from, memory_from)

    def _memory_for_models(self, held: int) -> tuple[int, str]:
        """What is available now plus `held` (what our own backends hold), less the reserve."""
        available, source = self.available_memory()
        if not available:
            return UNLIMITED, "unknown: no /proc/meminfo; set HEARTH_MEMORY"
        available += held
        reserve = max(RESERVE_MINIMUM, int(available * RESERVE_FRACTION))
        text = f"{source} {format_size(available)} less {format_size(reserve)} reserve"
        return max(0, available - reserve), text

    def regrown(self, budget: MachineBudget, held: int) -> MachineBudget | None:
        """A larger budget if more memory is available now than when `budget` was measured.

        `held` is the anonymous memory of our own backends (file pages, such as mmap-ed
        weights, already count as available). A gateway started while the machine was briefly
        busy so does not keep a small budget for ever. None when it has not grown or was set
        by HEARTH_MEMORY.
        """
        if budget.memory_from == "HEARTH_MEMORY":
            return None
        memory_bytes, memory_from = self._memory_for_models(held)
        if memory_bytes <= budget.memory_bytes:
            return None
        return MachineBudget(budget.cores, memory_bytes, budget.cores_from, memory_from)


def _v1_mounts(controller: str) -> list[str]:
    if controller == "cpu":
        return ["cpu", "cpu,cpuacct", "cpuacct,cpu"]
    return [controller]


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _int(path: Path) -> int | None:
    raw = _read(path)
    return int(raw) if raw.isdigit() else None


def _stat(path: Path, key: str) -> int | None:
    for line in _read(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


@dataclass(frozen=True)
class Resident:
    """Resident memory of a process and its descendants: all of it, and its anonymous part
    (what the kernel cannot drop, unlike the pages of mapped files)."""

    total: int = 0
    anonymous: int = 0


def resident_memory(pids: list[int], proc: Path = Path("/proc")) -> dict[int, Resident]:
    """Resident memory of each process in `pids` with its children (a custom backend's command
    may be a shell that starts the engine), from one pass over /proc."""
    parents: dict[int, int] = {}
    own: dict[int, Resident] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            pid = int(entry.name)
            parents[pid] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            own[pid] = _status_memory(entry / "status")
        except (OSError, ValueError, IndexError):
            continue
    wanted = set(pids)
    sums = {pid: [0, 0] for pid in pids}
    for pid, memory in own.items():
        ancestor, hops = pid, 0
        while ancestor not in wanted and ancestor in parents and hops < 64:
            ancestor, hops = parents[ancestor], hops + 1
        if ancestor in wanted:
            sums[ancestor][0] += memory.total
            sums[ancestor][1] += memory.anonymous
    return {pid: Resident(total, anonymous) for pid, (total, anonymous) in sums.items()}


def process_memory(pid: int, proc: Path = Path("/proc")) -> Resident:
    """Resident memory of one process (nothing, once it is gone)."""
    try:
        return _status_memory(proc / str(pid) / "status")
    except (OSError, ValueError, IndexError):
        return Resident()


def _status_memory(path: Path) -> Resident:
    values = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssShmem"):
            values[key] = int(rest.split()[0]) * 1024
    return Resident(values.get("VmRSS", 0), values.get("RssAnon", 0) + values.get("RssShmem", 0))
