"""GET /metrics: every metric of gateway/metrics.py, for Prometheus to scrape."""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency

from gateway.manager import BackendManager
from gateway.metrics import CONTENT_TYPE


@get("/metrics")
async def prometheus_metrics(manager: NamedDependency[BackendManager]) -> Response[bytes]:
    """The metrics in Prometheus' text format (read on the event loop: the collectors read the
    manager's state)."""
    # As a header: given as media_type, Litestar would add a second charset to it.
    return Response(manager.metrics.exposition(), headers={"content-type": CONTENT_TYPE})
