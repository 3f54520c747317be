"""GET /healthz (the process is up) and GET /readyz (it can serve requests)."""

from __future__ import annotations

from typing import Any

from litestar import get
from litestar.response import Response

from gateway.manager import BackendManager


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz")
async def readyz(manager: BackendManager) -> Response[dict[str, Any]]:
    catalog = await manager.registry.current()
    ready = manager.ready
    body = {
        "status": "ready" if ready else "not ready",
        "models": len(catalog.models),
        "loaded": sorted(manager.loaded()),
        "config_errors": catalog.errors,
    }
    return Response(body, status_code=200 if ready else 503)
