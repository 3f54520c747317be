"""Install jobs: installs running in the background of a gateway, as GET /models/jobs shows them."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.gallery.errors import InstallCancelled, InstallError
from gateway.gallery.fetch import Progress
from gateway.gallery.index import GalleryEntry, GalleryIndex, load_gallery
from gateway.gallery.install import check_install, install_entry

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


class Installer:
    """Install jobs of one gateway: at most one active job per model."""

    def __init__(self, models_dir: Path, index_path: Path) -> None:
        self.models_dir = models_dir
        self.index_path = index_path
        self.jobs: dict[str, InstallJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def index(self) -> GalleryIndex:
        return load_gallery(self.index_path)

    async def load_index(self) -> GalleryIndex:
        """`index`, read and checked in a worker thread: for the event loop."""
        return await asyncio.to_thread(load_gallery, self.index_path)

    def running(self, name: str) -> InstallJob | None:
        """The job installing `name` now, if there is one."""
        return next((j for j in self.jobs.values() if j.model == name and j.active), None)

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
