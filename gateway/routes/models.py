"""GET /v1/models and GET /v1/models/{id}."""

from __future__ import annotations

import os
from typing import Any

from litestar import Controller, Request, get
from litestar.di import NamedDependency

from gateway import identity
from gateway.config import ModelConfig
from gateway.manager import BackendManager
from gateway.routes.common import resolve_model
from gateway.schemas.models import Model, ModelList


def _model(config: ModelConfig) -> Model:
    try:
        created = int(os.stat(config.source).st_mtime)
    except OSError:
        created = 0
    return Model(id=config.name, created=created)


class ModelsController(Controller):
    path = "/v1/models"

    @get()
    async def list_models(self, manager: NamedDependency[BackendManager]) -> ModelList:
        caller = identity.caller.get()
        models = (await manager.registry.current()).models.values()
        allowed = [c for c in models if caller.may_use(c.name)]  # a limited key sees its own
        return ModelList(data=[_model(c) for c in sorted(allowed, key=lambda c: c.name)])

    @get("/{model_id:path}")
    async def retrieve(
        self,
        request: Request[Any, Any, Any],
        model_id: str,
        manager: NamedDependency[BackendManager],
    ) -> Model:
        return _model(await resolve_model(request, manager, model_id.lstrip("/")))
