"""Prometheus metrics: what the gateway answers, how fast, for which key, and what backends hold.

One `Metrics` per app, on a registry of its own (never prometheus_client's global one: a process
may run several apps, as the tests do). The BackendManager owns it; requests are counted by
RequestLifetime, token timings and usage by the routes, queue and load times and exits by the
manager, and what backends hold now (resident memory, requests) is read from the manager at each
scrape rather than kept up to date by a loop.

Label values come only from what the server itself knows: route templates, the catalog's model
names, key names and status codes. A model name a client made up never becomes a label value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway import identity
from protos.hearth.backend.v1 import backend_pb2 as pb

#: The media type of `Metrics.exposition()`.
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: The model label of a request whose model is not (yet) known: none named, one the catalog
#: does not have, or a request refused before its model was looked up.
NO_MODEL = ""

_TIME_TO_FIRST_TOKEN_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
_QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class BackendSample:
    """What one backend holds at the moment of a scrape."""

    model: str
    #: Resident memory of its process and children; None for a remote backend.
    resident_bytes: int | None
    in_flight: int
    queued: int


class Metrics:
    """The gateway's metrics, on a registry of their own."""

    def __init__(self) -> None:
        registry = CollectorRegistry()
        self.registry = registry
        # The gateway's own memory, CPU and open files: hearth_process_*.
        ProcessCollector(namespace="hearth", registry=registry)
        self.requests = Counter(
            "hearth_requests",
            "HTTP requests answered, by route, model and status (499: the client left first).",
            ["route", "model", "status"],
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "hearth_time_to_first_token_seconds",
            "Streamed generations: seconds from the request's arrival to its first token "
            "(queue and load included).",
            ["model"],
            buckets=_TIME_TO_FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "hearth_inter_token_latency_seconds",
            "Streamed generations: seconds between two pieces of text.",
            ["model"],
            buckets=_INTER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "hearth_queue_seconds",
            "Seconds a request waited for one of its model's concurrency slots.",
            ["model"],
            buckets=_QUEUE_BUCKETS,
            registry=registry,
        )
        self.load_time = Histogram(
            "hearth_backend_load_seconds",
            "Seconds from starting a backend to its model serving (start, health, load).",
            ["model"],
            buckets=_LOAD_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "hearth_prompt_tokens",
            "Tokens read (prompts, embedding inputs), by model and API key name.",
            ["model", "key"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            "hearth_completion_tokens",
            "Tokens generated, by model and API key name.",
            ["model", "key"],
            registry=registry,
        )
        self.backend_exits = Counter(
            "hearth_backend_unexpected_exits",
            "Backend processes that ended without the gateway asking (a crash, the OOM "
            "killer); the model's next request starts it again.",
            ["model"],
            registry=registry,
        )
        self.start_failures = Counter(
            "hearth_backend_start_failures",
            "Backends that failed to start or load their model.",
            ["model"],
            registry=registry,
        )

    def watch_backends(self, sample: Callable[[], Iterable[BackendSample]]) -> None:
        """Report what `sample()` returns, read at each scrape."""
        self.registry.register(_BackendCollector(sample))

    def request_done(self, route: str, model: str, status: int) -> None:
        self.requests.labels(route, model, str(status)).inc()

    def tokens_used(self, model: str, prompt: int, completion: int) -> None:
        """Count a request's usage against `model` and the key of the current request."""
        key = identity.caller.get().name
        self.prompt_tokens.labels(model, key).inc(prompt)
        self.completion_tokens.labels(model, key).inc(completion)

    def stream_meter(self, model: str, began: float) -> StreamMeter:
        """A meter for one streamed generation of `model`, whose request arrived at `began`
        (time.monotonic())."""
        return StreamMeter(self, model, began)

    def exposition(self) -> bytes:
        """Every metric, in Prometheus' text format (media type `CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class StreamMeter:
    """Times one stream's pieces of text and counts its usage, as the pieces arrive."""

    def __init__(self, metrics: Metrics, model: str, began: float) -> None:
        self._metrics = metrics
        self._model = model
        self._began = began
        self._last: float | None = None
        # The labelled series, looked up once: `piece` runs for every token.
        self._first_token = metrics.time_to_first_token.labels(model)
        self._between_tokens = metrics.inter_token_latency.labels(model)

    def piece(self, item: pb.GenerateStreamResponse, arrived: float) -> None:
        """`item` came from the backend at `arrived` (time.monotonic())."""
        if item.text or item.tool_calls:
            if self._last is None:
                self._first_token.observe(arrived - self._began)
            else:
                self._between_tokens.observe(arrived - self._last)
            self._last = arrived
        if item.HasField("usage"):
            usage = item.usage
            self._metrics.tokens_used(self._model, usage.prompt_tokens, usage.completion_tokens)


class _BackendCollector(Collector):
    """The backends' state at the moment of the scrape, summed per model (a draining backend
    and its replacement are one model)."""

    def __init__(self, sample: Callable[[], Iterable[BackendSample]]) -> None:
        self._sample = sample

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        resident: dict[str, int] = {}
        in_flight: dict[str, int] = {}
        queued: dict[str, int] = {}
        for backend in self._sample():
            if backend.resident_bytes is not None:
                resident[backend.model] = resident.get(backend.model, 0) + backend.resident_bytes
            in_flight[backend.model] = in_flight.get(backend.model, 0) + backend.in_flight
            queued[backend.model] = queued.get(backend.model, 0) + backend.queued
        return list(self._families(resident, in_flight, queued))

    @staticmethod
    def _families(*values: dict[str, int]) -> Iterator[GaugeMetricFamily]:
        described = (
            ("hearth_backend_resident_memory_bytes", "Resident memory of each model's backend."),
            ("hearth_backend_requests_in_flight", "Requests each model's backend is serving."),
            ("hearth_backend_requests_queued", "Requests waiting for a slot, by model."),
        )
        for index, (name, text) in enumerate(described):
            family = GaugeMetricFamily(name, text, labels=["model"])
            if values:
                for model, value in sorted(values[index].items()):
                    family.add_metric([model], value)
            yield family
