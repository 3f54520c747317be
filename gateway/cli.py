"""The `hearth` command: `hearth run`, `hearth ps`, and
`hearth models available | list | install | remove`."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gateway.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    from gateway.units import parse_size

    preload = getattr(args, "preload", None)
    memory = getattr(args, "memory", None)
    try:
        return Settings.from_env(
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
            models_dir=getattr(args, "models_dir", None),
            runtime_dir=getattr(args, "runtime_dir", None),
            log_level=getattr(args, "log_level", None),
            preload=tuple(preload) if preload else None,
            cpus=getattr(args, "cpus", None),
            memory=parse_size(memory) if memory is not None else None,
            max_loaded_models=getattr(args, "max_loaded_models", None),
            keep_alive=getattr(args, "keep_alive", None),
            insecure=True if getattr(args, "insecure", False) else None,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _budget(settings: Settings) -> Any:
    from gateway.manager.budget import Machine

    return Machine().budget(settings.cpus, settings.memory)


def _configure_logging(level: str) -> None:
    """One format for every logger, with the id of the request a line was written for (after
    the logger's name, in brackets): the id its client sees in the `x-request-id` header."""
    from gateway.identity import RequestIdFilter

    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())


def run(args: argparse.Namespace) -> int:
    from gateway.app import create_app
    from gateway.serve import serve

    settings = _settings(args)
    _configure_logging(settings.log_level)
    from gateway.auth import KeyRing
    from protos.hearth.backend.v1.contract import is_loopback_address

    try:
        ring = KeyRing.from_settings(settings)
    except ValueError as exc:  # the keys settings
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not is_loopback_address(settings.host) and not ring.enabled:
        if not settings.insecure:
            print(
                f"error: refusing to listen on {settings.host} without API keys: anyone who "
                "can reach it could use your models and install or delete them. Set "
                "HEARTH_API_KEYS and HEARTH_ADMIN_KEYS (or HEARTH_KEYS_FILE), or give "
                "--insecure if every device that can reach it is trusted.",
                file=sys.stderr,
            )
            return 2
        logging.getLogger("hearth").warning(
            "listening on %s without API keys (--insecure): anyone who can reach this "
            "address can use, install and delete your models",
            settings.host,
        )
    _not_dumpable()
    app = create_app(settings, ring)
    serve(app, settings)
    return 0


def _not_dumpable() -> None:
    """Keep other processes of this user (the backends among them) from reading this one's
    memory and /proc/<pid>/environ, where the keys are (Linux's PR_SET_DUMPABLE)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        pr_set_dumpable = 4
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)


def _fits(footprint: Any, budget: Any) -> tuple[str, str]:
    """The 'needs' and 'fits' columns of a model list."""
    from gateway.manager.footprint import fit
    from gateway.units import format_size

    view = fit(footprint, budget.memory_bytes)
    if view["memory_bytes"] is None:
        return "?", "?"
    needs = f"~{format_size(view['memory_bytes'])}"
    if view["memory_from"] != "estimate":
        needs += f" ({view['memory_from']})"
    return needs, "fits" if view["fits"] else "too big"


def models_list(args: argparse.Namespace) -> int:
    from gateway.config import load_catalog, resolve_model_path
    from gateway.manager.footprint import FootprintBook

    settings = _settings(args)
    catalog = load_catalog(settings.models_dir)
    if not catalog.models and not catalog.errors:
        print(f"no models in {settings.models_dir.resolve()}")
    budget = _budget(settings)
    book = FootprintBook(settings.models_dir)
    if catalog.models:
        print(f"# {budget.describe()}")
    for config in sorted(catalog.models.values(), key=lambda c: c.name):
        where = "-"
        if config.model:
            path = resolve_model_path(settings.models_dir, config.model)
            where = config.model if path.exists() else f"{config.model} (missing)"
        remote = config.backend in catalog.backends and catalog.backends[config.backend].address
        if config.base is not None:  # served by its base's process: no memory of its own
            print(f"{config.name}\t{config.backend}\tvariant of {config.base}\t-\tshares it")
            continue
        needs, fits = _fits(book.footprint(config, remote=bool(remote)), budget)
        print(f"{config.name}\t{config.backend}\t{where}\t{needs}\t{fits}")
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
    from gateway.gallery import entry_footprint, is_installed
    from gateway.manager.footprint import FootprintBook

    settings = _settings(args)
    budget = _budget(settings)
    book = FootprintBook(settings.models_dir)
    index = _gallery()
    print(f"# {budget.describe()}")
    for entry in index.entries:
        state = "installed" if is_installed(entry, settings.models_dir) else "-"
        checked = "verified" if entry.verified else "unverified"
        backend = entry.config.get("backend", "?") if entry.base is None else f"lora:{entry.base}"
        needs, fits = _fits(entry_footprint(entry, settings.models_dir, book), budget)
        print(f"{entry.name}\t{backend}\t{state}\t{checked}\t{needs}\t{fits}\t{entry.description}")
    for error in index.errors:
        print(f"warning: left out of the gallery: {error}", file=sys.stderr)
    return 0


def _megabytes(count: int | None) -> str:
    return "?" if count is None else f"{count / 1e6:.1f} MB"


def models_install(args: argparse.Namespace) -> int:
    from gateway.gallery import InstallError, find_entry, install_entry
    from gateway.gallery.errors import InstallCancelled

    settings = _settings(args)
    index = _gallery()
    unknown = [n for n in args.names if index.get(n) is None and n not in index.rejected]
    if unknown:
        print(
            f"error: the gallery has no model named {', '.join(unknown)} "
            "(`hearth models available` lists them)",
            file=sys.stderr,
        )
        return 1
    # SIGTERM (`docker stop` during a container's first start) cancels the install between two
    # chunks: its staging folder is removed, nothing is left half-written in the models dir.
    cancelled = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancelled.set())
    install = functools.partial(install_entry, cancelled=cancelled)
    for name in args.names:
        try:
            entry = find_entry(index, name)
            if sys.stdout.isatty():
                _install_with_bars(entry, settings.models_dir, install)
            else:
                _install_with_lines(entry, settings.models_dir, install)
        except InstallCancelled:
            print(f"stopped: {name} was not installed (nothing of it was kept)", file=sys.stderr)
            return 128 + signal.SIGTERM
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
            if not progress.file:  # nothing to fetch: installed already
                return
            if progress.file not in tasks:
                tasks[progress.file] = bars.add_task(f"{entry.name}: {progress.file}", total=None)
            bars.update(tasks[progress.file], completed=progress.done, total=progress.total)

        install(entry, models_dir, report=report)


def _install_with_lines(entry: Any, models_dir: Path, install: Any) -> None:
    """Progress as plain lines (a log, a pipe): one per file every tenth, and at the end."""
    shown: dict[str, int] = {}

    def report(progress: Any) -> None:
        if not progress.file:  # nothing to fetch: installed already
            return
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
    from gateway.gallery import NotInstalledError, RemovalRefused, remove_model

    settings = _settings(args)
    try:
        removal = remove_model(args.name, settings.models_dir)
    except NotInstalledError:
        print(f"error: no installed model named {args.name}", file=sys.stderr)
        return 1
    except RemovalRefused as exc:
        print(f"error: not removed: {exc}", file=sys.stderr)
        return 1
    for kept in removal.kept:
        print(f"{args.name}: kept {kept['path']}: {kept['reason']}")
    print(f"{args.name}: removed")
    return 0


def ps(args: argparse.Namespace) -> int:
    """What a running gateway has loaded (GET /backends), like `ollama ps`."""
    import httpx

    settings = _settings(args)
    host = settings.host if settings.host not in {"0.0.0.0", "::"} else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    url = f"http://{host}:{settings.port}/backends"
    headers = {}
    # /backends is an admin route.
    key = os.environ.get("HEARTH_API_KEY") or next(iter(settings.admin_keys), None)
    if key:
        headers["authorization"] = f"Bearer {key}"
    try:
        response = httpx.get(url, headers=headers, timeout=10)
    except httpx.TransportError as exc:
        print(f"error: no gateway answers at {url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code in (401, 403):
        print(
            f"error: {url} wants an admin key: set HEARTH_API_KEY to one of HEARTH_ADMIN_KEYS "
            "(or an admin key of the keys file)",
            file=sys.stderr,
        )
        return 1
    if response.status_code != 200:
        print(f"error: {url} answered {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    print(render_backends(response.json()))
    return 0


def render_backends(view: dict[str, Any], now: float | None = None) -> str:
    """GET /backends as the table `hearth ps` prints."""
    from gateway.units import format_size

    now = time.time() if now is None else now
    rows = [
        ["NAME", "BACKEND", "STATE", "PID/NODE", "THREADS", "MEMORY (PLANNED)", "REQUESTS", "UNTIL"]
    ]
    for item in view.get("data", []):
        memory = item.get("memory") or {}
        rss, planned = memory.get("rss_bytes"), memory.get("planned_bytes")
        used = format_size(rss) if rss else "-"
        if planned:
            used += f" ({format_size(planned)} {memory.get('planned_from', '')})".rstrip()
        threads = "-"
        if item.get("threads"):
            threads = f"{item['threads']}/{item.get('threads_max') or item['threads']}"
        requests = item.get("requests") or {}
        busy = f"{requests.get('in_flight', 0)}+{requests.get('queued', 0)} queued"
        until = "-"
        if item.get("state") == "ready":
            expires = item.get("expires_at")
            if item.get("keep_alive_seconds") is None:
                until = "forever"
            elif expires is None:
                until = "busy"
            else:
                until = _in_words(expires - now)
        if item.get("state") in ("failed", "failing"):
            until = (item.get("last_error") or "").splitlines()[0][:60]
        # Where it runs: its pid here, else the node (a remote address, a Ray node).
        pid = str(item["pid"]) if item.get("pid") else (item.get("node") or "-")
        state = item.get("state", "?")
        if item.get("healthy") is False:
            state += " (out of rotation)"
        name = item["model"]
        if (item.get("replicas") or 1) > 1:
            name += f" [{item.get('replica', 0) + 1}/{item['replicas']}]"
        if item.get("variants"):  # served by this process too (`base:` in their YAML)
            name += f" (+ {', '.join(item['variants'])})"
        rows.append([name, item.get("backend", "-"), state, pid, threads, used, busy, until])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    budget = view.get("budget") or {}
    if budget:
        lines.append(
            f"\n{budget.get('cores')} core(s); memory for models "
            f"{format_size(budget.get('memory_used_bytes', 0))} of "
            f"{format_size(budget.get('memory_bytes', 0))} in use"
        )
    return "\n".join(line.rstrip() for line in lines)


def _in_words(seconds: float) -> str:
    if seconds < 90:
        return f"{max(0, int(seconds))} seconds from now"
    if seconds < 5400:
        return f"{int(seconds // 60)} minutes from now"
    return f"{seconds / 3600:.1f} hours from now"


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
    run_parser.add_argument(
        "--cpus", type=int, help="cores backends may compute on (default: the physical cores)"
    )
    run_parser.add_argument(
        "--memory", help="memory loaded models may take, e.g. 12G (default: available less 10%%)"
    )
    run_parser.add_argument(
        "--max-loaded-models", type=int, help="most models loaded at once (default: no limit)"
    )
    run_parser.add_argument(
        "--keep-alive", help="idle time before a model is unloaded (default 5m; -1: never)"
    )
    run_parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on a non-loopback address without API keys",
    )
    run_parser.set_defaults(handler=run)

    ps_parser = commands.add_parser("ps", help="what a running gateway has loaded")
    ps_parser.add_argument("--host", help="the gateway's address (default 127.0.0.1)")
    ps_parser.add_argument("--port", type=int, help="its port (default 8080)")
    ps_parser.set_defaults(handler=ps)

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
    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(commands, models)
    return parser


#: Packages that add their own subcommands (each a `cli.register(commands, models)`).
_COMMAND_MODULES = (
    "gateway.system.cli",
    "gateway.tune.cli",
    "gateway.convert.cli",
    "gateway.backup.cli",
)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.handler(args))
