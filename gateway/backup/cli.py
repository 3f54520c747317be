"""`hearth backup FILE` and `hearth restore FILE`."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

#: How a summary names each kind of file, one and many.
_KIND_WORDS = {
    "yaml": ("YAML file", "YAML files"),
    "manifest": ("install manifest", "install manifests"),
    "state": ("state file", "state files"),
    "adapter": ("adapter file", "adapter files"),
    "model": ("model file", "model files"),
}


def register(commands: Any, models: Any) -> None:
    """Add this package's subcommands: `commands` is hearth's, `models` is `hearth models`'s."""
    del models
    backup = commands.add_parser(
        "backup",
        help="write the models dir's YAML, adapters, manifests and state into one archive",
        description=(
            "Write the models dir's model YAML, backends.yaml, LoRA adapters, install manifests "
            "and .hearth/ state (measured footprints, tuning records) into one tar archive, "
            "with the sha256 of every file; --models adds the model files. A name ending "
            ".tar.gz or .tgz is gzip-compressed."
        ),
    )
    backup.add_argument("file", metavar="FILE", type=Path, help="the archive to write")
    backup.add_argument("--models-dir", type=Path, help="the models dir (default ./models)")
    backup.add_argument(
        "--models",
        "--with-model-files",
        dest="model_files",
        action="store_true",
        help="add the model files (weights) too",
    )
    backup.add_argument("--force", action="store_true", help="replace FILE if it exists")
    backup.set_defaults(handler=backup_command)

    restore = commands.add_parser(
        "restore",
        help="verify a backup and put its files back in the models dir",
        description=(
            "Check every file of a `hearth backup` archive against its sha256 first (a damaged "
            "or altered archive is refused and nothing is written), then restore its files. "
            "A file of the models dir that is newer than the backup's, with other content, is "
            "kept unless --force; the same file is left alone."
        ),
    )
    restore.add_argument("file", metavar="FILE", type=Path, help="an archive of `hearth backup`")
    restore.add_argument("--models-dir", type=Path, help="where to restore (default ./models)")
    restore.add_argument(
        "--force", action="store_true", help="replace files that are newer than the backup's"
    )
    restore.add_argument(
        "--dry-run", action="store_true", help="verify the archive and say what would change"
    )
    restore.set_defaults(handler=restore_command)


def _count(files: list[Any]) -> str:
    counts = Counter(file.kind for file in files)
    parts = []
    for kind, (one, many) in _KIND_WORDS.items():
        if counts[kind]:
            parts.append(f"{counts[kind]} {one if counts[kind] == 1 else many}")
    return ", ".join(parts) or "no files"


def backup_command(args: argparse.Namespace) -> int:
    from gateway.backup.format import BackupError, describe_size
    from gateway.backup.write import write_backup
    from gateway.cli import _settings

    settings = _settings(args)
    try:
        result = write_backup(
            settings.models_dir, args.file, model_files=args.model_files, replace=args.force
        )
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stopped: {args.file} was not written", file=sys.stderr)
        return 130
    for warning in result.selection.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for path, why in result.selection.skipped:
        print(f"skipped {settings.models_dir / path}: {why}")
    files = result.manifest.files
    print(
        f"backed up {_count(files)} ({describe_size(sum(f.size for f in files))}) "
        f"from {settings.models_dir}"
    )
    left_out = result.selection.left_out
    if left_out:
        print(
            f"left out {len(left_out)} model file{'s' if len(left_out) != 1 else ''} "
            f"({describe_size(sum(c.size for c in left_out))}): --models adds them"
        )
    print(f"wrote {args.file} ({describe_size(result.archive_bytes)})")
    return 0


def restore_command(args: argparse.Namespace) -> int:
    from gateway.backup.format import BackupError, DamagedBackup, describe_size
    from gateway.backup.restore import restore_backup
    from gateway.cli import _settings

    settings = _settings(args)
    models_dir = settings.models_dir
    try:
        result = restore_backup(args.file, models_dir, force=args.force, dry_run=args.dry_run)
    except DamagedBackup as exc:
        print(f"error: refused {args.file}: {exc}; nothing was restored", file=sys.stderr)
        return 1
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "stopped: each file restored so far is whole; run the restore again to finish it",
            file=sys.stderr,
        )
        return 130
    manifest = result.manifest
    files = manifest.files
    without = "" if manifest.model_files else ", without model files"
    print(
        f"backup of {manifest.models_dir}, made {manifest.created} by Hearth "
        f"{manifest.hearth_version}: {_count(files)} "
        f"({describe_size(sum(f.size for f in files))}){without}; every file checked"
    )
    verb = "would restore" if args.dry_run else "restored"
    if args.dry_run:
        for file in result.restored:
            print(f"would restore {models_dir / file.path}")
    for file, why in result.kept:
        print(f"kept {models_dir / file.path}: {why}")
    restored = describe_size(sum(f.size for f in result.restored))
    print(
        f"{verb} {len(result.restored)} file{'s' if len(result.restored) != 1 else ''} "
        f"({restored}) in {models_dir}, unchanged {len(result.unchanged)}, "
        f"kept {len(result.kept)}"
    )
    installable = [name for name, ours in result.missing_models if ours]
    others = [name for name, ours in result.missing_models if not ours]
    if installable:
        print(
            f"no model files in {models_dir} yet for {', '.join(installable)}: "
            f"`hearth models install {' '.join(installable)}` downloads them again"
        )
    if others:
        print(f"no model files in {models_dir} for {', '.join(others)}")
    return 0
