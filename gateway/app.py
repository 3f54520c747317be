"""create_app: the one place that wires routes, lifespan, dependencies and error handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Router
from litestar.datastructures import State
from litestar.di import Provide

from gateway import identity
from gateway.auth import SCOPE, KeyRing, Scope, admit, scope_of
from gateway.browser import BODY_TYPE, JSON, MULTIPART, browser_guard, check_content_type
from gateway.errors import BODY_LIMIT_SETTING, EXCEPTION_HANDLERS
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
from gateway.routes.metrics import prometheus_metrics
from gateway.routes.models import ModelsController
from gateway.routes.ollama import OllamaController, on_ollama_paths
from gateway.routes.rerank import RerankController
from gateway.routes.responses import ResponsesController
from gateway.routes.speech import SpeechController
from gateway.routes.system import SystemController
from gateway.routes.tokenize import TokenizeController
from gateway.routes.ui import root, root_head, ui_file, ui_session
from gateway.settings import Settings

log = logging.getLogger("hearth")

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


def _guard(ring: KeyRing) -> Any:
    """The before_request hook of every route: its key and scope, then its body's type. (A
    hook, not a Litestar guard: Litestar copies the route handler for every guard call. A
    router's own before_request would replace this one: tests/test_security.py checks that
    every route resolves to it.)"""

    async def guard(request: Request[Any, Any, Any]) -> None:
        handler = request.route_handler
        caller = admit(ring, scope_of(handler), request.headers)
        identity.caller.set(caller)
        expected = handler.opt.get(BODY_TYPE, JSON)
        check_content_type(request.method, request.headers, expected)

    return guard


def create_app(settings: Settings, ring: KeyRing | None = None) -> Litestar:
    """The gateway's ASGI app; its lifespan owns the BackendManager. `ring`: the keys, if
    already read from `settings`. ValueError: the keys settings are wrong."""
    ring = ring or KeyRing.from_settings(settings)
    if ring.enabled and not any(key.caller.admin for key in ring.keys):
        log.warning(
            "no admin key (HEARTH_ADMIN_KEYS, or scope: admin in the keys file): nobody can "
            "install, delete or unload models, or see /backends, over HTTP"
        )

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
        opt={BODY_LIMIT_SETTING: "HEARTH_MAX_UPLOAD_BYTES", BODY_TYPE: MULTIPART},
    )
    # Every route belongs to one scope: who may call it (gateway/auth.py). A route outside
    # these routers has none, and nobody may call it.
    inference = Router(
        path="/",
        route_handlers=[
            audio,
            ChatController,
            CompletionsController,
            EmbeddingsController,
            ImagesController,
            ModelsController,
            OllamaController,
            RerankController,
            ResponsesController,
            SpeechController,
            TokenizeController,
            ui_session,
        ],
        opt={SCOPE: Scope.INFERENCE},
    )
    admin = Router(
        path="/",
        route_handlers=[BackendsController, GalleryController, SystemController],
        opt={SCOPE: Scope.ADMIN},
    )
    # Health for probes; image URLs are unguessable and short-lived, so that an <img> tag can
    # fetch them without a key; the web UI's page and files, which ask for a key themselves
    # (and `/` is where Ollama's clients look for a server, unauthenticated as on Ollama).
    open_ = Router(
        path="/",
        route_handlers=[healthz, readyz, generated_image, root, root_head, ui_file],
        opt={SCOPE: Scope.OPEN},
    )
    metrics = Router(path="/", route_handlers=[prometheus_metrics], opt={SCOPE: Scope.METRICS})
    return Litestar(
        route_handlers=[inference, admin, open_, metrics],
        lifespan=[backends],
        dependencies={
            "manager": Provide(_manager, sync_to_thread=False),
            "generated": Provide(_generated, sync_to_thread=False),
            "installer": Provide(_installer, sync_to_thread=False),
        },
        exception_handlers=on_ollama_paths(EXCEPTION_HANDLERS),
        request_max_body_size=settings.max_body_bytes,  # JSON bodies: 413 past it
        middleware=[
            lifetime_middleware(settings.read_timeout),
            browser_guard(settings.allowed_hosts, settings.cors_origins),
        ],
        before_request=_guard(ring),
        openapi_config=None,
        logging_config=None,  # `hearth run` configures logging once, for every logger
    )
