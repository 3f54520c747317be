"""The gallery over HTTP: what can be installed, install jobs, removing a model, and jobs that
make new models from installed ones (quantize, convert)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.response import Response

from gateway.config import ConfigError, resolve_model_path
from gateway.convert.errors import (
    ConvertError,
    ConverterUnavailable,
    ConvertRefused,
    NameTaken,
    SourceNotFound,
)
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


class MakeModelRequest(msgspec.Struct):
    """POST /models/jobs: quantize an installed llama model, or convert a Hugging Face folder
    of the models dir to GGUF, or a PEFT LoRA adapter folder to a GGUF LoRA variant of `base`;
    `name` names the new model (default: source-type; an adapter: its folder's name)."""

    type: Literal["quantize", "convert"]
    #: quantize: the model, and the llama.cpp type to make.
    model: str | None = None
    quantization: str | None = None
    #: convert: the folder, relative to the models dir, and the converter's output type.
    source: str | None = None
    outtype: str = "f16"
    name: str | None = None
    #: convert, an adapter: the llama model it applies to, the folder (relative to the models
    #: dir) of the Hugging Face model it was trained on (default: the adapter's
    #: base_model_name_or_path, if it is one there), and the variant's scale.
    base: str | None = None
    base_config: str | None = None
    scale: float | None = None


def _missing(param: str, kind: str) -> OpenAIError:
    return OpenAIError(400, f"a {kind} job needs `{param}`", param=param, code="missing_param")


def _plan(body: MakeModelRequest, models_dir: Path) -> Any:
    """The job's plan, checked (blocking: reads the models dir); ConvertError if refused."""
    from gateway.convert.make import plan_convert, plan_convert_lora, plan_quantize

    if body.type == "quantize":
        if not body.model:
            raise _missing("model", "quantize")
        if not body.quantization:
            raise _missing("quantization", "quantize")
        return plan_quantize(models_dir, body.model, body.quantization, body.name)
    if not body.source:
        raise _missing("source", "convert")
    source = _inside(models_dir, body.source, "source")
    if body.base is None:
        for param, value in (("base_config", body.base_config), ("scale", body.scale)):
            if value is not None:
                raise OpenAIError(
                    400,
                    f"`{param}` is for converting a LoRA adapter, with `base`",
                    param=param,
                    code="invalid_value",
                )
        return plan_convert(models_dir, source, body.outtype, body.name, confined=True)
    base_config = _inside(models_dir, body.base_config, "base_config") if body.base_config else None
    return plan_convert_lora(
        models_dir,
        source,
        body.base,
        base_config=base_config,
        outtype=body.outtype,
        name=body.name,
        scale=1.0 if body.scale is None else body.scale,
        confined=True,
    )


def _inside(models_dir: Path, relative: str, param: str) -> Path:
    try:
        return resolve_model_path(models_dir, relative)
    except ValueError as exc:
        raise OpenAIError(400, f"{param}: {exc}", param=param, code="invalid_path") from None


def _refusal(exc: ConvertError) -> OpenAIError:
    """A planning failure as the HTTP error a client sees."""
    if isinstance(exc, SourceNotFound):
        return OpenAIError(404, str(exc), param=exc.param, code="model_not_found")
    if isinstance(exc, NameTaken):
        return OpenAIError(409, str(exc), param="name", code="name_taken", retry=False)
    if isinstance(exc, ConvertRefused):
        return OpenAIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, ConverterUnavailable):
        return OpenAIError(503, str(exc), code="converter_unavailable", retry=False)
    return OpenAIError(500, str(exc), code="make_failed")


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

    @post("/jobs", status_code=200)
    async def make(
        self, request: Request[Any, Any, Any], installer: NamedDependency[Installer]
    ) -> dict[str, Any]:
        """Start a quantize or convert job (MakeModelRequest); the job's view. Refused at once
        (400, 404 or 409, nothing touched) if it cannot be carried out as asked."""
        body = decode_body(await request.body(), MakeModelRequest)
        try:
            plan = await asyncio.to_thread(_plan, body, installer.models_dir)
            job = await installer.make(plan)
        except ConvertError as exc:
            raise _refusal(exc) from None
        return job.view()

    @get("/jobs")
    async def jobs(self, installer: NamedDependency[Installer]) -> dict[str, Any]:
        """Every job of this gateway's life (installs, quantizations, conversions), oldest first."""
        ordered = sorted(installer.jobs.values(), key=lambda j: j.created)
        return {"object": "list", "data": [job.view() for job in ordered]}

    @get("/jobs/{job_id:str}")
    async def job(self, job_id: str, installer: NamedDependency[Installer]) -> dict[str, Any]:
        job = installer.jobs.get(job_id)
        if job is None:
            raise OpenAIError(404, f"no job '{job_id}'", code="job_not_found")
        return job.view()

    @delete("/jobs/{job_id:str}", status_code=200)
    async def cancel(self, job_id: str, installer: NamedDependency[Installer]) -> dict[str, Any]:
        job = installer.jobs.get(job_id)
        if job is None:
            raise OpenAIError(404, f"no job '{job_id}'", code="job_not_found")
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
