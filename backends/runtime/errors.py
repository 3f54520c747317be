"""The one way a backend reports a failed call."""

from __future__ import annotations

import os

import grpc

from protos.hearth.backend.v1.contract import PARAM_KEY, REASON_KEY


class BackendError(Exception):
    """A call failed for a reason the client should hear: a gRPC status, a reason, a message."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        *,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = str(reason)
        self.message = message
        self.param = param

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """The reason (and param) as the trailing metadata the gateway reads."""
        pairs = [(REASON_KEY, self.reason)]
        if self.param:
            pairs.append((PARAM_KEY, self.param))
        return tuple(pairs)


def invalid(reason: str, message: str, param: str | None = None) -> BackendError:
    """The request (or the model YAML) asks for something this backend cannot do: a 400."""
    return BackendError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, param=param)


def missing_adapter(path: str) -> BackendError:
    """A LoRA adapter the model's YAML names is gone from the models dir (deleted since the
    YAML was read): a 404 naming the file, not the server's paths."""
    from protos.hearth.backend.v1.contract import Reason

    return BackendError(
        grpc.StatusCode.NOT_FOUND,
        Reason.MODEL_FILE_NOT_FOUND,
        f"the LoRA adapter {os.path.basename(path)} this model names is missing from the models "
        "dir",
    )


def adapter_stamp(path: str) -> tuple[int, int, int]:
    """What tells one version of an adapter's weights from another (a file replaced in place
    is loaded again): the weights file's inode, size and modification time."""
    weights = os.path.join(path, "adapter_model.safetensors") if os.path.isdir(path) else path
    try:
        status = os.stat(weights)
    except FileNotFoundError:
        raise missing_adapter(path) from None
    return (status.st_ino, status.st_size, status.st_mtime_ns)
