"""create_app: the one place that wires routes, lifespan, dependencies and error handlers."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Router
from litestar.datastructures import State
from litestar.di import Provide

from gateway.errors import BODY_LIMIT_SETTING, EXCEPTION_HANDLERS, OpenAIError
from gateway.gallery import Installer, gallery_path
from gateway.generated import GeneratedImages
from gateway.lifetime import lifetime_middleware
from gateway.manager import BackendManager
from gateway.routes.audio import AudioController
from gateway.routes.backends import BackendsController
from gateway.routes.chat import ChatController
from gateway.routes.completions import CompletionsController
from gateway.routes.embeddings import EmbeddingsController
from gateway.routes.gallery import GalleryController
from gateway.routes.health import healthz, readyz
from gateway.routes.images import ImagesController, generated_image
from gateway.routes.models import ModelsController
from gateway.routes.tokenize import TokenizeController
from gateway.settings import Settings

log = logging.getLogger("hearth")

_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# Image URLs are unguessable and short-lived: a browser or <img> tag can fetch them without a key.
_OPEN_PREFIXES = ("/generated/",)
_MULTIPART_SLACK_BYTES = 1024 * 1024  # the form's other fields and boundaries


def _manager(state: State) -> BackendManager:
    manager: BackendManager = state.manager
    return manager


def _installer(state: State) -> Installer:
    installer: Installer = state.installer
    return installer


def _generated(state: State) -> GeneratedImages:
    generated: GeneratedImages = state.generated
    return generated


def _authenticator(keys: tuple[str, ...]) -> Any:
    """A before_request hook that wants `Authorization: Bearer <key>` for one of `keys`."""
    encoded = [k.encode() for k in keys]

    async def authenticate(request: Request[Any, Any, Any]) -> None:
        path = request.url.path
        if path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        # Compare with every key, always, so timing says nothing about which one nearly matched.
        matched = False
        for key in encoded:
            matched |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not matched:
            raise OpenAIError(
                401,
                "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )

    return authenticate


def create_app(settings: Settings) -> Litestar:
    """The gateway's ASGI app; its lifespan owns the BackendManager."""

    @asynccontextmanager
    async def backends(app: Litestar) -> AsyncIterator[None]:
        manager = BackendManager(settings)
        log.info("%s", manager.budget.describe())
        await manager.start()
        generated = GeneratedImages.private(manager.runtime_dir, settings.image_ttl)
        generated.start()
        installer = Installer(settings.models_dir, gallery_path())
        app.state.manager = manager
        app.state.generated = generated
        app.state.installer = installer
        for name in settings.preload:
            manager.preload(name)
        try:
            yield
        finally:
            installer.close()
            await manager.close()
            generated.close()

    # Uploads may be larger than JSON bodies, on these routes only; the file-size check itself
    # (413 in OpenAI's shape) is the route's, this is the transport's backstop.
    audio = Router(
        path="/",
        route_handlers=[AudioController],
        request_max_body_size=settings.max_upload_bytes + _MULTIPART_SLACK_BYTES,
        opt={BODY_LIMIT_SETTING: "HEARTH_MAX_UPLOAD_BYTES"},  # what a 413 names
    )
    return Litestar(
        route_handlers=[
            audio,
            BackendsController,
            ChatController,
            CompletionsController,
            ImagesController,
            generated_image,
            GalleryController,
            EmbeddingsController,
            ModelsController,
            TokenizeController,
            healthz,
            readyz,
        ],
        lifespan=[backends],
        dependencies={
            "manager": Provide(_manager, sync_to_thread=False),
            "generated": Provide(_generated, sync_to_thread=False),
            "installer": Provide(_installer, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.max_body_bytes,  # JSON bodies: 413 past it
        middleware=[lifetime_middleware(settings.read_timeout)],
        before_request=_authenticator(settings.api_keys) if settings.api_keys else None,
        openapi_config=None,
        logging_config=None,  # `hearth run` configures logging once, for every logger
    )
