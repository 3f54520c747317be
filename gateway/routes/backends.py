"""GET /backends (what is loaded, like `ollama ps`) and POST /backends/{model}/unload."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get, post
from litestar.di import NamedDependency

from gateway.errors import OpenAIError
from gateway.manager import BackendManager


class BackendsController(Controller):
    path = "/backends"

    @get()
    async def list_backends(self, manager: NamedDependency[BackendManager]) -> dict[str, Any]:
        return manager.view()

    # A path parameter, so that model names with a slash ("org/model") work too.
    @post("/{target:path}", status_code=200)
    async def unload(self, target: str, manager: NamedDependency[BackendManager]) -> dict[str, Any]:
        """POST /backends/{model}/unload: unload a model now, or once the requests it is
        working on have ended."""
        name, slash, action = target.strip("/").rpartition("/")
        if not slash or action != "unload" or not name:
            raise OpenAIError(404, "Not found: this server has no such route.")
        if name not in manager.loaded():
            await manager.registry.resolve(name)  # an unknown model is a 404
        state = await manager.unload(name, drain=True)
        return {"object": "backend.unload", "model": name, "state": state}
