"""/v1/models wire types."""

from __future__ import annotations

import msgspec


class Model(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "hearth"
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[Model]
    object: str = "list"
