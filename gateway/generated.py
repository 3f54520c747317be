"""Images made for `response_format: url`: kept in a private folder, served, then expired."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("hearth.generated")

_NAME = re.compile(r"^[A-Za-z0-9_-]{22,64}\.png$")


class GeneratedImages:
    """A folder of PNGs named by random ids; a name is valid until `ttl` seconds after writing."""

    def __init__(self, directory: Path, ttl: float) -> None:
        self.directory = directory
        self.ttl = ttl
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    def private(cls, parent: Path | None, ttl: float) -> GeneratedImages:
        """A fresh 0700 folder (under `parent` when given)."""
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        return cls(Path(tempfile.mkdtemp(prefix="generated-", dir=parent)), ttl)

    def save(self, png: bytes) -> str:
        """Store one PNG; return its name (unguessable: 128 random bits)."""
        name = f"{secrets.token_urlsafe(16)}.png"
        temporary = self.directory / f".{name}.part"
        temporary.write_bytes(png)
        os.replace(temporary, self.directory / name)
        return name

    def find(self, name: str) -> Path | None:
        """The file for `name`, or None if the name is malformed, unknown or expired."""
        if not _NAME.match(name):
            return None
        path = self.directory / name
        try:
            written = path.stat().st_mtime
        except OSError:
            return None
        if time.time() - written > self.ttl:
            path.unlink(missing_ok=True)
            return None
        return path

    def read_bytes(self, name: str) -> bytes | None:
        """The PNG named `name`, or None if the name is malformed, unknown or expired."""
        path = self.find(name)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError:  # swept between the look and the read
            return None

    async def store(self, png: bytes) -> str:
        """`save`, in a worker thread: for the event loop."""
        return await asyncio.to_thread(self.save, png)

    async def read(self, name: str) -> bytes | None:
        """`read_bytes`, in a worker thread: for the event loop."""
        return await asyncio.to_thread(self.read_bytes, name)

    def sweep(self) -> int:
        """Delete expired files; return how many."""
        removed = 0
        now = time.time()
        for path in self.directory.iterdir():
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > self.ttl:
                    path.unlink()
                    removed += 1
        return removed

    async def _sweep_forever(self) -> None:
        interval = min(max(self.ttl / 4, 0.5), 60.0)
        while True:
            await asyncio.sleep(interval)
            removed = await asyncio.to_thread(self.sweep)
            if removed:
                log.info("removed %d expired image(s)", removed)

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        shutil.rmtree(self.directory, ignore_errors=True)
