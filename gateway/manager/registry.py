"""The models dir: model YAML files, read again whenever one changes."""

from __future__ import annotations

import contextlib
from pathlib import Path

from gateway.config import Catalog, ModelConfig, load_catalog
from gateway.errors import model_not_found


class ModelRegistry:
    """The models dir, read again whenever its YAML files change."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._catalog = Catalog()

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

    def catalog(self) -> Catalog:
        signature = self._current_signature()
        if signature != self._signature:
            self._catalog = load_catalog(self.models_dir)
            self._signature = signature
        return self._catalog

    def get(self, name: str) -> ModelConfig:
        config = self.catalog().models.get(name)
        if config is None:
            raise model_not_found(name)
        return config
