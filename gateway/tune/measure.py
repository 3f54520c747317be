"""Short generation runs against a model's real backend process, driven over gRPC as the gateway
drives it: the process is started by the gateway's own Launcher, loaded with the settings under
test, and asked for streamed generations whose timings are read on arrival."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from gateway.config import ModelConfig
from gateway.errors import OpenAIError
from gateway.manager.budget import resident_memory
from gateway.manager.instance import BackendInstance
from gateway.manager.process import Launcher, load_request_for
from gateway.settings import Settings
from gateway.translate.text import adapters
from protos.hearth.backend.v1 import backend_pb2 as pb

#: Words a measuring prompt is made of: plain prose, so that a model goes on writing.
_PASSAGE = (
    "The village sat at the bend of a slow river, and every morning the baker opened her "
    "shutters before the sun had cleared the hills. She knew each of her neighbours by the "
    "bread they bought: the schoolteacher took a dark rye, the two brothers who kept the mill "
    "wanted rolls still warm from the oven, and the old sailor asked for whatever was left. "
    "In spring the river rose and the lower street smelled of mud and wild garlic; in summer "
    "the children swam by the stone bridge while their parents argued about the weather. "
    "Nobody remembered who had built the clock tower, but everyone agreed it ran four minutes "
    "slow, and nobody wanted it mended. "
)
#: Openings that make each prompt differ from its first word, so that no run reuses another's
#: cached prompt (the llama backend keeps a finished request's tokens for the next one).
_OPENINGS = (
    "Autumn", "Yesterday", "Meanwhile", "Later", "Somewhere", "Quietly", "Northward",
    "Beyond", "Tonight", "Afterwards", "Elsewhere", "Finally", "Suddenly", "Outside",
)  # fmt: skip


@dataclass(frozen=True)
class Run:
    """One streamed generation's timings."""

    #: Prompt tokens the backend computed (those found in its cache left out, where it says).
    prompt_tokens: int
    completion_tokens: int
    #: Seconds from sending the request to its first message (the prompt read, a token out).
    first_seconds: float
    #: Seconds from sending it to its last message.
    total_seconds: float
    started: float = 0.0
    ended: float = 0.0

    @property
    def prompt_rate(self) -> float:
        """Prompt tokens per second (the time to the first token)."""
        return self.prompt_tokens / self.first_seconds if self.first_seconds > 0 else 0.0

    @property
    def generation_rate(self) -> float:
        """Generated tokens per second after the first one."""
        seconds = self.total_seconds - self.first_seconds
        return (self.completion_tokens - 1) / seconds if seconds > 0 else 0.0


@dataclass
class Figure:
    """Repeated measurements of one quantity: its median and spread."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else 0.0

    @property
    def low(self) -> float:
        return min(self.values) if self.values else 0.0

    @property
    def high(self) -> float:
        return max(self.values) if self.values else 0.0


class MeasureError(Exception):
    """The backend could not be started, loaded or asked as a measurement needs."""


class TuningBackend:
    """One real backend process for a model, started the way the gateway starts one; loaded
    again (in the same process) with each set of settings under test."""

    def __init__(self, config: ModelConfig, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.launcher = Launcher(settings)
        self.instance: BackendInstance | None = None
        self.loaded: pb.LoadResponse | None = None
        self._pump: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TuningBackend:
        self.launcher.open()
        try:
            self.instance = await self.launcher.spawn(self.config, None)
            self._pump = asyncio.create_task(self.launcher.pump_output(self.instance))
            await self.launcher.wait_healthy(self.instance)
        except OpenAIError as exc:
            await self.close()
            raise MeasureError(exc.message) from None
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.instance is not None:
            await self.launcher.stop(self.instance)
        if self._pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 2.0)
        await self.launcher.close()

    @property
    def _live(self) -> BackendInstance:
        assert self.instance is not None, "use TuningBackend as an async context manager"
        return self.instance

    async def load(self, config: ModelConfig, threads: int) -> pb.LoadResponse:
        """Load `config`'s model (unloading what was loaded) computing with `threads`."""
        instance = self._live
        request = load_request_for(config, self.settings.models_dir, threads)
        try:
            if self.loaded is not None:
                await instance.client.unload()
                self.loaded = None
            self.loaded = await self.launcher.load(instance, request)
            if self.loaded.adjustable_threads:
                # The backend keeps the last SetThreads across loads: say it again.
                await instance.client.set_threads(threads)
        except OpenAIError as exc:
            raise MeasureError(exc.message) from None
        return self.loaded

    async def set_threads(self, threads: int) -> int:
        try:
            return await self._live.client.set_threads(threads)
        except OpenAIError as exc:
            raise MeasureError(exc.message) from None

    def resident_bytes(self) -> int:
        """Resident memory of the backend process now (with any children)."""
        pid = self._live.pid
        if pid is None:
            return 0
        memory = resident_memory([pid]).get(pid)
        return memory.total if memory is not None else 0

    async def tokens(self, text: str) -> list[int]:
        try:
            reply = await self._live.client.tokenize(pb.TokenizeRequest(text=text))
        except OpenAIError as exc:
            raise MeasureError(exc.message) from None
        return list(reply.tokens)

    async def prompt(self, tokens: int) -> str:
        """Prose of about `tokens` tokens in this model's vocabulary."""
        text = _PASSAGE
        ids = await self.tokens(text)
        while len(ids) < tokens:
            text += _PASSAGE
            ids = await self.tokens(text)
        try:
            reply = await self._live.client.detokenize(pb.DetokenizeRequest(tokens=ids[:tokens]))
        except OpenAIError as exc:
            raise MeasureError(exc.message) from None
        return reply.text

    async def generate(self, prompt: str, max_tokens: int, seed: int = 1) -> Run:
        """One streamed generation, greedy, of up to `max_tokens` tokens."""
        request = pb.GenerateRequest(
            prompt=prompt,
            sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=seed),
            adapters=adapters(self.config),  # a model's own `lora:`, as the gateway sends them
        )
        started = time.perf_counter()
        first: float | None = None
        usage = None
        try:
            async for message in self._live.client.generate_stream(request):
                if first is None:
                    first = time.perf_counter()
                if message.HasField("usage"):
                    usage = message.usage
        except OpenAIError as exc:
            raise MeasureError(exc.message) from None
        ended = time.perf_counter()
        if usage is None or first is None:
            raise MeasureError("the backend ended a generation without reporting its usage")
        cached = usage.cached_prompt_tokens if usage.HasField("cached_prompt_tokens") else 0
        return Run(
            prompt_tokens=max(0, usage.prompt_tokens - cached),
            completion_tokens=usage.completion_tokens,
            first_seconds=first - started,
            total_seconds=ended - started,
            started=started,
            ended=ended,
        )

    async def generate_together(self, prompts: Sequence[str], max_tokens: int) -> list[Run]:
        """Several generations sent at once (as concurrent users would)."""
        return list(await asyncio.gather(*(self.generate(p, max_tokens) for p in prompts)))


def unique_prompts(base: str, count: int, start: int = 0) -> list[str]:
    """`count` prompts that differ from their first word on (see _OPENINGS)."""
    prompts = []
    for index in range(start, start + count):
        opening = _OPENINGS[index % len(_OPENINGS)]
        prompts.append(f"{opening} ({index}), {base}")
    return prompts


def with_settings(config: ModelConfig, **values: int | None) -> ModelConfig:
    """`config` with some load settings replaced."""
    return msgspec.structs.replace(config, **values)
