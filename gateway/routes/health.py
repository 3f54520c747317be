"""GET /healthz (the process is up) and GET /readyz (it can serve requests)."""

from __future__ import annotations

from typing import Any

from litestar import get
from litestar.di import NamedDependency
from litestar.response import Response

from gateway import identity
from gateway.manager import BackendManager


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz")
async def readyz(manager: NamedDependency[BackendManager]) -> Response[dict[str, Any]]:
    ready = manager.ready
    body: dict[str, Any] = {"status": "ready" if ready else "not ready"}
    if identity.caller.get().admin:  # the rest names files and models: not for anyone
        catalog = await manager.registry.current()
        body["models"] = len(catalog.models)
        body["loaded"] = sorted(manager.loaded())
        body["config_errors"] = catalog.errors
    return Response(body, status_code=200 if ready else 503)
