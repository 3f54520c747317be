"""What can go wrong with the gallery, as exceptions: each says what happened in its message."""

from __future__ import annotations


class InstallError(Exception):
    """An install that failed; nothing of it was left in the models dir."""


class InstallCancelled(InstallError):
    """An install cancelled while it ran."""


class InstallRefused(InstallError):
    """An install that would change something it does not own; nothing on disk was touched."""


class EntryRejected(InstallError):
    """A gallery entry that the index names but that was left out as invalid."""


class NotInstalledError(LookupError):
    """No model YAML of the models dir has that name."""


class RemovalRefused(Exception):
    """A removal that could delete what is not the model's; nothing was deleted."""
