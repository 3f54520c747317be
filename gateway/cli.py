"""The `hearth` command: `hearth run`, and `hearth models available | list | install | remove`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from gateway.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    preload = getattr(args, "preload", None)
    return Settings.from_env(
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        models_dir=args.models_dir,
        runtime_dir=getattr(args, "runtime_dir", None),
        log_level=getattr(args, "log_level", None),
        preload=tuple(preload) if preload else None,
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    settings = _settings(args)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.host not in {"127.0.0.1", "localhost", "::1"} and not settings.api_keys:
        logging.getLogger("hearth").warning(
            "listening on %s without API keys: anyone who can reach this address can use "
            "your models (set HEARTH_API_KEYS)",
            settings.host,
        )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
    return 0


def models_list(args: argparse.Namespace) -> int:
    from gateway.config import load_catalog, resolve_model_path

    settings = _settings(args)
    catalog = load_catalog(settings.models_dir)
    if not catalog.models and not catalog.errors:
        print(f"no models in {settings.models_dir.resolve()}")
    for config in sorted(catalog.models.values(), key=lambda c: c.name):
        where = "-"
        if config.model:
            path = resolve_model_path(settings.models_dir, config.model)
            where = config.model if path.exists() else f"{config.model} (missing)"
        print(f"{config.name}\t{config.backend}\t{where}")
    for error in catalog.errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if catalog.errors else 0


def _gallery() -> Any:
    from gateway.config import ConfigError
    from gateway.gallery import gallery_path, load_gallery

    try:
        return load_gallery(gallery_path())
    except ConfigError as exc:
        print(f"error: the gallery index is broken: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def models_available(args: argparse.Namespace) -> int:
    from gateway.gallery import is_installed

    settings = _settings(args)
    for entry in _gallery().entries:
        state = "installed" if is_installed(entry, settings.models_dir) else "-"
        checked = "verified" if entry.verified else "unverified"
        backend = entry.config.get("backend", "?")
        print(f"{entry.name}\t{backend}\t{state}\t{checked}\t{entry.description}")
    return 0


def _megabytes(count: int | None) -> str:
    return "?" if count is None else f"{count / 1e6:.1f} MB"


def models_install(args: argparse.Namespace) -> int:
    from gateway.gallery import InstallError, install_entry

    settings = _settings(args)
    index = _gallery()
    unknown = [n for n in args.names if index.get(n) is None]
    if unknown:
        print(
            f"error: the gallery has no model named {', '.join(unknown)} "
            "(`hearth models available` lists them)",
            file=sys.stderr,
        )
        return 1
    for name in args.names:
        entry = index.get(name)
        try:
            if sys.stdout.isatty():
                _install_with_bars(entry, settings.models_dir, install_entry)
            else:
                _install_with_lines(entry, settings.models_dir, install_entry)
        except InstallError as exc:
            print(f"error: could not install {name}: {exc}", file=sys.stderr)
            return 1
        print(f"{name}: installed in {settings.models_dir}")
    return 0


def _install_with_bars(entry: Any, models_dir: Path, install: Any) -> None:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as bars:
        tasks: dict[str, Any] = {}

        def report(progress: Any) -> None:
            if progress.file not in tasks:
                tasks[progress.file] = bars.add_task(f"{entry.name}: {progress.file}", total=None)
            bars.update(tasks[progress.file], completed=progress.done, total=progress.total)

        install(entry, models_dir, report=report)


def _install_with_lines(entry: Any, models_dir: Path, install: Any) -> None:
    """Progress as plain lines (a log, a pipe): one per file every tenth, and at the end."""
    shown: dict[str, int] = {}

    def report(progress: Any) -> None:
        tenth = (progress.done * 10 // progress.total) if progress.total else 0
        if shown.get(progress.file) == tenth:
            return
        shown[progress.file] = tenth
        total = f"/{_megabytes(progress.total)}" if progress.total else ""
        print(
            f"{entry.name}: {progress.file} {tenth * 10}% ({_megabytes(progress.done)}{total}), "
            f"file {min(progress.files_done + 1, progress.files_total)} of {progress.files_total}",
            flush=True,
        )

    install(entry, models_dir, report=report)


def models_remove(args: argparse.Namespace) -> int:
    from gateway.config import load_catalog
    from gateway.gallery import remove_files

    settings = _settings(args)
    catalog = load_catalog(settings.models_dir)
    config = catalog.models.get(args.name)
    if config is None:
        print(f"error: no installed model named {args.name}", file=sys.stderr)
        return 1
    keep = {
        (settings.models_dir / other.model).resolve()
        for other in catalog.models.values()
        if other.name != args.name and other.model
    }
    remove_files(config, _gallery().get(args.name), settings.models_dir, keep)
    print(f"{args.name}: removed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth", description="A local OpenAI-compatible gateway")
    commands = parser.add_subparsers(dest="command", required=True)

    run_parser = commands.add_parser("run", help="serve the OpenAI API")
    run_parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    run_parser.add_argument("--port", type=int, help="port (default 8080)")
    run_parser.add_argument(
        "--models-dir", type=Path, help="model YAML and files (default ./models)"
    )
    run_parser.add_argument("--runtime-dir", type=Path, help="where backend sockets live")
    run_parser.add_argument("--log-level", help="debug, info, warning, error")
    run_parser.add_argument("--preload", nargs="+", metavar="NAME", help="models to load at start")
    run_parser.set_defaults(handler=run)

    models = commands.add_parser("models", help="manage models").add_subparsers(
        dest="models_command", required=True
    )
    list_parser = models.add_parser("list", help="the models configured in the models dir")
    list_parser.add_argument("--models-dir", type=Path)
    list_parser.set_defaults(handler=models_list)
    available = models.add_parser("available", help="the models the gallery can install")
    available.add_argument("--models-dir", type=Path)
    available.set_defaults(handler=models_available)
    install = models.add_parser("install", help="download, check and configure gallery models")
    install.add_argument("names", nargs="+", metavar="NAME")
    install.add_argument("--models-dir", type=Path)
    install.set_defaults(handler=models_install)
    remove = models.add_parser("remove", help="delete a model's YAML and files")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--models-dir", type=Path)
    remove.set_defaults(handler=models_remove)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.handler(args))
