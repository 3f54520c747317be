"""The web UI: the page at `/` for browsers, its files under `/ui/`, and `GET /ui/session`.

`/` is also where Ollama's clients look for a server ("Ollama is running"): a request that
accepts HTML (a browser) gets the page, any other the text, so both keep working.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, get, head
from litestar.di import NamedDependency
from litestar.response import Response

from gateway import identity, ui
from gateway.errors import OpenAIError
from gateway.manager import BackendManager

_OLLAMA_ROOT = "Ollama is running"


def _asset(request: Request[Any, Any, Any], name: str) -> Response[bytes]:
    asset = ui.assets().get(name)
    if asset is None:
        raise OpenAIError(404, f"the web UI has no file '{name}'", code="not_found")
    headers = {**ui.HEADERS, "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(b"", status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


def _wants_html(request: Request[Any, Any, Any]) -> bool:
    return "text/html" in request.headers.get("accept", "")


@get("/", media_type="text/plain")
async def root(request: Request[Any, Any, Any]) -> Response[Any]:
    """The web UI for a browser; "Ollama is running" for Ollama's clients, which probe here."""
    response: Response[Any]
    if _wants_html(request):
        response = _asset(request, "index.html")
    else:
        response = Response(_OLLAMA_ROOT, media_type="text/plain")
    response.headers["Vary"] = "Accept"
    return response


@head("/", media_type="text/plain")
async def root_head() -> None:
    return None


@get("/ui/{name:str}")
async def ui_file(request: Request[Any, Any, Any], name: str) -> Response[bytes]:
    """A script, style or icon of the web UI (no key: they hold nothing private)."""
    return _asset(request, name)


@get("/ui/session")
async def ui_session(manager: NamedDependency[BackendManager]) -> dict[str, Any]:
    """What the page shows this key: whether it is an admin's, and the models it may use,
    with what each does (the page's pickers: chat, transcription, image)."""
    caller = identity.caller.get()
    catalog = await manager.registry.current()
    models = [
        {
            "id": config.name,
            "kind": config.kind(),
            "backend": config.backend,
            "description": config.description,
        }
        for name, config in sorted(catalog.models.items())
        if caller.may_use(name)
    ]
    return {"admin": caller.admin, "keys": caller is not identity.LOCAL, "models": models}
