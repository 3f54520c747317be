"""Gateway settings: defaults, then `HEARTH_*` environment variables, then command-line flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gateway.config import parse_keep_alive
from gateway.units import parse_size


@dataclass(frozen=True)
class Settings:
    """Everything the gateway process is configured with."""

    host: str = "127.0.0.1"
    port: int = 8080
    models_dir: Path = Path("models")
    #: Where backend sockets live; None makes a private 0700 directory per run.
    runtime_dir: Path | None = None
    #: Bearer keys clients must send; empty means no authentication (loopback use).
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    #: Seconds a new backend process gets to become healthy.
    backend_start_timeout: float = 60.0
    #: Seconds a model gets to load.
    load_timeout: float = 600.0
    #: Seconds one request may take in a backend.
    request_timeout: float = 600.0
    log_level: str = "info"
    #: Models to start and load as soon as the gateway is up.
    preload: tuple[str, ...] = ()
    #: Seconds an image made for `response_format: url` stays downloadable.
    image_ttl: float = 3600.0
    #: Largest audio upload accepted (OpenAI's own limit is 25 MB).
    max_upload_bytes: int = 25 * 1024 * 1024
    #: Cores backends may compute on; None: the physical cores this process may use.
    cpus: int | None = None
    #: Bytes of memory loaded models may take; None: what is available, less a reserve.
    memory: int | None = None
    #: Most models loaded at once; None: as many as memory allows.
    max_loaded_models: int | None = None
    #: Idle time before a model is unloaded, for models whose YAML sets none (-1: never).
    keep_alive: str = "5m"
    #: Divide the cores among the models computing at each moment. Off (HEARTH_SHARE_CORES=0):
    #: every backend keeps the threads it loaded with, as before this existed (for comparison).
    share_cores: bool = True

    def __post_init__(self) -> None:
        for name in ("cpus", "max_loaded_models"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, not {value}")
        if self.memory is not None and self.memory < 1:
            raise ValueError(f"memory must be more than 0, not {self.memory}")
        parse_keep_alive(self.keep_alive)  # refuse a bad value at start, not at the first unload

    def default_keep_alive_seconds(self) -> float:
        return parse_keep_alive(self.keep_alive)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, overridden by HEARTH_<FIELD> variables, overridden by `overrides`."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"HEARTH_{f.name.upper()}")
            if raw is not None and raw != "":
                try:
                    values[f.name] = _parse(f.name, raw)
                except ValueError as exc:
                    raise ValueError(f"HEARTH_{f.name.upper()}={raw!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        return replace(settings, models_dir=Path(settings.models_dir))


def _parse(name: str, raw: str) -> Any:
    if name in {"port", "max_upload_bytes", "cpus", "max_loaded_models"}:
        return int(raw)  # ranges are Settings.__post_init__'s to check, for flags too
    if name == "memory":
        return parse_size(raw)
    if name == "share_cores":
        if raw.strip().lower() not in {"0", "1", "true", "false", "on", "off", "yes", "no"}:
            raise ValueError("use 1 or 0")
        return raw.strip().lower() in {"1", "true", "on", "yes"}
    if name in {"backend_start_timeout", "load_timeout", "request_timeout", "image_ttl"}:
        return float(raw)
    if name in {"models_dir", "runtime_dir"}:
        return Path(raw)
    if name in {"api_keys", "preload"}:
        return tuple(k.strip() for k in raw.split(",") if k.strip())
    return raw
