"""What every backend shares: the base class, the error type, and the process around it."""

from backends.runtime.backend import Backend, Capability, ThreadShare
from backends.runtime.errors import BackendError, adapter_stamp, invalid, missing_adapter
from backends.runtime.server import run, serve

__all__ = [
    "Backend",
    "BackendError",
    "Capability",
    "ThreadShare",
    "adapter_stamp",
    "invalid",
    "missing_adapter",
    "run",
    "serve",
]
