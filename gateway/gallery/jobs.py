"""Model jobs running in the background of a gateway, as GET /models/jobs shows them: gallery
installs, and quantizations and conversions (gateway/convert), in one table."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.convert.errors import ConvertCancelled, ConvertError, NameTaken
from gateway.convert.results import MadeModel
from gateway.convert.results import Progress as MakeProgress
from gateway.gallery.errors import InstallCancelled, InstallError
from gateway.gallery.fetch import Progress
from gateway.gallery.index import GalleryEntry, GalleryIndex, load_gallery
from gateway.gallery.install import check_install, install_entry

if TYPE_CHECKING:
    # gateway.convert.make uses the gallery's disk helpers: imported where it is used.
    from gateway.convert.make import ConvertPlan, LoraPlan, QuantizePlan

log = logging.getLogger("hearth.gallery")


@dataclass
class InstallJob:
    """One install running in the background, as GET /models/jobs/{id} shows it."""

    id: str
    model: str
    phase: str = "queued"  # queued | downloading | done | failed | cancelled
    error: str | None = None
    progress: Progress = field(default_factory=Progress)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def view(self) -> dict[str, Any]:
        p = self.progress
        return {
            "id": self.id,
            "object": "model.install",
            "type": "install",
            "model": self.model,
            "phase": self.phase,
            "file": p.file,
            "bytes_done": p.done,
            "bytes_total": p.total,
            "files_done": p.files_done,
            "files_total": p.files_total,
            "error": self.error,
            "created": int(self.created),
            "finished": int(self.finished) if self.finished else None,
        }

    @property
    def active(self) -> bool:
        return self.phase in ("queued", "downloading")


_FINISHED = ("done", "failed", "cancelled")


@dataclass
class MakeJob:
    """A quantization or a conversion running in the background, as GET /models/jobs/{id}
    shows it: `model` is the model it makes, `source` what from."""

    id: str
    type: str  # quantize | convert
    model: str
    source: str
    #: The llama.cpp type it makes (the quantization, or the converter's outtype).
    quantization: str
    #: A LoRA adapter's conversion: the model it makes a variant of.
    base: str | None = None
    #: queued, then the work's phases (gateway.convert.make.Progress), then done | failed |
    #: cancelled.
    phase: str = "queued"
    error: str | None = None
    progress: MakeProgress = field(default_factory=MakeProgress)
    result: MadeModel | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def view(self) -> dict[str, Any]:
        p = self.progress
        return {
            "id": self.id,
            "object": f"model.{self.type}",
            "type": self.type,
            "model": self.model,
            "source": self.source,
            "quantization": self.quantization,
            "base": self.base,
            "phase": self.phase,
            "tensors_done": p.tensors_done,
            "tensors_total": p.tensors_total,
            "bytes_done": p.bytes_done,
            "bytes_total": p.bytes_total,
            "result": self.result.view() if self.result else None,
            "error": self.error,
            "created": int(self.created),
            "finished": int(self.finished) if self.finished else None,
        }

    @property
    def active(self) -> bool:
        return self.phase not in _FINISHED


Job = InstallJob | MakeJob


class Installer:
    """The model jobs of one gateway: at most one active install per model, and one active
    quantize or convert per new model name."""

    def __init__(self, models_dir: Path, index_path: Path) -> None:
        self.models_dir = models_dir
        self.index_path = index_path
        self.jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def index(self) -> GalleryIndex:
        return load_gallery(self.index_path)

    async def load_index(self) -> GalleryIndex:
        """`index`, read and checked in a worker thread: for the event loop."""
        return await asyncio.to_thread(load_gallery, self.index_path)

    def running(self, name: str) -> InstallJob | None:
        """The job installing `name` now, if there is one."""
        installs = (j for j in self.jobs.values() if isinstance(j, InstallJob))
        return next((j for j in installs if j.model == name and j.active), None)

    def making(self, name: str) -> Job | None:
        """An active job writing the model `name` (a quantize or convert, or an install)."""
        return next((j for j in self.jobs.values() if j.model == name and j.active), None)

    async def make(self, plan: QuantizePlan | ConvertPlan | LoraPlan) -> MakeJob:
        """Start a quantization or a conversion planned (and checked) already. NameTaken: a
        job is making a model of that name now."""
        from gateway.convert.make import LoraPlan, QuantizePlan

        if self.making(plan.name) is not None:
            raise NameTaken(f"a job is making a model named {plan.name!r} already")
        job_id = f"job-{secrets.token_hex(8)}"
        if isinstance(plan, QuantizePlan):
            job = MakeJob(job_id, "quantize", plan.name, plan.source, plan.target.name)
        elif isinstance(plan, LoraPlan):
            source = plan.adapter.path.resolve().relative_to(self.models_dir.resolve())
            job = MakeJob(job_id, "convert", plan.name, str(source), plan.outtype, plan.base)
        else:
            source = plan.source.path.resolve().relative_to(self.models_dir.resolve())
            job = MakeJob(job_id, "convert", plan.name, str(source), plan.outtype)
        self.jobs[job.id] = job
        task = asyncio.get_running_loop().create_task(self._make(job, plan))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _make(self, job: MakeJob, plan: QuantizePlan | ConvertPlan | LoraPlan) -> None:
        def report(progress: MakeProgress) -> None:
            job.progress = progress
            job.phase = progress.phase

        from gateway.convert.make import LoraPlan, QuantizePlan, convert, convert_lora, quantize

        work: Any = convert
        if isinstance(plan, QuantizePlan):
            work = quantize
        elif isinstance(plan, LoraPlan):
            work = convert_lora
        try:
            job.result = await asyncio.to_thread(
                work, self.models_dir, plan, report=report, cancelled=job.cancel
            )
        except ConvertCancelled:
            job.phase = "cancelled"
        except ConvertError as exc:
            job.phase, job.error = "failed", str(exc)
        except Exception as exc:  # a bug of ours: the job says so instead of hanging
            log.error("%s of %s failed", job.type, job.model, exc_info=exc)
            job.phase, job.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            job.phase = "done"
            log.info("made %s (%s of %s)", job.model, job.type, job.source)
        job.finished = time.time()

    async def apply(self, entry: GalleryEntry) -> InstallJob:
        """Start installing `entry`, or return the job already installing it. InstallRefused:
        it would write where it may not (checked before the job starts)."""
        running = self.running(entry.name)
        if running is not None:
            return running  # the same install twice is one install
        await asyncio.to_thread(check_install, entry, self.models_dir)
        running = self.running(entry.name)  # one may have started while we checked
        if running is not None:
            return running
        job = InstallJob(id=f"job-{secrets.token_hex(8)}", model=entry.name)
        job.progress.files_total = len(entry.files)
        self.jobs[job.id] = job
        task = asyncio.get_running_loop().create_task(self._run(job, entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: InstallJob, entry: GalleryEntry) -> None:
        job.phase = "downloading"

        def report(progress: Progress) -> None:
            job.progress = progress

        try:
            await asyncio.to_thread(
                install_entry, entry, self.models_dir, report=report, cancelled=job.cancel
            )
        except InstallCancelled:
            job.phase = "cancelled"
        except InstallError as exc:
            job.phase, job.error = "failed", str(exc)
        except Exception as exc:  # a bug of ours: the job says so instead of hanging
            log.error("install of %s failed", entry.name, exc_info=exc)
            job.phase, job.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            job.phase = "done"
            log.info("installed %s", entry.name)
        job.finished = time.time()

    def close(self) -> None:
        for job in self.jobs.values():
            job.cancel.set()
