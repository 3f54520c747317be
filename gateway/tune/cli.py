"""`hearth tune NAME`: measure this machine for one model, show the figures, and write the best
values into its YAML on request (`--write`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

#: Other processes' share of the CPUs past which the figures are called skewed.
_BUSY_WARNING = 0.15


def register(commands: Any, models: Any) -> None:
    """Add this package's subcommands: `commands` is hearth's, `models` is `hearth models`'s."""
    del models
    parser = commands.add_parser(
        "tune",
        help="measure the best threads, batch size, parallel and context for a model",
        description=(
            "Measure this machine for one model with short generation runs on its real "
            "backend (threads, batch_size, parallel, context_size), show the figures, and, "
            "with --write, set the chosen values in its YAML."
        ),
    )
    parser.add_argument("name", metavar="NAME", help="the model, as `hearth models list` names it")
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer candidates and repeats")
    parser.add_argument(
        "--write",
        action="store_true",
        help="set the chosen values in the model's YAML (other lines are kept as they are)",
    )
    parser.add_argument(
        "--only",
        metavar="KEYS",
        help="measure only these settings, comma-separated (threads,batch_size,parallel,"
        "context_size); the others keep their YAML values",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--cpus", type=int, help="cores to tune for (default: the gateway's, HEARTH_CPUS)"
    )
    parser.add_argument(
        "--memory", help="memory budget to tune for, e.g. 8G (default: the gateway's)"
    )
    parser.set_defaults(handler=tune)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def tune(args: argparse.Namespace) -> int:
    from gateway.cli import _settings
    from gateway.config import load_catalog, resolve_model_path
    from gateway.manager.budget import Machine
    from gateway.tune.measure import MeasureError
    from gateway.tune.report import render, save, to_json
    from gateway.tune.tuner import (
        SETTINGS,
        CpuWatch,
        TuneError,
        Tuner,
        busy_elsewhere,
        make_plan,
        supported,
    )

    # A private runtime dir, never a configured one: a gateway using that dir numbers its
    # sockets as our backends would, and a new backend's socket replaces a stale one's.
    settings = dataclasses.replace(_settings(args), runtime_dir=None)
    if args.cpus is not None and args.cpus < 1:
        return _error("--cpus must be at least 1")
    models_dir = settings.models_dir
    catalog = load_catalog(models_dir)
    config = catalog.models.get(args.name)
    if config is None:
        broken = [e for e in catalog.errors if f"'{args.name}'" in e or f"{args.name}." in e]
        hint = f" ({broken[0]})" if broken else " (`hearth models list` lists them)"
        return _error(f"no model named {args.name} in {models_dir}{hint}")
    try:
        supported(config, list(catalog.backends))
    except TuneError as exc:
        return _error(str(exc))
    assert config.model is not None
    only = None
    if args.only is not None:
        only = frozenset(k.strip() for k in args.only.split(",") if k.strip())
        measurable = SETTINGS[config.backend]
        unknown = sorted(only - set(measurable))
        if unknown or not only:
            return _error(
                f"--only: {', '.join(unknown) or 'nothing given'}: tune measures "
                f"{', '.join(measurable)} for {config.backend} models"
            )
    if not resolve_model_path(models_dir, config.model).exists():
        return _error(f"{args.name}: its model file {config.model} is missing from {models_dir}")

    machine = Machine()
    budget = machine.budget(settings.cpus, settings.memory)
    logical = len(machine.cpus())
    if settings.cpus is not None:
        logical = min(logical, budget.cores)  # asked for this many: no more are tried
    plan = make_plan(budget.cores, logical, args.quick, only)
    neighbours = busy_elsewhere()
    watch = CpuWatch()

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    tuner = Tuner(config, settings, budget, plan, logical_cpus=logical, progress=progress)
    try:
        result = asyncio.run(tuner.run())
    except MeasureError as exc:
        return _error(f"measuring {args.name} failed: {exc}")
    except KeyboardInterrupt:
        print("stopped: nothing was written", file=sys.stderr)
        return 130
    others = watch.others()
    result.machine["others_cpu_share"] = None if others is None else round(others, 3)
    if others is not None and others > _BUSY_WARNING:
        result.warnings.append(
            f"other processes kept {others:.0%} of the CPUs busy while tuning ran: the figures "
            "are lower and noisier than on an idle machine; tune again when it is quiet"
        )
    if neighbours:
        result.warnings.append(
            f"backends of another Hearth gateway were running ({', '.join(neighbours)}): "
            "any request they served meanwhile took cores from these runs"
        )

    saved: Path | None = None
    try:
        saved = save(result, models_dir)
    except OSError as exc:
        result.warnings.append(f"the measurements were not saved: {exc}")

    changes: list[Any] = []
    write_error = None
    if args.write:
        changes, write_error = _write(result, models_dir)

    if args.json:
        document = to_json(result)
        document["saved"] = str(saved) if saved else None
        document["written"] = (
            {c.key: {"old": c.old, "new": c.new, "line": c.line} for c in changes}
            if args.write
            else None
        )
        print(json.dumps(document, indent=1))
    else:
        print(render(result))
        if saved is not None:
            print(f"\nmeasurements saved in {saved}")
        if changes:
            print(f"written to {result.source}:")
            for change in changes:
                was = "unset" if change.old is None else str(change.old)
                print(f"  {change.line}   (was {was})")
            print("a running gateway uses them from the model's next load")
        elif not args.write and result.chosen():
            print(f"to set these values: hearth tune {args.name} --write (or --quick --write)")
    if write_error is not None:
        return _error(write_error)
    return 0


def _write(result: Any, models_dir: Path) -> tuple[list[Any], str | None]:
    """Set the chosen values in the model's YAML; (the changes, or the error)."""
    from gateway.tune.write import WriteError, write_settings

    values = result.chosen()
    if not values:
        return [], "nothing was chosen, so nothing was written"
    comments = {d.key: f"{result.date}: {d.comment}" for d in result.dimensions if d.comment}
    try:
        return write_settings(Path(result.source), models_dir, values, comments), None
    except WriteError as exc:
        return [], f"{result.source} was not changed: {exc}"
