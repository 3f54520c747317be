"""The words that travel with backend.proto.

Capability names (what health reports each service under), the trailing-metadata keys of a failed
call, the reason codes both sides act on, and the message-size limit. The gateway and the
backends import them from here, and never from each other.
"""

from __future__ import annotations

import enum
import ipaddress
import re

#: Trailing-metadata key of a failed call's machine-readable reason.
REASON_KEY = "hearth-error-reason"
#: Trailing-metadata key of the request field at fault, when there is one.
PARAM_KEY = "hearth-error-param"
#: Initial-metadata key a backend sends as it begins work on a call (and on Load, to say that
#: it does). A call that fails without it never started, so the gateway may send it to the
#: backend's replacement; one that fails after it may have killed the backend, and is not.
STARTED_KEY = "hearth-started"
#: Metadata key of the gateway's token on every call to a backend that asks for one (a remote
#: backend started with --token-file): `Bearer <token>`, as HTTP spells it.
AUTHORIZATION_KEY = "authorization"
AUTHORIZATION_SCHEME = "Bearer "
#: The environment variable a backend reads its token file's path from (as --token-file).
TOKEN_FILE_ENV = "HEARTH_BACKEND_TOKEN_FILE"

#: Media (audio in, images out) travels inside messages: both ends allow messages this large.
MAX_MESSAGE_BYTES = 128 * 1024 * 1024


class Capability(enum.Enum):
    """A service of the contract; its value is the name health reports it under."""

    TEXT = "hearth.backend.v1.Text"
    EMBEDDINGS = "hearth.backend.v1.Embeddings"
    TRANSCRIPTION = "hearth.backend.v1.Transcription"
    IMAGES = "hearth.backend.v1.Images"
    SPEECH = "hearth.backend.v1.Speech"
    RERANK = "hearth.backend.v1.Rerank"


class Reason(enum.StrEnum):
    """Reasons the runtime itself reports, and that the gateway acts on."""

    #: The backend has no model loaded (it restarted, or Load failed): load it again.
    MODEL_NOT_LOADED = "model_not_loaded"
    #: The model cannot serve this kind of call.
    UNSUPPORTED = "unsupported"
    #: Load failed; the message says why.
    LOAD_FAILED = "load_failed"
    MODEL_FILE_NOT_FOUND = "model_file_not_found"
    #: The caller gave up and the engine stopped.
    CANCELLED = "cancelled"
    #: A bug or an engine failure: the message says what.
    INTERNAL = "internal"
    #: The prompt and the requested tokens do not fit the context window.
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    #: The decoded audio is longer than the request's max_audio_seconds.
    AUDIO_TOO_LONG = "audio_too_long"
    #: An embedding input has more tokens than the request's max_input_tokens.
    INPUT_TOO_LONG = "input_too_long"
    #: A speech request names a voice the model does not have.
    VOICE_NOT_FOUND = "voice_not_found"
    #: A response_format / tool schema would make a grammar too large for the engine.
    SCHEMA_TOO_COMPLEX = "schema_too_complex"
    #: A LoRA adapter the engine cannot apply to the loaded model (not a LoRA, another base).
    ADAPTER_INVALID = "adapter_invalid"


def is_loopback_address(address: str) -> bool:
    """Whether a gRPC address (or a bare host) reaches only this machine: a unix socket,
    127.0.0.0/8, ::1, localhost. Anything else, 0.0.0.0 and other names included, is the
    network. Both ends ask: the gateway of the backends it reaches and of its own --host, a
    backend of where it listens."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    target = re.sub(r"^(?:dns:(?://[^/]*/)?|ipv4:|ipv6:)", "", address)
    for host in (target, target.rsplit(":", 1)[0]):  # as it is, then without a port
        host = host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            continue
    return False
