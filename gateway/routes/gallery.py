"""The gallery over HTTP: what can be installed, install jobs, and removing a model."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.response import Response

from gateway.config import ConfigError
from gateway.errors import OpenAIError
from gateway.gallery import (
    GalleryIndex,
    Installer,
    InstallRefused,
    NotInstalledError,
    RemovalRefused,
    entry_footprint,
    is_installed,
    plan_removal,
)
from gateway.manager import BackendManager
from gateway.manager.footprint import fit
from gateway.routes.common import decode_body


class ApplyRequest(msgspec.Struct):
    id: str


async def _index(installer: NamedDependency[Installer]) -> GalleryIndex:
    try:
        return await installer.load_index()
    except ConfigError as exc:
        raise OpenAIError(
            500, f"the gallery index is broken: {exc}", code="gallery_invalid"
        ) from None


class GalleryController(Controller):
    path = "/models"

    @get("/available")
    async def available(
        self, installer: NamedDependency[Installer], manager: NamedDependency[BackendManager]
    ) -> dict[str, Any]:
        """The gallery, and whether each model is installed and fits this machine's memory;
        `errors` says which entries of the index were left out, and why."""
        index = await _index(installer)
        budget = manager.budget.memory_bytes

        def describe() -> list[dict[str, Any]]:  # reads model headers: off the event loop
            return [
                {
                    "id": entry.name,
                    "description": entry.description,
                    "license": entry.license,
                    "tags": entry.tags,
                    "backend": entry.config.get("backend"),
                    "verified": entry.verified,
                    "installed": is_installed(entry, installer.models_dir),
                    "download_bytes": entry.download_bytes(),
                    **fit(entry_footprint(entry, installer.models_dir, manager.footprints), budget),
                }
                for entry in index.entries
            ]

        return {
            "object": "list",
            "data": await asyncio.to_thread(describe),
            "budget": {"memory_bytes": budget, "memory_from": manager.budget.memory_from},
            "errors": index.errors,
        }

    @post("/apply", status_code=200)
    async def apply(
        self, request: Request[Any, Any, Any], installer: NamedDependency[Installer]
    ) -> dict[str, Any]:
        body = decode_body(await request.body(), ApplyRequest)
        name = body.id.removeprefix("gallery@")
        index = await _index(installer)
        entry = index.get(name)
        if entry is None and name in index.rejected:
            raise OpenAIError(
                400,
                f"the gallery entry '{name}' is invalid, so it cannot be installed: "
                f"{index.rejected[name]}",
                param="id",
                code="gallery_entry_invalid",
            )
        if entry is None:
            raise OpenAIError(
                404,
                f"the gallery has no model '{name}'; GET /models/available lists them",
                param="id",
                code="model_not_found",
            )
        try:
            job = await installer.apply(entry)
        except InstallRefused as exc:
            # Sending it again changes nothing: tell OpenAI's SDKs not to retry their 409.
            raise OpenAIError(
                409, str(exc), param="id", code="install_refused", retry=False
            ) from None
        return job.view()

    @get("/jobs/{job_id:str}")
    async def job(self, job_id: str, installer: NamedDependency[Installer]) -> dict[str, Any]:
        job = installer.jobs.get(job_id)
        if job is None:
            raise OpenAIError(404, f"no install job '{job_id}'", code="job_not_found")
        return job.view()

    @delete("/jobs/{job_id:str}", status_code=200)
    async def cancel(self, job_id: str, installer: NamedDependency[Installer]) -> dict[str, Any]:
        job = installer.jobs.get(job_id)
        if job is None:
            raise OpenAIError(404, f"no install job '{job_id}'", code="job_not_found")
        job.cancel.set()
        return job.view()

    @delete("/{name:str}", status_code=200)
    async def remove(
        self,
        name: str,
        installer: NamedDependency[Installer],
        manager: NamedDependency[BackendManager],
    ) -> Response[dict[str, Any]]:
        """Delete a model's YAML and the files its install wrote (what was kept, and why, is
        in `kept`); 409 if that could delete what is not the model's."""
        try:
            # Reads every YAML of the models dir: not on the event loop.
            plan = await asyncio.to_thread(plan_removal, name, installer.models_dir)
        except NotInstalledError as exc:
            raise OpenAIError(404, str(exc), param="name", code="model_not_found") from None
        except RemovalRefused as exc:
            raise OpenAIError(
                409, str(exc), param="name", code="removal_refused", retry=False
            ) from None
        await manager.unload(name)
        removal = await asyncio.to_thread(plan.carry_out)
        return Response({"id": name, "object": "model", "deleted": True, **removal.view()})
