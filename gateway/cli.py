"""The `hearth` command: `hearth run` and `hearth models list`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gateway.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        models_dir=args.models_dir,
        runtime_dir=getattr(args, "runtime_dir", None),
        log_level=getattr(args, "log_level", None),
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
    run_parser.set_defaults(handler=run)

    models = commands.add_parser("models", help="manage models").add_subparsers(
        dest="models_command", required=True
    )
    list_parser = models.add_parser("list", help="the models configured in the models dir")
    list_parser.add_argument("--models-dir", type=Path)
    list_parser.set_defaults(handler=models_list)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.handler(args))
