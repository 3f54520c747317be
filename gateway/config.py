"""Model YAML: one file per model in the models dir, plus an optional `backends.yaml`.

Decoded with msgspec into typed structs; unknown keys and wrong types are rejected with the
file and the field named. Model file paths are relative to the models dir and never escape it.
Files are parsed by `gateway.safe_yaml`: one too large, or whose aliases expand it too far, is
reported like any other broken file.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from gateway.safe_yaml import MODEL_FILE_LIMITS, YAMLLimits, YAMLLoadError, load_yaml
from gateway.units import parse_size
from protos.hearth.backend.v1.contract import is_loopback_address

log = logging.getLogger("hearth.config")

BUILTIN_BACKENDS = frozenset({"llama", "transformers", "whisper", "diffusers", "piper", "echo"})
BACKENDS_FILE_NAMES = frozenset({"backends.yaml", "backends.yml"})

_Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")]
# Numbers that travel to backends in the contract's 32- and 64-bit fields: a YAML value past
# them is the file's error at load, not a failure of every request.
_Positive = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
_Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class ConfigError(Exception):
    """A YAML file that cannot be used, with the file and the field at fault."""


class Parameters(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Request defaults; a request's own values win."""

    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    max_tokens: _Positive | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(ge=0)] | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    seed: _Seed | None = None
    stop: list[str] | None = None


class LoraAdapter(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A LoRA adapter applied on top of the model: a GGUF LoRA file (llama) or a PEFT adapter
    folder with safetensors weights (transformers)."""

    #: Relative to the models dir.
    path: str
    #: How strongly it applies: 1.0 as trained, 0 not at all, negative to push away from it.
    scale: Annotated[float, msgspec.Meta(ge=-100, le=100)] = 1.0


#: The built-in backends that apply LoRA adapters (`lora`), and serve a base's variants
#: (`base`) from the base's own process.
LORA_BACKENDS = frozenset({"llama", "transformers", "echo"})
#: What a variant (`base:`) may set itself; every other setting is its base's, since the
#: variant runs in the base's process.
_VARIANT_FIELDS = frozenset(
    {"name", "base", "lora", "description", "system_prompt", "parameters", "source"}
)

#: The built-in backends that serve cross-encoders (`rerank: true`).
_RERANKING_BACKENDS = frozenset({"transformers", "llama", "echo"})
_KINDS: dict[str, Literal["transcription", "image", "speech"]] = {
    "whisper": "transcription",
    "diffusers": "image",
    "piper": "speech",
}


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One model: what clients call it, which backend serves it, and how."""

    name: _Name
    #: Which backend serves it; a variant (`base:`) takes its base's.
    backend: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_-]*$")] = ""
    #: This model is a variant of another model of the models dir: the base's weights with
    #: this file's `lora` adapters (and its own system prompt and parameters), served by the
    #: base's process, so variants share the base's memory.
    base: _Name | None = None
    #: LoRA adapters applied in order (a variant's after its base's).
    lora: list[LoraAdapter] = msgspec.field(default_factory=list)
    #: The model file or directory, relative to the models dir.
    model: str | None = None
    description: str | None = None
    context_size: _Positive | None = None
    threads: _Positive | None = None
    batch_size: _Positive | None = None
    mmap: bool | None = None
    seed: _Seed | None = None
    #: The model serves embeddings (and not text generation); a Transformers one reranks too
    #: (/v1/rerank, by cosine similarity).
    embeddings: bool = False
    #: The model is a reranker: a cross-encoder scoring query-document pairs (/v1/rerank).
    rerank: bool = False
    #: A Jinja chat template that replaces the model's own.
    chat_template: str | None = None
    #: Prepended as a system message when a chat has none.
    system_prompt: str | None = None
    parameters: Parameters = msgspec.field(default_factory=Parameters)
    #: Idle time before the backend process is ended ("30s", "15m", "2h", seconds; 0: right
    #: after each request; -1: never). Unset: the gateway's default (HEARTH_KEEP_ALIVE, 5m).
    keep_alive: str | int | float | None = None
    #: What loading the model takes in memory ("6GiB"), where the estimate from its files is
    #: wrong or impossible (a custom backend). Unset: estimated, then measured.
    memory: str | int | None = None
    #: Requests one backend works on at once; more wait in a queue of `max_queue`, then 429.
    #: Unset: what the backend asks for at load (embedding models batch concurrent requests
    #: and ask for 16), else 1.
    max_concurrency: _Positive | None = None
    #: Generations computed together in one context (continuous batching, llama; static
    #: batching, transformers), each with its own `context_size` of cache. Unset: 4 where the
    #: memory budget holds the extra caches, else 1.
    parallel: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None
    #: The format the model writes tool calls in. Unset: told from its chat template (and a
    #: template without tools gets them described in a system message, hermes-style).
    tool_parser: Literal["hermes", "llama3", "mistral"] | None = None
    max_queue: Annotated[int, msgspec.Meta(ge=0)] = 64
    #: Backend-specific settings, passed through as they are.
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Backends serving this model at once; each request goes to the one with the fewest in
    #: flight. Unset: one per address of a static placement, else 1.
    replicas: Annotated[int, msgspec.Meta(ge=1, le=32)] | None = None
    #: Where its backends run: `local` processes of the gateway's (the default), `static`
    #: addresses something else keeps running, or `ray` actors on a Ray cluster.
    placement: Literal["local"] | Placement = "local"
    #: The YAML file this came from (set by the loader, not the YAML).
    source: str = ""
    #: The absolute paths of `lora`'s adapters, with a base's first (set by the loader).
    lora_paths: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        static = self.static_placement()
        if static is not None and (self.replicas or 0) > len(static.addresses):
            raise ValueError(
                f"replicas: {self.replicas}, but placement.static lists "
                f"{len(static.addresses)} address(es): one per replica"
            )
        if not self.backend and self.base is None:
            raise ValueError("backend: is required (or base: for a variant of another model)")
        if self.lora and (self.embeddings or self.rerank):
            raise ValueError(
                "lora: adapters apply to text generation; an embedding or rerank model takes none"
            )
        if self.lora and self.backend and self.backend in BUILTIN_BACKENDS - LORA_BACKENDS:
            raise ValueError(
                f"lora: adapters are for llama and transformers models, not {self.backend} ones"
            )
        if self.embeddings and self.rerank:
            raise ValueError(
                "rerank: true (a cross-encoder) and embeddings: true (an embedding model, which "
                "reranks too) cannot both be set"
            )
        if self.rerank and self.backend in BUILTIN_BACKENDS - _RERANKING_BACKENDS:
            raise ValueError(
                f"rerank: true is for transformers and llama models, not {self.backend} ones"
            )

    def kind(self) -> Literal["chat", "embeddings", "rerank", "transcription", "image", "speech"]:
        """What the model is for, as model pickers group them: whisper models transcribe,
        diffusers models draw, piper models speak, `embeddings: true` models embed, `rerank:
        true` models rank, every other model chats."""
        if self.embeddings:
            return "embeddings"
        if self.rerank:
            return "rerank"
        return _KINDS.get(self.backend, "chat")

    def placement_kind(self) -> Literal["local", "static", "ray"]:
        """Where its backends run."""
        return "local" if isinstance(self.placement, str) else self.placement.kind

    def static_placement(self) -> StaticPlacement | None:
        return None if isinstance(self.placement, str) else self.placement.static

    def ray_placement(self) -> RayPlacement | None:
        return None if isinstance(self.placement, str) else self.placement.ray

    def replica_count(self) -> int:
        """How many backends serve it."""
        if self.replicas is not None:
            return self.replicas
        static = self.static_placement()
        return len(static.addresses) if static is not None else 1

    def keep_alive_seconds(self) -> float | None:
        """Idle seconds before unloading (math.inf: never); None: the gateway's default."""
        return None if self.keep_alive is None else parse_keep_alive(self.keep_alive)

    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_size(self.memory)


class RemoteTLS(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """TLS to a remote backend: which certificates to trust, and the name to expect."""

    #: PEM file of the authority (or the self-signed certificate) to trust; relative paths are
    #: the models dir's. Unset: the system's roots.
    ca: str | None = None
    #: The name the backend's certificate carries, where it is not the address's host.
    server_name: str | None = None


class StaticPlacement(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Backends that something else keeps running (Kubernetes, compose, systemd): one address
    per replica. The gateway loads the model into each, health-checks them and routes to them;
    it never starts or stops them."""

    #: host:port (or unix:///path) of each replica's backend, in replica order.
    addresses: Annotated[list[str], msgspec.Meta(min_length=1, max_length=32)]
    #: A file holding the token the backends were started with (relative paths are the models
    #: dir's), or the gateway's environment variable holding it.
    token_file: str | None = None
    token_env: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    #: TLS, checked against the system's roots (true) or as `RemoteTLS` says.
    tls: bool | RemoteTLS = False

    def __post_init__(self) -> None:
        if self.token_file is not None and self.token_env is not None:
            raise ValueError("give at most one of `token_file` or `token_env`")
        if len(set(self.addresses)) != len(self.addresses):
            raise ValueError("addresses: each replica needs an address of its own")

    def remote_tls(self) -> RemoteTLS | None:
        """The TLS settings, or None for plaintext."""
        return _tls_settings(self.tls)

    def exposure(self) -> str | None:
        """What the network can do with these backends (see CustomBackend.exposure)."""
        exposed = [a for a in self.addresses if not is_loopback_address(a)]
        return _exposure(exposed[0], self) if exposed else None


class RayTLS(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """TLS between the gateway and a Ray placement's backends."""

    #: PEM certificate (chain) and key each backend serves, at the same path on every node
    #: (relative paths are the models dir's, which every node sees at the gateway's path).
    cert: str
    key: str
    #: PEM file of the authority to trust (relative: the models dir's); unset: the system's.
    ca: str | None = None
    #: The name the certificate carries, where it is not the node's address.
    server_name: str | None = None


class RayPlacement(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Backends run by Ray: one detached actor per replica, placed by the resources it asks
    for, which starts the backend on its node and is restarted (a capped number of times) when
    it or its node dies. The cluster is the gateway's HEARTH_RAY_ADDRESS."""

    num_cpus: Annotated[float, msgspec.Meta(ge=0, le=4096)] = 1.0
    num_gpus: Annotated[float, msgspec.Meta(ge=0, le=1024)] = 0.0
    #: Memory Ray reserves for it on its node ("8GiB").
    memory: str | int | None = None
    #: Custom resources of the nodes it may run on, such as {"gpu-box": 1}.
    resources: dict[str, Annotated[float, msgspec.Meta(ge=0)]] = msgspec.field(default_factory=dict)
    #: Restarts of a replica's actor (after its backend or its node died) before it is left
    #: dead; never unlimited, which is an endless crash loop.
    max_restarts: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    #: TLS to the backends (the token is sent on every call either way).
    tls: RayTLS | None = None

    def __post_init__(self) -> None:
        if self.memory is not None:
            try:
                parse_size(self.memory)
            except ValueError as exc:
                raise ValueError(f"memory: {exc}") from None

    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_size(self.memory)


class Placement(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`placement:` other than `local`: exactly one of `static` or `ray`."""

    static: StaticPlacement | None = None
    ray: RayPlacement | None = None

    def __post_init__(self) -> None:
        if (self.static is None) == (self.ray is None):
            raise ValueError("give exactly one of `static` or `ray` (or write placement: local)")

    @property
    def kind(self) -> Literal["static", "ray"]:
        return "static" if self.static is not None else "ray"


class CustomBackend(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A backend outside this package: a command the gateway starts, or an address it reaches."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_-]*$")]
    #: argv; `{address}` is replaced by the address to serve on, `{python}` by this Python.
    command: list[str] | None = None
    #: host:port or unix:///path of an already running backend.
    address: str | None = None
    #: Extra environment variables for `command`.
    env: dict[str, str] = msgspec.field(default_factory=dict)
    #: For `address`: a file holding the token the backend was started with (relative paths
    #: are the models dir's), or the gateway's environment variable holding it.
    token_file: str | None = None
    token_env: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    #: For `address`: TLS, checked against the system's roots (true) or as `RemoteTLS` says.
    tls: bool | RemoteTLS = False

    def exposure(self) -> str | None:
        """What the network can do with an `address` backend: anyone can use it (no token), or
        read its token (no TLS); None: nothing (a loopback or unix address, or both set)."""
        if self.address is None or is_loopback_address(self.address):
            return None
        return _exposure(self.address, self)

    def remote_tls(self) -> RemoteTLS | None:
        """The TLS settings, or None for plaintext."""
        return _tls_settings(self.tls)

    @staticmethod
    def file_path(models_dir: Path, value: str) -> Path:
        """A file named in backends.yaml: absolute (or ~), or relative to the models dir. A
        secret may live anywhere the gateway can read: it is not confined to the models dir."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else models_dir / path


def _tls_settings(tls: bool | RemoteTLS) -> RemoteTLS | None:
    """`tls:` as settings: true means the system's roots; None means plaintext."""
    if isinstance(tls, RemoteTLS):
        return tls
    return RemoteTLS() if tls else None


def _exposure(address: str, remote: StaticPlacement | CustomBackend) -> str | None:
    """What the network can do with a backend at a non-loopback `address`, reached with
    `remote`'s settings: use it (no token), or read its token (no TLS); None: nothing."""
    if remote.token_file is None and remote.token_env is None:
        return f"has no token (token_file or token_env): anyone who can reach {address} can use it"
    if remote.remote_tls() is None:
        return f"has a token but no tls: the token travels in clear to {address}"
    return None


def _remote_settings_problem(backend: CustomBackend) -> str | None:
    """What is wrong with an entry's token and TLS settings; None if nothing."""
    given = [
        key
        for key, value in (
            ("token_file", backend.token_file),
            ("token_env", backend.token_env),
            ("tls", backend.remote_tls()),
        )
        if value is not None
    ]
    if backend.command is not None and given:
        # A command backend is reached over a private socket in the gateway's 0700 dir.
        return f"`{given[0]}` is for `address` backends, not `command` ones"
    if backend.token_file is not None and backend.token_env is not None:
        return "give at most one of `token_file` or `token_env`"
    return None


class BackendsFile(msgspec.Struct, forbid_unknown_fields=True):
    backends: list[CustomBackend] = msgspec.field(default_factory=list)


_SECONDS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*$")
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|us|µs|ns|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """'90', '30s', '15m', '2h', and Go's compound form that Ollama prints ('1h30m', '5m0s')
    → seconds."""
    raw = str(text)
    plain = _SECONDS.match(raw)
    if plain:
        return float(plain.group(1))
    compact = raw.strip().replace(" ", "")
    if not _DURATION.match(compact):
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 2h, 1h30m)")
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(compact))


def parse_keep_alive(value: str | int | float) -> float:
    """Ollama's keep_alive: a duration or seconds; 0 unloads at once; negative keeps forever."""
    if isinstance(value, bool):
        raise ValueError(f"not a keep_alive: {value!r} (use e.g. 5m, 30s, 0 or -1)")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        negative = text.startswith("-")
        try:
            seconds = parse_duration(text[1:] if negative else text)
        except ValueError:
            raise ValueError(f"not a keep_alive: {value!r} (use e.g. 5m, 30s, 0 or -1)") from None
        if negative:
            seconds = -seconds
    if math.isnan(seconds):
        raise ValueError(f"not a keep_alive: {value!r}")
    # Negative, or longer than any server runs: forever.
    return math.inf if seconds < 0 or seconds >= _FOREVER_SECONDS else seconds


#: A keep_alive this long (100 years) or longer means the same as -1.
_FOREVER_SECONDS = 100 * 365 * 86400.0


def _read_yaml(path: Path, limits: YAMLLimits = MODEL_FILE_LIMITS) -> Any:
    try:
        return load_yaml(path, limits=limits)
    except YAMLLoadError as exc:
        raise ConfigError(str(exc)) from None


def _convert(data: Any, kind: type[Any], path: Path) -> Any:
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: msgspec.ValidationError) -> str:
    """msgspec's 'Expected `int`, got `str` - at `$.threads`' as 'threads: expected `int`, ...'."""
    message = str(exc)
    field_path, text = validation_error_field(exc)
    return f"{field_path}: {text}" if field_path else message


def validation_error_field(exc: msgspec.ValidationError) -> tuple[str | None, str]:
    """The field a msgspec error is about (as `a.b[0].c`) and the error without the path."""
    message = str(exc)
    text, sep, where = message.rpartition(" - at `")
    if not sep:
        text, where = message, ""
    where = where.rstrip("`")
    path = where[2:] if where.startswith("$.") else ("" if where in {"$", ""} else where)
    missing = re.match(r"Object missing required field `([^`]+)`", text)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
        text = "is required"
    unknown = re.match(r"Object contains unknown field `([^`]+)`", text)
    if unknown:
        path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        text = "unknown field"
    if text:
        text = text[0].lower() + text[1:]
    return (path or None), text


def load_model_file(path: Path, models_dir: Path) -> ModelConfig:
    """Decode one model YAML file and check its model path; raise ConfigError naming the file."""
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of model settings")
    placement = data.get("placement", "local")
    if placement != "local" and not isinstance(placement, dict):
        raise ConfigError(
            f"{path}: placement: {placement!r} is none of `local` (the default), a `static:` "
            "mapping (addresses something else keeps running) or a `ray:` mapping"
        )
    config: ModelConfig = _convert(data, ModelConfig, path)
    if config.keep_alive is not None:
        try:
            config.keep_alive_seconds()
        except ValueError as exc:
            raise ConfigError(f"{path}: keep_alive: {exc}") from None
    if config.memory is not None:
        try:
            config.memory_bytes()
        except ValueError as exc:
            raise ConfigError(f"{path}: memory: {exc}") from None
    if config.model is not None:
        try:
            resolve_model_path(models_dir, config.model)
        except ValueError as exc:
            raise ConfigError(f"{path}: model: {exc}") from None
    if config.base is not None:
        given = {f for f in config.__struct_fields__ if f in data} - _VARIANT_FIELDS
        if given:
            raise ConfigError(
                f"{path}: {sorted(given)[0]}: a variant (base: {config.base}) runs in its base's "
                f"process and takes its settings; set {', '.join(sorted(given))} in the base's "
                "YAML, or drop base: to give this model a process of its own"
            )
    lora_paths = [
        _adapter_path(models_dir, a, f"{path}: lora[{i}]") for i, a in enumerate(config.lora)
    ]
    return msgspec.structs.replace(config, source=str(path), lora_paths=lora_paths)


def _adapter_path(models_dir: Path, adapter: LoraAdapter, where: str) -> str:
    """An adapter's absolute path: inside the models dir, present, and safetensors where it
    is a PEFT folder (no pickled weights)."""
    try:
        target = resolve_model_path(models_dir, adapter.path)
    except ValueError as exc:
        raise ConfigError(f"{where}.path: {exc}") from None
    if not target.exists():
        raise ConfigError(f"{where}.path: {adapter.path} does not exist in {models_dir}")
    if target.is_dir() and not (target / "adapter_model.safetensors").is_file():
        raise ConfigError(
            f"{where}.path: {adapter.path} is a folder without adapter_model.safetensors (a PEFT "
            "adapter's weights; pickled adapter_model.bin files are not loaded)"
        )
    return str(target)


#: The form of LoRA adapter each built-in backend takes: a file or a folder.
_ADAPTER_FORMS = {
    "llama": (False, "a GGUF LoRA file (`hearth models convert ADAPTER --base MODEL` makes one)"),
    "transformers": (
        True,
        "a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)",
    ),
}


def _check_adapter_kinds(catalog: Catalog) -> None:
    """A llama model's adapters are files, a transformers model's are folders: the wrong one
    is the YAML's error now, not a 400 at its first request."""
    for config in list(catalog.models.values()):
        form = _ADAPTER_FORMS.get(config.backend)
        if form is None:
            continue
        folder, wanted = form
        for index, path in enumerate(config.lora_paths):
            if Path(path).is_dir() != folder:
                catalog.errors.append(
                    f"{config.source}: lora[{index}].path: {config.lora[index].path} is a "
                    f"{'folder' if not folder else 'file'}; a {config.backend} model takes {wanted}"
                )
                del catalog.models[config.name]
                break


def _resolve_variants(catalog: Catalog) -> None:
    """Give each variant (`base:`) its base's settings, the base's adapters before its own,
    and the base's system prompt and parameters where it sets none; a variant whose base is
    missing, is itself a variant, or has a backend that cannot share is an error."""
    for config in [c for c in catalog.models.values() if c.base is not None]:
        base = catalog.models.get(config.base or "")
        problem = None
        if base is None:
            problem = f"there is no model named '{config.base}' in the models dir"
        elif base.base is not None:
            problem = f"'{base.name}' is itself a variant (of '{base.base}'): name its base"
        elif base.backend not in LORA_BACKENDS and base.backend in BUILTIN_BACKENDS:
            problem = f"'{base.name}' is a {base.backend} model, which takes no LoRA adapters"
        elif base.embeddings or base.rerank:
            problem = f"'{base.name}' is not a text generation model"
        if problem is not None or base is None:
            catalog.errors.append(f"{config.source}: base: {problem}")
            del catalog.models[config.name]
            continue
        shared = {
            f: getattr(base, f)
            for f in base.__struct_fields__
            if f not in _VARIANT_FIELDS and f != "lora_paths"
        }
        defaults = msgspec.structs.asdict(base.parameters)
        own = {k: v for k, v in msgspec.structs.asdict(config.parameters).items() if v is not None}
        catalog.models[config.name] = msgspec.structs.replace(
            config,
            **shared,
            lora=[*base.lora, *config.lora],
            lora_paths=[*base.lora_paths, *config.lora_paths],
            system_prompt=config.system_prompt
            if config.system_prompt is not None
            else base.system_prompt,
            parameters=Parameters(**{**defaults, **own}),
            description=config.description or f"{base.name} with LoRA adapters",
        )


def resolve_model_path(models_dir: Path, relative: str) -> Path:
    """The absolute path of a model file, which must lie inside the models dir."""
    if not relative or Path(relative).is_absolute():
        raise ValueError(f"{relative!r} must be a path relative to the models dir")
    root = models_dir.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise ValueError(f"{relative!r} points outside the models dir")
    return target


def _check_placements(catalog: Catalog) -> None:
    """A backends.yaml `address:` backend is one backend at one address: it cannot be placed
    elsewhere or replicated (placement.static lists an address per replica); a ray placement
    starts a built-in backend or a `command` one."""
    for config in list(catalog.models.values()):
        custom = catalog.backends.get(config.backend)
        problem = None
        if custom is not None and custom.address is not None:
            if config.placement_kind() != "local" or config.replica_count() > 1:
                problem = (
                    f"backend '{custom.name}' is one backend at {custom.address}; for replicas "
                    "or another placement, name the backend's kind and list an address per "
                    "replica under placement.static.addresses"
                )
        elif (static := config.static_placement()) is not None:
            exposure = static.exposure()
            if exposure is not None:
                log.warning("%s: placement.static %s", config.source, exposure)
        if problem is not None:
            catalog.errors.append(f"{config.source}: placement: {problem}")
            del catalog.models[config.name]


@dataclass
class Catalog:
    """What the models dir holds: models by name, custom backends by name, broken files."""

    models: dict[str, ModelConfig] = field(default_factory=dict)
    backends: dict[str, CustomBackend] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def load_catalog(models_dir: Path) -> Catalog:
    """Read every *.yaml / *.yml file of the models dir. A broken file is reported, not fatal."""
    catalog = Catalog()
    if not models_dir.is_dir():
        return catalog
    files = sorted(p for p in models_dir.iterdir() if p.suffix in {".yaml", ".yml"})
    for path in files:
        try:
            if path.name in BACKENDS_FILE_NAMES:
                data = _read_yaml(path) or {}
                registry: BackendsFile = _convert(data, BackendsFile, path)
                for backend in registry.backends:
                    if (backend.command is None) == (backend.address is None):
                        raise ConfigError(
                            f"{path}: backend '{backend.name}': give exactly one of "
                            "`command` or `address`"
                        )
                    if backend.name in BUILTIN_BACKENDS:
                        raise ConfigError(
                            f"{path}: backend '{backend.name}' is built in; pick another name"
                        )
                    problem = _remote_settings_problem(backend)
                    if problem is not None:
                        raise ConfigError(f"{path}: backend '{backend.name}': {problem}")
                    catalog.backends[backend.name] = backend
                    exposure = backend.exposure()
                    if exposure is not None:
                        log.warning("%s: backend '%s' %s", path, backend.name, exposure)
                continue
            config = load_model_file(path, models_dir)
            if config.name in catalog.models:
                first = catalog.models[config.name].source
                raise ConfigError(f"{path}: name '{config.name}' is already used by {first}")
            catalog.models[config.name] = config
        except ConfigError as exc:
            catalog.errors.append(str(exc))
    _resolve_variants(catalog)
    _check_adapter_kinds(catalog)
    _check_placements(catalog)
    for config in list(catalog.models.values()):
        if config.backend not in BUILTIN_BACKENDS and config.backend not in catalog.backends:
            catalog.errors.append(
                f"{config.source}: backend: unknown backend '{config.backend}' (built in: "
                f"{', '.join(sorted(BUILTIN_BACKENDS))}; others go in backends.yaml)"
            )
            del catalog.models[config.name]
    for error in catalog.errors:
        log.error("%s", error)
    return catalog
