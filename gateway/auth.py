"""API keys with scopes: who may call which route, and which models.

Keys come from the environment (`HEARTH_API_KEYS`: inference, `HEARTH_ADMIN_KEYS`: admin,
`HEARTH_METRICS_KEYS`: /metrics only) and from a keys file (`HEARTH_KEYS_FILE`), where each key has
a name (what logs and metrics show, never the key), a scope, and optionally the models it may use.
A key is sent as `Authorization: Bearer <key>` or `x-api-key: <key>`. Keys are kept as SHA-256
digests and every one is compared, in constant time: timing tells neither which key nearly matched
nor how long any key is.

Every route has a scope (its router's `opt`): `open` (health, generated images), `inference`,
`admin`, `metrics`. With no keys configured, every caller is the local user and may do everything
(the server then listens on loopback only, unless started with --insecure).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import logging
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from gateway import identity
from gateway.errors import OpenAIError, model_not_found
from gateway.identity import ANONYMOUS, LOCAL, Caller

if TYPE_CHECKING:
    from gateway.settings import Settings
from gateway.safe_yaml import MODEL_FILE_LIMITS, YAMLLoadError, load_yaml

log = logging.getLogger("hearth.auth")

#: Key of a route's `opt` that names its scope.
SCOPE = "scope"


class Scope(enum.StrEnum):
    OPEN = "open"
    INFERENCE = "inference"
    ADMIN = "admin"
    METRICS = "metrics"


_KeyScope = Literal["inference", "admin", "metrics"]
_KeyName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")]
_Digest = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
#: Shorter keys are guessable: the log says so at start.
MIN_KEY_LENGTH = 16


class KeyEntry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One key of the keys file: the key itself, or its SHA-256 (hex) so the file need not hold
    it."""

    name: _KeyName
    scope: _KeyScope = "inference"
    key: str | None = None
    sha256: _Digest | None = None
    #: The models an inference key may use; unset: all.
    models: list[str] | None = None


class KeysFile(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[KeyEntry]


@dataclass(frozen=True)
class Key:
    digest: bytes
    caller: Caller


def _digest(token: str | bytes) -> bytes:
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


def _caller(name: str, scope: str, models: list[str] | None) -> Caller:
    if scope == "admin":
        return Caller(name, admin=True, inference=True, metrics=True)
    if scope == "metrics":
        return Caller(name, metrics=True)
    return Caller(name, inference=True, models=frozenset(models) if models is not None else None)


class KeyRing:
    """Every key the server accepts."""

    def __init__(self, keys: list[Key]) -> None:
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        return cls.load(
            settings.api_keys, settings.admin_keys, settings.metrics_keys, settings.keys_file
        )

    @classmethod
    def load(
        cls,
        api_keys: tuple[str, ...] = (),
        admin_keys: tuple[str, ...] = (),
        metrics_keys: tuple[str, ...] = (),
        keys_file: Path | None = None,
    ) -> KeyRing:
        """The keys of the settings; ValueError says what is wrong (at start, not per request)."""
        keys: list[Key] = []
        for scope, tokens in (
            ("inference", api_keys),
            ("admin", admin_keys),
            ("metrics", metrics_keys),
        ):
            for number, token in enumerate(tokens, 1):
                name = f"{'api' if scope == 'inference' else scope}-{number}"
                _check_strength(
                    token,
                    f"HEARTH_{'API' if scope == 'inference' else scope.upper()}_KEYS key {number}",
                )
                keys.append(Key(_digest(token), _caller(name, scope, None)))
        if keys_file is not None:
            keys.extend(_read_keys_file(keys_file))
        names = [k.caller.name for k in keys]
        reserved = sorted({LOCAL.name, ANONYMOUS.name} & set(names))
        if reserved:
            raise ValueError(f"key names {', '.join(reserved)} are reserved: pick others")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"key names used twice: {', '.join(twice)}")
        digests = [k.digest for k in keys]
        if len(set(digests)) != len(digests):
            raise ValueError("the same key is given twice (with different names or scopes)")
        return cls(keys)

    def identify(self, token: str) -> Caller | None:
        """The caller whose key `token` is; None if it is none of them. Compares with every
        key, always, in constant time."""
        given = _digest(token)
        found: Caller | None = None
        for key in self.keys:
            if hmac.compare_digest(given, key.digest):
                found = key.caller
        return found


def _check_strength(token: str, what: str) -> None:
    if not token:
        raise ValueError(f"{what} is empty")
    if len(token) < MIN_KEY_LENGTH:
        log.warning("%s is shorter than %d characters: easy to guess", what, MIN_KEY_LENGTH)


def _read_keys_file(path: Path) -> list[Key]:
    try:
        data = load_yaml(path, limits=MODEL_FILE_LIMITS)
        parsed = msgspec.convert(data, KeysFile)
    except (YAMLLoadError, OSError) as exc:
        raise ValueError(f"keys file: {exc}") from None
    except msgspec.ValidationError as exc:
        raise ValueError(f"keys file {path}: {exc}") from None
    if not parsed.keys:
        # An empty file would turn authentication off, which nobody writing one means.
        raise ValueError(f"keys file {path} lists no keys")
    if any(entry.key is not None for entry in parsed.keys):
        with contextlib.suppress(OSError):
            if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning(
                    "keys file %s holds keys and others may read it: chmod 600 it, or give "
                    "their sha256 instead",
                    path,
                )
    keys = []
    for entry in parsed.keys:
        if (entry.key is None) == (entry.sha256 is None):
            raise ValueError(
                f"keys file {path}: key '{entry.name}': give exactly one of key, sha256"
            )
        if entry.models is not None and entry.scope != "inference":
            raise ValueError(
                f"keys file {path}: key '{entry.name}': only inference keys are limited to models"
            )
        if entry.key is not None:
            _check_strength(entry.key, f"keys file {path}: key '{entry.name}'")
            digest = _digest(entry.key)
        else:
            digest = bytes.fromhex(entry.sha256 or "")
        keys.append(Key(digest, _caller(entry.name, entry.scope, entry.models)))
    return keys


def tokens_of(headers: Mapping[str, str]) -> list[str]:
    """The keys a request carries: `Authorization: Bearer <key>` and `x-api-key: <key>` (a
    client may send a placeholder in one and the key in the other)."""
    tokens = []
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        tokens.append(token.strip())
    api_key = headers.get("x-api-key", "").strip()
    if api_key:
        tokens.append(api_key)
    return tokens


def scope_of(handler: Any) -> Scope | None:
    value = getattr(handler, "opt", {}).get(SCOPE)
    return Scope(value) if value is not None else None


def allows(caller: Caller, scope: Scope) -> bool:
    if scope == Scope.OPEN:
        return True
    if scope == Scope.INFERENCE:
        return caller.inference
    if scope == Scope.METRICS:
        return caller.metrics
    return caller.admin


def admit(ring: KeyRing, scope: Scope | None, headers: Mapping[str, str]) -> Caller:
    """The caller of a request to a route of `scope`, or the 401/403 it gets."""
    if scope is None:  # a route nobody gave a scope: nobody may call it
        raise OpenAIError(403, "This route is not open to anyone.", code="insufficient_scope")
    if not ring.enabled:
        return LOCAL
    tokens = tokens_of(headers)
    found = next((c for c in map(ring.identify, tokens) if c is not None), None)
    if scope == Scope.OPEN:
        return found or ANONYMOUS
    if found is None:
        what = "Incorrect API key" if tokens else "Missing API key"
        raise OpenAIError(
            401,
            f"{what}: send it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>').",
            code="invalid_api_key",
        )
    if not allows(found, scope):
        raise OpenAIError(
            403,
            f"The key '{found.name}' may not do this: it needs the {scope.value} scope.",
            code="insufficient_scope",
        )
    return found


def check_model(name: str) -> None:
    """A model the request's key may not use does not exist, as far as it is told (404, as
    OpenAI answers for a model an organisation has no access to)."""
    if not identity.caller.get().may_use(name):
        raise model_not_found(name)
