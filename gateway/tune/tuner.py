"""What `hearth tune` measures for one model, and how it chooses each setting.

llama models: threads, batch_size, parallel and context_size; transformers text models: threads
and parallel (their cache grows with use and batch_size is not theirs). Every figure comes from
the model's real backend process (see measure.py); each run is short and greedy, a warm-up run is
discarded, and each candidate is measured a few times: the tables show the median and the spread,
and a candidate wins only by more than the noise (otherwise the simpler value is kept).
"""

from __future__ import annotations

import asyncio
import datetime
import math
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gateway.config import ModelConfig, resolve_model_path
from gateway.manager.budget import MachineBudget
from gateway.manager.footprint import estimate, sequences
from gateway.manager.modelfiles import ModelFileError, read_gguf
from gateway.settings import Settings
from gateway.tune.measure import Figure, MeasureError, Run, TuningBackend, unique_prompts
from gateway.tune.measure import with_settings as _with
from gateway.units import format_size

T = TypeVar("T")

#: The backends tune knows how to measure.
TUNABLE_BACKENDS = ("llama", "transformers")
#: A candidate beats the preferred one only by more than this share (and beyond its spread).
NOISE = 0.05
#: `parallel` is chosen by total throughput among the values that keep each stream at least
#: this share of one stream's own speed.
STREAM_FLOOR = 0.5
#: `context_size` is the largest whose memory stays within this share of the memory budget.
MEMORY_SHARE = 0.8
#: The chat turn the thread count is chosen for: this many prompt tokens, then an answer of...
TURN_PROMPT_TOKENS = 500
#: ...this many tokens.
TURN_ANSWER_TOKENS = 200
#: A thread count whose chat turn takes this many times the fastest one's after the first
#: repeat is measured no further (on a busy machine, too many threads crawl).
SLOW_FACTOR = 2.0
#: A run taking this many times the quickest run so far (and at least RUN_CAP_MINIMUM
#: seconds) is stopped, and its thread count measured no further.
RUN_CAP_FACTOR = 4.0
RUN_CAP_MINIMUM = 2.0
#: llama.cpp's settings where the YAML sets none (backends/llama/backend.py).
LLAMA_CONTEXT = 4096
LLAMA_BATCH = 512
#: The settings tune measures for each backend, in the order it measures them.
SETTINGS = {
    "llama": ("threads", "batch_size", "parallel", "context_size"),
    "transformers": ("threads", "parallel"),
}


class TuneError(Exception):
    """The model cannot be tuned (unsupported, missing file); the message says why."""


@dataclass
class Row:
    """One candidate value and what was measured with it."""

    value: int
    figures: dict[str, Figure] = field(default_factory=dict)
    #: Why it was not measured, or what else to know about it.
    note: str = ""
    measured: bool = True


@dataclass
class Dimension:
    """One setting: its candidates' figures, the value chosen, and why."""

    key: str
    #: (figure name, column heading, format) for each column of its table.
    columns: list[tuple[str, str, str]]
    rows: list[Row]
    chosen: int | None = None
    rule: str = ""
    summary: str = ""
    #: The note written beside the key in the YAML.
    comment: str = ""
    note: str = ""
    #: How long its measurements took.
    seconds: float = 0.0


@dataclass
class TuneResult:
    """Everything one `hearth tune` run measured and chose."""

    model: str
    backend: str
    source: str
    date: str
    machine: dict[str, Any]
    method: dict[str, Any]
    dimensions: list[Dimension] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def chosen(self) -> dict[str, int]:
        """The chosen value of every setting that has one."""
        return {d.key: d.chosen for d in self.dimensions if d.chosen is not None}


@dataclass(frozen=True)
class Plan:
    """How much to measure: the candidates and the size of each run."""

    threads: list[int]
    batch_sizes: list[int]
    parallel: list[int]
    repeats: int
    answer_tokens: int
    quick: bool
    #: The settings to measure (the others keep the YAML's value, or the default).
    only: frozenset[str] = frozenset(k for keys in SETTINGS.values() for k in keys)


def supported(config: ModelConfig, custom_backends: Sequence[str] = ()) -> None:
    """Raise TuneError unless tune can measure `config`'s model."""
    what = f"'{config.name}'"
    if config.base is not None:
        # Its load settings are its base's (a variant's YAML may not set them), and it runs in
        # the base's process: what would be measured, and written, is the base's.
        raise TuneError(
            f"{what} is a variant of '{config.base}' (base: in its YAML): it runs in that "
            f"model's process with its settings; tune '{config.base}' instead"
        )
    if config.backend in custom_backends:
        raise TuneError(
            f"{what} is served by the custom backend '{config.backend}': tune measures models of "
            f"the built-in {' and '.join(TUNABLE_BACKENDS)} backends"
        )
    if config.backend not in TUNABLE_BACKENDS:
        raise TuneError(
            f"{what} is served by the {config.backend} backend: tune measures text generation "
            f"on the {' and '.join(TUNABLE_BACKENDS)} backends"
        )
    if config.embeddings or config.rerank:
        kind = "an embedding model" if config.embeddings else "a reranker"
        raise TuneError(f"{what} is {kind}: tune measures text generation models")
    if not config.model:
        raise TuneError(f"{what}: its YAML names no model file (model:)")


def thread_candidates(cores: int, logical: int, quick: bool) -> list[int]:
    """1, then powers of two up to `cores`, `cores` itself, and every logical CPU where there
    are more (hyperthreads)."""
    values = {1, cores}
    step = 2
    while step < cores:
        if not quick:
            values.add(step)
        step *= 2
    if quick and cores >= 4:
        values.add(cores // 2)
    if logical > cores:
        values.add(logical)
    return sorted(values)


def make_plan(cores: int, logical: int, quick: bool, only: frozenset[str] | None = None) -> Plan:
    return Plan(
        only=only if only is not None else Plan.only,
        threads=thread_candidates(cores, logical, quick),
        batch_sizes=[128, 512] if quick else [64, 128, 256, 512],
        parallel=[1, 4] if quick else [1, 2, 4],
        repeats=2 if quick else 3,
        answer_tokens=32 if quick else 48,
        quick=quick,
    )


def trained_context(config: ModelConfig, models_dir: Path) -> int | None:
    """The context a GGUF model was trained with, from its header."""
    if config.backend != "llama" or not config.model:
        return None
    try:
        header = read_gguf(resolve_model_path(models_dir, config.model))
    except (OSError, ValueError, ModelFileError):
        return None
    value = header.get("context_length")
    return int(value) if isinstance(value, int) and value > 0 else None


def context_candidates(current: int, trained: int | None, quick: bool) -> list[int]:
    """The current context, the trained one, and the powers of two between 2048 and it."""
    if trained is None:
        return [current]
    values = {min(current, trained), trained}
    if not quick:
        size = 2048
        while size < trained:
            values.add(size)
            size *= 2
    return sorted(values)


# Choosing ------------------------------------------------------------------------------------


def as_good(candidate: Figure, best: Figure, higher_is_better: bool) -> bool:
    """`candidate` is within the noise of `best`: within NOISE of its median, or their spreads
    overlap."""
    if higher_is_better:
        return candidate.median >= best.median * (1 - NOISE) or candidate.high >= best.low
    return candidate.median <= best.median * (1 + NOISE) or candidate.low <= best.high


def pick(
    rows: Sequence[Row],
    figure: str,
    *,
    higher_is_better: bool = True,
    preference: Sequence[int] = (),
) -> tuple[Row, Row] | None:
    """(the row chosen, the best row by median): the first row in `preference` order (then
    in table order) that is as good as the best."""
    measured = [r for r in rows if r.measured and figure in r.figures]
    if not measured:
        return None
    sign = 1 if higher_is_better else -1
    best = max(measured, key=lambda r: sign * r.figures[figure].median)
    order: dict[int, int] = {}
    for value in preference:
        order.setdefault(value, len(order))
    ranked = sorted(measured, key=lambda r: (order.get(r.value, len(order)), rows.index(r)))
    for row in ranked:
        if as_good(row.figures[figure], best.figures[figure], higher_is_better):
            return row, best
    return best, best


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


# Measuring -----------------------------------------------------------------------------------


Progress = Callable[[str], None]


class Tuner:
    """Measures one model's settings on this machine (see the module's docstring)."""

    def __init__(
        self,
        config: ModelConfig,
        settings: Settings,
        budget: MachineBudget,
        plan: Plan,
        *,
        logical_cpus: int,
        progress: Progress = lambda line: None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.budget = budget
        self.plan = plan
        self.logical_cpus = logical_cpus
        self.say = progress
        self.trained = trained_context(config, settings.models_dir)
        if config.backend == "llama":
            current = config.context_size or LLAMA_CONTEXT
            self.context = min(current, self.trained) if self.trained else current
        else:
            self.context = config.context_size or 0
        self.result = TuneResult(
            model=config.name,
            backend=config.backend,
            source=config.source,
            date=datetime.date.today().isoformat(),
            machine={
                "cores": budget.cores,
                "cores_from": budget.cores_from,
                "logical_cpus": logical_cpus,
                "memory_budget_bytes": budget.memory_bytes,
                "memory_from": budget.memory_from,
            },
            method={
                "quick": plan.quick,
                "repeats": plan.repeats,
                "answer_tokens": plan.answer_tokens,
                "sampling": "greedy (temperature 0), seed 1; one warm-up run discarded",
                "context_for_speed_runs": self.context or None,
                "trained_context": self.trained,
                "noise": NOISE,
                "stream_floor": STREAM_FLOOR,
                "memory_share": MEMORY_SHARE,
            },
        )

    async def run(self) -> TuneResult:
        started = time.monotonic()
        wanted = [k for k in SETTINGS[self.config.backend] if k in self.plan.only]
        # What a setting not measured is loaded with: the YAML's, or what the gateway gives.
        base = _with(
            self.config,
            threads=min(self.config.threads or self.budget.cores, self.budget.cores),
            parallel=1,
            context_size=self.context or None,
        )
        if set(wanted) & {"threads", "batch_size", "parallel"}:
            self.say(f"starting the {self.config.backend} backend for {self.config.name}")
            async with TuningBackend(self.config, self.settings) as backend:
                if "threads" in wanted:
                    threads = await self._timed(self._threads(backend, base))
                    base = _with(base, threads=threads)
                if "batch_size" in wanted:
                    batch = await self._timed(self._batch_size(backend, base))
                    base = _with(base, batch_size=batch)
                if "parallel" in wanted:
                    parallel = await self._timed(self._parallel(backend, base))
                    base = _with(base, parallel=parallel)
        if "parallel" not in wanted:
            base = _with(base, parallel=sequences(self.config))
        if "context_size" in wanted:
            await self._timed(self._context(base))
        self.result.seconds = round(time.monotonic() - started, 1)
        return self.result

    async def _timed(self, phase: Coroutine[Any, Any, T]) -> T:
        """Run one setting's measurements; note the seconds they took on its dimension."""
        started = time.monotonic()
        value = await phase
        self.result.dimensions[-1].seconds = round(time.monotonic() - started, 1)
        return value

    async def _load(self, backend: TuningBackend, config: ModelConfig) -> None:
        started = time.monotonic()
        await backend.load(config, config.threads or 0)
        self.say(
            f"  loaded with threads {config.threads}, batch_size {config.batch_size or '-'}, "
            f"parallel {config.parallel}, context {config.context_size or '-'} "
            f"({time.monotonic() - started:.1f} s)"
        )

    def _prompt_budget(self, wanted: int) -> int:
        """Prompt tokens that leave room for the answer in one sequence's context."""
        if not self.context:
            return wanted
        return max(8, min(wanted, self.context - self.plan.answer_tokens - 16))

    # threads -------------------------------------------------------------------------------

    async def _threads(self, backend: TuningBackend, base: ModelConfig) -> int:
        plan = self.plan
        self.say(f"threads: {', '.join(map(str, plan.threads))}")
        # Loaded with the most; each count is then set as the gateway sets it (SetThreads).
        await self._load(backend, _with(base, threads=max(plan.threads)))
        prompt = await backend.prompt(self._prompt_budget(128))
        rows = {t: Row(t) for t in plan.threads}
        runs: dict[int, list[Run]] = {t: [] for t in plan.threads}
        counter = 0
        active = list(plan.threads)
        quickest = math.inf  # seconds of the quickest run so far
        # One warm-up run per thread count, then the repeats taken in turns: a slow moment of
        # the machine falls on every candidate alike, not on one.
        for repeat in range(plan.repeats + 1):
            for threads in list(active):
                await backend.set_threads(threads)
                (text,) = unique_prompts(prompt, 1, counter)
                counter += 1
                limit = max(RUN_CAP_MINIMUM, RUN_CAP_FACTOR * quickest)
                try:
                    run = await asyncio.wait_for(
                        backend.generate(text, plan.answer_tokens),
                        None if math.isinf(limit) else limit,
                    )
                except TimeoutError:
                    # Threads that wait on each other's busy cores crawl: stop, not wait.
                    active.remove(threads)
                    rows[
                        threads
                    ].note = (
                        f"stopped: a run took over {limit:.1f} s ({RUN_CAP_FACTOR:g}x the quickest)"
                    )
                    continue
                quickest = min(quickest, run.total_seconds)
                if repeat:
                    runs[threads].append(run)
            if repeat and active:
                turns = {t: Figure([_turn_seconds(r) for r in runs[t]]).median for t in active}
                fastest = min(turns.values())
                for threads in [t for t in active if turns[t] > SLOW_FACTOR * fastest]:
                    active.remove(threads)
                    slower = turns[threads] / fastest
                    rows[threads].note = f"measured no further: {slower:.1f}x the fastest turn"
        for threads, row in rows.items():
            measured = runs[threads]
            if threads > self.budget.cores:
                row.note = f"more than the gateway's {self.budget.cores} core(s); {row.note}"
                row.note = row.note.rstrip("; ")
            if not measured:
                row.measured = False
                self.say(f"  threads {threads}: {row.note}")
                continue
            row.figures["generation"] = Figure([r.generation_rate for r in measured])
            row.figures["prompt"] = Figure([r.prompt_rate for r in measured])
            row.figures["turn"] = Figure([_turn_seconds(r) for r in measured])
            self.say(
                f"  threads {threads}: {_rate(row.figures['generation'].median)} tok/s "
                f"generating, {_rate(row.figures['prompt'].median)} tok/s reading the prompt"
            )
        _short_answers(self.result, [r for rs in runs.values() for r in rs], plan.answer_tokens)
        dimension = Dimension(
            "threads",
            [
                ("generation", "gen tok/s", "rate"),
                ("prompt", "prompt tok/s", "rate"),
                ("turn", "turn s", "seconds"),
            ],
            list(rows.values()),
            rule=(
                f"the fewest threads within {NOISE:.0%} (or the spread) of the fastest chat turn "
                f"({TURN_PROMPT_TOKENS} prompt tokens, then {TURN_ANSWER_TOKENS} generated)"
            ),
        )
        self.result.dimensions.append(dimension)
        picked = pick(dimension.rows, "turn", higher_is_better=False, preference=plan.threads)
        if picked is None:
            raise MeasureError("no thread count could be measured: the machine is too busy")
        chosen, _ = picked
        dimension.chosen = chosen.value
        single = rows[plan.threads[0]].figures.get("generation")
        generation = chosen.figures["generation"].median
        speedup = ""
        if chosen.value != 1 and single is not None and single.median:
            speedup = f", {generation / single.median:.1f}x of 1 thread"
        others = [
            (r.value, _median_text(r, "generation")) for r in rows.values() if r is not chosen
        ]
        dimension.summary = (
            f"threads: {chosen.value} ({_rate(generation)} tok/s gen{speedup}; "
            f"{_rate(chosen.figures['prompt'].median)} tok/s prompt"
            + "".join(f"; {value} → {text}" for value, text in others)
            + ")"
        )
        dimension.comment = f"{_rate(generation)} tok/s gen" + "".join(
            f"; {value}: {text}" for value, text in others
        )
        if chosen.value > self.budget.cores:
            dimension.note = (
                f"the gateway gives a model at most {self.budget.cores} thread(s) "
                f"({self.budget.cores_from}); start it with --cpus {chosen.value} "
                "(HEARTH_CPUS) to use them"
            )
        return chosen.value

    # batch_size ----------------------------------------------------------------------------

    async def _batch_size(self, backend: TuningBackend, base: ModelConfig) -> int:
        plan = self.plan
        # llama.cpp reads a prompt in chunks of at most one sequence's context.
        sizes = sorted({min(b, self.context) for b in plan.batch_sizes})
        current = min(self.config.batch_size or LLAMA_BATCH, self.context)
        self.say(f"batch_size: {', '.join(map(str, sizes))}")
        # Long enough to take several chunks of the smaller sizes, short enough to be quick.
        length = self._prompt_budget(320)
        rows = []
        prompt = ""
        counter = 100
        for size in sizes:
            await self._load(backend, _with(base, batch_size=size))
            if not prompt:
                prompt = await backend.prompt(length)
            # The warm-up: one chunk of the new size.
            (warm,) = unique_prompts(await backend.prompt(min(size, length)), 1, counter)
            await backend.generate(warm, 1)
            runs = []
            for _ in range(plan.repeats):
                (text,) = unique_prompts(prompt, 1, counter + 1)
                counter += 1
                runs.append(await backend.generate(text, 1))
            counter += 1
            row = Row(size, {"prompt": Figure([r.prompt_rate for r in runs])})
            row.note = f"{runs[0].prompt_tokens} prompt tokens"
            rows.append(row)
            self.say(f"  batch_size {size}: {_rate(row.figures['prompt'].median)} tok/s prompt")
        dimension = Dimension(
            "batch_size",
            [("prompt", "prompt tok/s", "rate")],
            rows,
            rule=(
                f"the fastest prompt reading; within {NOISE:.0%} (or the spread), "
                f"{current} (the current value), else the smallest (it takes less memory)"
            ),
        )
        self.result.dimensions.append(dimension)
        picked = pick(rows, "prompt", preference=[current, *sizes])
        assert picked is not None
        chosen, _ = picked
        dimension.chosen = chosen.value
        rate = _rate(chosen.figures["prompt"].median)
        others = [r for r in rows if r is not chosen]
        dimension.summary = (
            f"batch_size: {chosen.value} ({rate} tok/s prompt"
            + "".join(f"; {r.value} → {_rate(r.figures['prompt'].median)}" for r in others)
            + ")"
        )
        dimension.comment = f"{rate} tok/s prompt" + "".join(
            f"; {r.value}: {_rate(r.figures['prompt'].median)}" for r in others
        )
        return chosen.value

    # parallel ------------------------------------------------------------------------------

    async def _parallel(self, backend: TuningBackend, base: ModelConfig) -> int:
        plan = self.plan
        self.say(f"parallel: {', '.join(map(str, plan.parallel))}")
        # Short prompts: the rounds measure generating, which several users share.
        prompt = await backend.prompt(self._prompt_budget(32))
        rows = []
        counter = 200
        for count in plan.parallel:
            candidate = _with(base, parallel=count)
            planned = estimate(candidate, self.settings.models_dir).bytes
            if planned > self.budget.memory_bytes:
                rows.append(
                    Row(
                        count,
                        note=f"not measured: needs ~{format_size(planned)}, budget "
                        f"{format_size(self.budget.memory_bytes)}",
                        measured=False,
                    )
                )
                continue
            await self._load(backend, candidate)
            totals: list[float] = []
            streams: list[float] = []
            for repeat in range(plan.repeats + 1):
                prompts = unique_prompts(prompt, count, counter)
                counter += count
                runs = await backend.generate_together(prompts, plan.answer_tokens)
                if not repeat:
                    continue
                seconds = max(r.ended for r in runs) - min(r.started for r in runs)
                totals.append(sum(r.completion_tokens for r in runs) / seconds)
                streams.extend(r.generation_rate for r in runs)
            row = Row(count, {"total": Figure(totals), "stream": Figure(streams)})
            rows.append(row)
            self.say(
                f"  parallel {count}: {_rate(row.figures['total'].median)} tok/s in all, "
                f"{_rate(row.figures['stream'].median)} tok/s each"
            )
        dimension = Dimension(
            "parallel",
            [("total", "total tok/s", "rate"), ("stream", "per-stream tok/s", "rate")],
            rows,
            rule=(
                f"the most total tok/s among the values that keep each stream at "
                f"{STREAM_FLOOR:.0%} or more of one stream's speed; within {NOISE:.0%} (or the "
                "spread), the fewest"
            ),
        )
        self.result.dimensions.append(dimension)
        single = next((r for r in rows if r.measured and r.value == 1), None)
        if single is None:
            dimension.note = "nothing could be measured within the memory budget"
            return 1
        floor = single.figures["stream"].median * STREAM_FLOOR
        for row in rows:
            if row.measured and row.figures["stream"].median < floor:
                row.note = f"below the per-stream floor ({_rate(floor)} tok/s)"
        eligible = [r for r in rows if r.measured and not r.note]
        picked = pick(eligible, "total", preference=plan.parallel)
        assert picked is not None
        chosen, _ = picked
        dimension.chosen = chosen.value
        total, stream = chosen.figures["total"].median, chosen.figures["stream"].median
        others = [r for r in rows if r is not chosen and r.measured]
        dimension.summary = (
            f"parallel: {chosen.value} ({_rate(total)} tok/s in all, {_rate(stream)} tok/s "
            "each"
            + "".join(f"; {r.value} → {_rate(r.figures['total'].median)}" for r in others)
            + ")"
        )
        dimension.comment = f"{_rate(total)} tok/s in all, {_rate(stream)} each" + "".join(
            f"; {r.value}: {_rate(r.figures['total'].median)}" for r in others
        )
        return chosen.value

    # context_size --------------------------------------------------------------------------

    async def _context(self, base: ModelConfig) -> None:
        sizes = context_candidates(self.context, self.trained, self.plan.quick)
        limit = int(self.budget.memory_bytes * MEMORY_SHARE)
        self.say(
            f"context_size: {', '.join(map(str, sizes))} (parallel {base.parallel}; memory "
            f"limit {format_size(limit)})"
        )
        rows = []
        for size in sizes:
            candidate = _with(base, context_size=size)
            planned = estimate(candidate, self.settings.models_dir).bytes
            row = Row(size, {"planned": Figure([planned])})
            rows.append(row)
            if planned > self.budget.memory_bytes:
                row.measured = False
                row.note = "not measured: the estimate is past the budget"
                break
            # A fresh process for each: memory freed by an unload is not all given back.
            try:
                async with TuningBackend(self.config, self.settings) as backend:
                    await self._load(backend, candidate)
                    prompt = await backend.prompt(self._prompt_budget(64))
                    await backend.generate(prompt, 8)
                    resident = backend.resident_bytes()
            except MeasureError as exc:
                row.measured = False
                row.note = f"failed to load: {exc.args[0].splitlines()[0][:100]}"
                break
            row.figures["resident"] = Figure([resident])
            fits = max(resident, planned) <= limit
            row.note = "fits" if fits else "too big"
            self.say(
                f"  context {size}: {format_size(resident)} resident "
                f"(the gateway plans {format_size(planned)})"
            )
            if not fits:
                break
        trained = f"trained {self.trained}" if self.trained else "trained context unknown"
        dimension = Dimension(
            "context_size",
            [("resident", "resident", "bytes"), ("planned", "planned", "bytes")],
            rows,
            rule=(
                f"the largest up to the trained context ({self.trained or '?'}) whose memory "
                f"(resident after a short run, or the gateway's plan, whichever is more) stays "
                f"within {MEMORY_SHARE:.0%} of the memory budget, with parallel {base.parallel}"
            ),
        )
        self.result.dimensions.append(dimension)
        fitting = [r for r in rows if r.measured and r.note == "fits"]
        if not fitting:
            dimension.note = "no context size fits the memory budget; context_size is left alone"
            return
        chosen = fitting[-1]
        dimension.chosen = chosen.value
        memory = format_size(chosen.figures["resident"].median)
        dimension.summary = (
            f"context_size: {chosen.value} ({trained}; {memory} resident with parallel "
            f"{base.parallel}; budget {format_size(self.budget.memory_bytes)})"
        )
        dimension.comment = f"{memory} resident with parallel {base.parallel}; {trained}"


def _median_text(row: Row, figure: str) -> str:
    """A row's median of `figure`, or why it has none."""
    measured = row.figures.get(figure)
    return _rate(measured.median) if measured is not None and measured.values else "stopped"


def _turn_seconds(run: Run) -> float:
    """A chat turn's seconds at this run's speeds (see TURN_PROMPT_TOKENS)."""
    if run.prompt_rate <= 0 or run.generation_rate <= 0:
        return float("inf")
    return TURN_PROMPT_TOKENS / run.prompt_rate + TURN_ANSWER_TOKENS / run.generation_rate


def _short_answers(result: TuneResult, runs: list[Run], wanted: int) -> None:
    """Warn where the model ended its answers early: fewer tokens make noisier figures."""
    shortest = min((r.completion_tokens for r in runs), default=wanted)
    if shortest < wanted // 2:
        result.warnings.append(
            f"the model ended some answers after {shortest} of {wanted} tokens: its generation "
            "figures rest on few tokens"
        )


def busy_elsewhere() -> list[str]:
    """Hearth backends of another gateway running now (pid and model): they compete for the
    cores while tuning runs."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        words = [a.decode(errors="replace") for a in argv]
        if parent == me or "--address" not in words:
            continue
        module = next((w for w in words if w.startswith("backends.")), None)
        if module is not None:
            found.append(f"pid {entry.name} ({module.removeprefix('backends.')})")
    return found


class CpuWatch:
    """How busy the machine's CPUs were with other processes' work while tuning ran (from
    /proc/stat, less this process's and its reaped children's own time)."""

    def __init__(self, stat: Path = Path("/proc/stat")) -> None:
        self.stat = stat
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float, int] | None:
        try:
            first = self.stat.read_text().splitlines()[0].split()
            cpus = sum(1 for line in self.stat.read_text().splitlines() if line[:3] == "cpu") - 1
        except (OSError, IndexError):
            return None
        if first[0] != "cpu" or len(first) < 9:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, first[1:9])
        busy = (user + nice + system + irq + softirq + steal) / ticks
        own = os.times()
        ours = own.user + own.system + own.children_user + own.children_system
        return busy, ours, time.monotonic(), max(1, cpus)

    def others(self) -> float | None:
        """The share of all CPUs others used since this watch began (None where unknown)."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        busy, ours, wall = (b - a for a, b in zip(self._start[:3], end[:3], strict=True))
        if wall <= 0:
            return None
        return max(0.0, min(1.0, (busy - ours) / (wall * end[3])))
