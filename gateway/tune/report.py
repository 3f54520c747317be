"""A tune run as the tables `hearth tune` prints, and as the JSON it keeps in the models dir."""

from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from gateway.tune.measure import Figure
from gateway.tune.tuner import Dimension, TuneResult
from gateway.units import format_size


def _number(value: float, kind: str) -> str:
    if kind == "bytes":
        return format_size(value)
    if kind == "seconds":
        return f"{value:.2f}"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def format_figure(figure: Figure, kind: str) -> str:
    """The median, with the spread of the repeats where there are several."""
    text = _number(figure.median, kind)
    if len(figure.values) > 1 and kind != "bytes":
        text += f" ({_number(figure.low, kind)}-{_number(figure.high, kind)})"
    return text


def render_dimension(dimension: Dimension) -> str:
    """One setting's table: a row per candidate, `*` on the one chosen."""
    header = ["", dimension.key, *(title for _, title, _ in dimension.columns), ""]
    rows = [header]
    for row in dimension.rows:
        cells = ["*" if row.value == dimension.chosen else "", str(row.value)]
        for name, _, kind in dimension.columns:
            figure = row.figures.get(name)
            cells.append(format_figure(figure, kind) if figure and figure.values else "-")
        cells.append(row.note)
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for cells in rows:
        parts = [cells[0].ljust(widths[0]), cells[1].rjust(widths[1])]
        parts += [c.rjust(w) for c, w in zip(cells[2:-1], widths[2:-1], strict=True)]
        parts.append(cells[-1])
        lines.append("  ".join(parts).rstrip())
    lines.append(f"  chosen: {dimension.rule}")
    if dimension.note:
        lines.append(f"  note: {dimension.note}")
    return "\n".join(lines)


def render(result: TuneResult) -> str:
    """Every table, then the summary of the values chosen."""
    machine = result.machine
    lines = [
        f"# {result.model} ({result.backend}) on {machine['cores']} core(s) "
        f"({machine['cores_from']}); {format_size(machine['memory_budget_bytes'])} memory "
        f"budget; {result.seconds:g} s",
        f"# each figure: median (min-max) of {result.method['repeats']} runs of "
        f"{result.method['answer_tokens']} tokens, {result.method['sampling']}",
        "",
    ]
    for dimension in result.dimensions:
        lines += [render_dimension(dimension), ""]
    lines.append("summary:")
    for dimension in result.dimensions:
        if dimension.summary:
            lines.append(f"  {dimension.summary}")
        else:
            lines.append(f"  {dimension.key}: not chosen ({dimension.note or 'no figures'})")
    for warning in result.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def _figure_json(figure: Figure) -> dict[str, Any]:
    return {
        "median": round(figure.median, 3),
        "min": round(figure.low, 3),
        "max": round(figure.high, 3),
        "values": [round(v, 3) for v in figure.values],
    }


def to_json(result: TuneResult) -> dict[str, Any]:
    """The whole run: machine, method, every candidate's figures, and the values chosen."""
    return {
        "model": result.model,
        "backend": result.backend,
        "source": result.source,
        "date": result.date,
        "seconds": result.seconds,
        "machine": result.machine,
        "method": result.method,
        "chosen": result.chosen(),
        "dimensions": [
            {
                "key": d.key,
                "chosen": d.chosen,
                "rule": d.rule,
                "summary": d.summary,
                "note": d.note,
                "seconds": d.seconds,
                "candidates": [
                    {
                        "value": row.value,
                        "measured": row.measured,
                        "note": row.note,
                        "figures": {n: _figure_json(f) for n, f in row.figures.items()},
                    }
                    for row in d.rows
                ],
            }
            for d in result.dimensions
        ],
        "warnings": result.warnings,
    }


def record_path(models_dir: Path, name: str) -> Path:
    """Where a model's last tune run is kept: `<models dir>/.hearth/tune/<NAME>.json` (a name's
    `/` and `:` percent-encoded, so that it stays one file in that folder)."""
    return models_dir / ".hearth" / "tune" / f"{urllib.parse.quote(name, safe='._-')}.json"


def save(result: TuneResult, models_dir: Path) -> Path:
    """Write the run's JSON (a temp file, then a rename: never half-written)."""
    path = record_path(models_dir, result.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tune-", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(to_json(result), handle, indent=1)
            handle.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
