"""Model YAML: errors name the file and the field; model paths never leave the models dir."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from gateway.config import (
    Catalog,
    ConfigError,
    load_catalog,
    load_model_file,
    parse_duration,
    resolve_model_path,
)
from gateway.errors import OpenAIError
from gateway.manager.registry import ModelRegistry


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_a_good_file_decodes_with_defaults(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"x")
    path = write(
        tmp_path,
        "m.yaml",
        "name: m\nbackend: llama\nmodel: m.gguf\nparameters: {temperature: 0.5}\nkeep_alive: 15m\n",
    )
    config = load_model_file(path, tmp_path)
    assert config.name == "m"
    assert config.parameters.temperature == 0.5
    assert config.max_concurrency is None  # the backend's word at load, else 1
    assert config.keep_alive_seconds() == 900
    assert config.source == str(path)


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("name: m\nbackend: llama\nthreads: many\n", "threads", "expected `int"),
        ("name: m\nbackend: llama\ncontext_sise: 4096\n", "context_sise", "unknown field"),
        ("backend: llama\n", "name", "required"),
        ("name: m\nbackend: llama\nparameters: {temperature: 7}\n", "parameters.temperature", "<="),
        ("name: m\nbackend: llama\nparameters: {colour: red}\n", "parameters.colour", "unknown"),
        ("name: m\nbackend: llama\nkeep_alive: soon\n", "keep_alive", "not a keep_alive"),
        ("name: m\nbackend: transformers\nembeddings: true\nrerank: true\n", "rerank", "both"),
        ("name: m\nbackend: echo\nplacement: cloud\n", "placement", "none of `local`"),
        ("name: m\nbackend: echo\nplacement: {}\n", "placement", "exactly one of"),
        (
            "name: m\nbackend: echo\nplacement: {static: {addresses: []}}\n",
            "placement.static.addresses",
            "length >= 1",
        ),
        (
            "name: m\nbackend: echo\nreplicas: 3\nplacement: {static: {addresses: [a:1, b:1]}}\n",
            "replicas",
            "lists 2 address(es): one per replica",
        ),
        (
            "name: m\nbackend: echo\nplacement: {static: {addresses: [a:1, a:1]}}\n",
            "placement.static",
            "an address of its own",
        ),
        (
            "name: m\nbackend: echo\nplacement: {ray: {max_restarts: -1}}\n",
            "placement.ray.max_restarts",
            ">= 0",
        ),
        ("name: m\nbackend: echo\nplacement: {ray: {memory: lots}}\n", "placement.ray", "size"),
        ("name: m\nbackend: echo\nreplicas: 0\n", "replicas", ">= 1"),
    ],
)
def test_errors_name_the_file_and_the_field(
    tmp_path: Path, text: str, field: str, words: str
) -> None:
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_model_file(path, tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {field}:"), message
    assert words in message


def test_invalid_yaml_is_reported_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_model_file(path, tmp_path)


@pytest.mark.parametrize("model", ["../secret.gguf", "/etc/passwd", "a/../../secret.gguf"])
def test_model_paths_cannot_escape(tmp_path: Path, model: str) -> None:
    models = tmp_path / "models"
    models.mkdir()
    path = write(models, "m.yaml", f"name: m\nbackend: llama\nmodel: '{model}'\n")
    with pytest.raises(ConfigError, match="model:"):
        load_model_file(path, models)


def test_a_symlink_out_of_the_models_dir_is_rejected(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "outside.gguf").write_bytes(b"x")
    os.symlink(tmp_path / "outside.gguf", models / "link.gguf")
    with pytest.raises(ValueError, match="outside the models dir"):
        resolve_model_path(models, "link.gguf")


def test_a_nested_path_inside_is_fine(tmp_path: Path) -> None:
    assert resolve_model_path(tmp_path, "sub/m.gguf") == (tmp_path / "sub" / "m.gguf").resolve()


def test_one_broken_file_does_not_hide_the_others(tmp_path: Path) -> None:
    write(tmp_path, "good.yaml", "name: good\nbackend: echo\n")
    write(tmp_path, "bad.yaml", "name: bad\nbackend: echo\nthreads: -1\n")
    write(tmp_path, "dup.yaml", "name: good\nbackend: echo\n")
    write(tmp_path, "ghost.yaml", "name: ghost\nbackend: nowhere\n")
    catalog = load_catalog(tmp_path)
    assert list(catalog.models) == ["good"]
    errors = "\n".join(catalog.errors)
    assert "bad.yaml: threads:" in errors
    assert "name 'good' is already used by" in errors  # dup.yaml and good.yaml: one wins
    assert "ghost.yaml: backend: unknown backend 'nowhere'" in errors


def test_custom_backends_need_exactly_one_of_command_or_address(tmp_path: Path) -> None:
    write(
        tmp_path,
        "backends.yaml",
        "backends:\n  - name: both\n    command: [x]\n    address: localhost:1\n",
    )
    catalog = load_catalog(tmp_path)
    assert catalog.backends == {}
    assert "exactly one of `command` or `address`" in catalog.errors[0]


def test_placement_and_replicas(tmp_path: Path) -> None:
    static = "placement: {static: {addresses: [10.0.0.2:50051, 10.0.0.3:50051]}}"
    write(tmp_path, "far.yaml", f"name: far\nbackend: echo\n{static}\n")
    write(tmp_path, "near.yaml", "name: near\nbackend: echo\nreplicas: 3\n")
    write(tmp_path, "ray.yaml", "name: ray\nbackend: echo\nplacement: {ray: {num_gpus: 1}}\n")
    # A backends.yaml address is one backend: it cannot be replicated.
    write(tmp_path, "backends.yaml", "backends:\n  - {name: box, address: 10.0.0.9:50051}\n")
    write(tmp_path, "boxed.yaml", "name: boxed\nbackend: box\nreplicas: 2\n")
    catalog = load_catalog(tmp_path)
    far, near, ray = catalog.models["far"], catalog.models["near"], catalog.models["ray"]
    assert (far.placement_kind(), far.replica_count()) == ("static", 2)
    assert (near.placement_kind(), near.replica_count()) == ("local", 3)
    assert (ray.placement_kind(), ray.replica_count()) == ("ray", 1)
    assert "boxed" not in catalog.models
    assert any("one backend at 10.0.0.9:50051" in error for error in catalog.errors)


def test_custom_backends_are_registered(tmp_path: Path) -> None:
    write(tmp_path, "backends.yaml", "backends:\n  - name: mine\n    address: 127.0.0.1:5000\n")
    write(tmp_path, "m.yaml", "name: m\nbackend: mine\n")
    catalog = load_catalog(tmp_path)
    assert catalog.errors == []
    assert catalog.backends["mine"].address == "127.0.0.1:5000"
    assert catalog.models["m"].backend == "mine"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("30s", 30), ("15m", 900), ("2h", 7200), ("500ms", 0.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


async def test_the_registry_picks_up_a_new_model_file_on_the_next_request(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    write(tmp_path, "first.yaml", "name: first\nbackend: echo\n")
    assert (await registry.resolve("first")).backend == "echo"
    with pytest.raises(OpenAIError) as caught:
        await registry.resolve("second")
    assert caught.value.status == 404
    write(tmp_path, "second.yaml", "name: second\nbackend: echo\n")
    assert (await registry.resolve("second")).name == "second"
    assert sorted((await registry.current()).models) == ["first", "second"]


async def test_callers_at_the_same_time_share_one_read_of_the_models_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[Path] = []

    def counted(models_dir: Path) -> Catalog:
        reads.append(models_dir)
        return load_catalog(models_dir)

    monkeypatch.setattr("gateway.manager.registry.load_catalog", counted)
    write(tmp_path, "m.yaml", "name: m\nbackend: echo\n")
    registry = ModelRegistry(tmp_path)
    catalogs = await asyncio.gather(*(registry.current() for _ in range(5)))
    assert len(reads) == 1
    assert all(c is catalogs[0] for c in catalogs)
    await registry.current()  # nothing changed: nothing read again
    assert len(reads) == 1
