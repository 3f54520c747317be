"""The models dir: model YAML files, read again whenever one changes."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

from gateway.config import Catalog, ModelConfig, load_catalog
from gateway.errors import model_not_found


class ModelRegistry:
    """The models dir, read again whenever its YAML files change.

    Async code asks `resolve` / `current`: the directory scan and any re-read run in a worker
    thread, one at a time, and callers that arrive meanwhile await the same one. The CLI asks the
    sync `get` / `catalog`.
    """

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._catalog = Catalog()
        self._lock = threading.Lock()  # a worker thread's refresh and a sync caller's
        self._refresh: asyncio.Task[Catalog] | None = None

    def _current_signature(self) -> tuple[tuple[str, int, int], ...]:
        if not self.models_dir.is_dir():
            return ()
        entries = []
        for path in self.models_dir.iterdir():
            if path.suffix in {".yaml", ".yml"}:
                with contextlib.suppress(OSError):
                    stat = path.stat()
                    entries.append((path.name, stat.st_mtime_ns, stat.st_size))
        return tuple(sorted(entries))

    @property
    def known(self) -> Catalog:
        """The catalog as last read, without looking at the models dir (no file I/O)."""
        return self._catalog

    def catalog(self) -> Catalog:
        """The catalog, re-read first if a YAML file changed (blocking: for sync callers)."""
        with self._lock:
            signature = self._current_signature()
            if signature != self._signature:
                self._catalog = load_catalog(self.models_dir)
                self._signature = signature
            return self._catalog

    def get(self, name: str) -> ModelConfig:
        """The model named `name` (blocking: for sync callers); 404 if there is none."""
        config = self.catalog().models.get(name)
        if config is None:
            raise model_not_found(name)
        return config

    async def current(self) -> Catalog:
        """The catalog, re-read first if a YAML file changed, in a worker thread."""
        refresh = self._refresh
        if refresh is None or refresh.get_loop() is not asyncio.get_running_loop():
            refresh = asyncio.get_running_loop().create_task(asyncio.to_thread(self.catalog))
            self._refresh = refresh
            refresh.add_done_callback(self._refreshed)
        # A caller that gives up does not cancel the scan the others wait for.
        return await asyncio.shield(refresh)

    def _refreshed(self, refresh: asyncio.Task[Catalog]) -> None:
        if self._refresh is refresh:
            self._refresh = None

    async def resolve(self, name: str) -> ModelConfig:
        """The model named `name`, from a fresh look at the models dir; 404 if there is none."""
        config = (await self.current()).models.get(name)
        if config is None:
            raise model_not_found(name)
        return config
