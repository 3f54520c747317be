"""Backing up the models dir into one archive and restoring it (`hearth backup`, `hearth restore`).

`collect` decides what a backup holds and of what kind each file is; `format` is the archive's
layout and manifest; `write` streams the files into a tar, hashing them; `restore` verifies a
whole archive before it places anything, and never replaces a newer file unless told.
"""

from gateway.backup.format import BackupError, BackupManifest, DamagedBackup
from gateway.backup.restore import RestoreResult, restore_backup
from gateway.backup.write import BackupResult, write_backup

__all__ = [
    "BackupError",
    "BackupManifest",
    "BackupResult",
    "DamagedBackup",
    "RestoreResult",
    "restore_backup",
    "write_backup",
]
