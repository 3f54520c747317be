"""What can go wrong making a model, as exceptions: each says what happened in its message."""

from __future__ import annotations


class ConvertError(Exception):
    """Making a model failed; nothing of it was left in the models dir."""

    #: The request field the failure is about (for HTTP's `param`), if one is.
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class ConvertRefused(ConvertError):
    """A request that cannot be carried out as asked (a bad type, a source that is not fit);
    nothing on disk was touched."""


class SourceNotFound(ConvertRefused):
    """The model or folder to make the new model from does not exist."""


class NameTaken(ConvertRefused):
    """The new model's name, YAML or folder is already in the models dir."""

    param = "name"


class ConverterUnavailable(ConvertError):
    """llama.cpp's converter cannot be had (offline with nothing cached, or its imports are
    missing)."""


class ConvertCancelled(ConvertError):
    """Cancelled while it ran (a job's DELETE, Ctrl-C, SIGTERM)."""
