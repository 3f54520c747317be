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
    #: Inference keys clients must send; with no keys at all there is no authentication
    #: (loopback use). See gateway/auth.py.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    #: Keys that may also manage the server (gallery, unload, /backends, /metrics).
    admin_keys: tuple[str, ...] = field(default=(), repr=False)
    #: Keys that may only scrape /metrics.
    metrics_keys: tuple[str, ...] = field(default=(), repr=False)
    #: A YAML file of named keys with scopes and model lists.
    keys_file: Path | None = None
    #: Host names this server answers to besides loopback names, IP addresses and its own host
    #: name (".home.lan": every name under home.lan; "*": any).
    allowed_hosts: tuple[str, ...] = ()
    #: Origins whose web pages may call this server ("*": any); none by default.
    cors_origins: tuple[str, ...] = ()
    #: Listen on a non-loopback address without keys (anyone who reaches it may do anything).
    insecure: bool = False
    #: Seconds a new backend process gets to become healthy.
    backend_start_timeout: float = 60.0
    #: Seconds a model gets to load.
    load_timeout: float = 600.0
    #: Seconds between two health checks of each backend reached over the network (static
    #: and Ray placements): one that fails leaves the rotation until it passes again.
    health_interval: float = 2.0
    #: The Ray cluster of `placement: ray` models ("10.0.0.2:6379", the head's GCS address);
    #: unset: such models fail to start, saying so.
    ray_address: str | None = None
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

    # Staying up: bounds on what one request can make the server do (each a 400/413 past it).
    #: Largest JSON request body, in bytes.
    max_body_bytes: int = 10 * 1024 * 1024
    #: Deepest nesting of arrays and objects in a JSON body.
    max_json_depth: int = 64
    #: Longest audio accepted for transcription, in seconds of decoded sound.
    max_audio_seconds: float = 3600.0
    #: Most stop sequences in one request, and the longest one (characters).
    max_stop_sequences: int = 16
    max_stop_length: int = 1000
    #: Most embedding inputs in one request, and the most tokens in one input.
    max_embedding_inputs: int = 2048
    max_embedding_input_tokens: int = 8192
    #: Most images in one request (n), the largest side in pixels, the most steps, and the most
    #: work in one request: n x width x height x steps, in megapixel-steps (2^20 pixels).
    max_images: int = 10
    max_image_side: int = 2048
    max_image_steps: int = 150
    max_image_work: int = 500
    #: Longest text for /v1/tokenize, in characters.
    max_tokenize_chars: int = 200_000

    # Staying up: connections and shutdown.
    #: Seconds a client has to send a request's headers, and then each part of its body.
    read_timeout: float = 30.0
    #: Seconds an idle keep-alive connection stays open between requests.
    idle_timeout: float = 5.0
    #: Seconds in-flight requests get to finish after SIGTERM before backends are stopped.
    shutdown_grace: float = 20.0

    def __post_init__(self) -> None:
        for name in ("cpus", "max_loaded_models"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, not {value}")
        for f in fields(self):
            # Every bound (max_*) that is a count or a size: a limit of 0 would refuse all.
            if f.name.startswith("max_") and f.type == "int" and getattr(self, f.name) < 1:
                raise ValueError(f"{f.name.replace('_', '-')} must be at least 1")
        for name in ("max_audio_seconds", "read_timeout", "idle_timeout", "health_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be more than 0")
        if self.shutdown_grace < 0:
            raise ValueError("shutdown-grace must be 0 or more")
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


#: Settings given as sizes ("25MB", "10M", bytes).
_SIZES = frozenset({"memory", "max_body_bytes", "max_upload_bytes"})
_TYPES = {f.name: str(f.type) for f in fields(Settings)}


def _parse(name: str, raw: str) -> Any:
    kind = _TYPES[name].removesuffix(" | None")
    if name in _SIZES:
        return parse_size(raw)
    if kind == "int":
        return int(raw)  # ranges are Settings.__post_init__'s to check, for flags too
    if kind == "bool":
        if raw.strip().lower() not in {"0", "1", "true", "false", "on", "off", "yes", "no"}:
            raise ValueError("use 1 or 0")
        return raw.strip().lower() in {"1", "true", "on", "yes"}
    if kind == "float":
        return float(raw)
    if kind == "Path":
        return Path(raw)
    if kind == "tuple[str, ...]":
        return tuple(k.strip() for k in raw.split(",") if k.strip())
    return raw
