"""GET /v1/models and GET /v1/models/{id}."""

from __future__ import annotations

import os

from litestar import Controller, get

from gateway.config import ModelConfig
from gateway.manager import BackendManager
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
    async def list_models(self, manager: BackendManager) -> ModelList:
        models = (await manager.registry.current()).models.values()
        return ModelList(data=[_model(c) for c in sorted(models, key=lambda c: c.name)])

    @get("/{model_id:path}")
    async def retrieve(self, model_id: str, manager: BackendManager) -> Model:
        return _model(await manager.registry.resolve(model_id.lstrip("/")))
