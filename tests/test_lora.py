"""LoRA adapters: a model YAML's `lora`, and variants (`base:`) served by their base's process.

Echo gateways check the YAML rules and the routing in seconds (echo names the adapters it was
sent); the tiny llama GGUF with tiny GGUF LoRAs made here checks that llama.cpp applies them,
one process serving the base and two variants at once, each answering as it does alone.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import load_catalog
from gateway.gallery import InstallRefused, install_entry, load_gallery
from tests.conftest import Gateway, hearth, wait_until, write_model
from tests.tiny_models import write_tiny_lora_gguf


def chat(gateway: Gateway, model: str, text: str = "the water is", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60)


def answer(gateway: Gateway, model: str, **extra: Any) -> str:
    settings = {"temperature": 0, "max_tokens": 8, **extra}
    response = chat(gateway, model, **{k: v for k, v in settings.items() if v is not None})
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def backend_rows(gateway: Gateway) -> dict[str, dict[str, Any]]:
    view = httpx.get(f"{gateway.url}/backends", timeout=10).json()
    return {row["model"]: row for row in view["data"]}


# The YAML rules (no gateway) ------------------------------------------------------------------


@pytest.fixture
def adapters_dir(tmp_path: Path) -> Path:
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "adapters" / "peft-pickle").mkdir()
    (tmp_path / "adapters" / "peft-pickle" / "adapter_model.bin").write_bytes(b"x")
    (tmp_path / "adapters" / "peft").mkdir()
    (tmp_path / "adapters" / "peft" / "adapter_model.safetensors").write_bytes(b"x")
    write_model(tmp_path, "base", "backend: echo\nsystem_prompt: be brief")
    return tmp_path


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("base: base\nthreads: 2", "threads: a variant (base: base) runs in its base's process"),
        ("base: nowhere", "base: there is no model named 'nowhere'"),
        ("base: base\nlora: [{path: ../a.gguf}]", "lora[0].path: '../a.gguf' points outside"),
        ("base: base\nlora: [{path: adapters/b.gguf}]", "adapters/b.gguf does not exist"),
        ("base: base\nlora: [{path: adapters/peft-pickle}]", "without adapter_model.safetensors"),
        ("backend: whisper\nlora: [{path: adapters/a.gguf}]", "not whisper ones"),
        ("backend: echo\nlora: [{path: adapters/a.gguf, scale: 1000}]", "scale"),
        ("backend: echo\nembeddings: true\nlora: [{path: adapters/a.gguf}]", "takes none"),
        ("backend: transformers\nlora: [{path: adapters/a.gguf}]", "a transformers model takes"),
        ("backend: llama\nlora: [{path: adapters/peft}]", "a llama model takes a GGUF LoRA"),
    ],
)
def test_a_wrong_adapter_or_variant_yaml_is_an_error_naming_the_field(
    adapters_dir: Path, body: str, error: str
) -> None:
    write_model(adapters_dir, "variant", body)
    catalog = load_catalog(adapters_dir)
    assert "variant" not in catalog.models
    assert any("variant.yaml" in e and error in e for e in catalog.errors), catalog.errors
    assert "base" in catalog.models  # the base is not harmed by a broken variant


def test_a_variant_of_a_variant_is_refused(adapters_dir: Path) -> None:
    write_model(adapters_dir, "v1", "base: base\nlora: [{path: adapters/a.gguf}]")
    write_model(adapters_dir, "v2", "base: v1\nlora: [{path: adapters/a.gguf}]")
    catalog = load_catalog(adapters_dir)
    assert "v1" in catalog.models
    assert "v2" not in catalog.models
    assert any("'v1' is itself a variant" in e for e in catalog.errors)


def test_a_variant_takes_its_bases_settings_and_keeps_its_own_prompt_and_parameters(
    adapters_dir: Path,
) -> None:
    write_model(
        adapters_dir,
        "base2",
        "backend: echo\ncontext_size: 512\nparameters: {temperature: 0.3, max_tokens: 9}\n"
        "lora: [{path: adapters/a.gguf, scale: 0.5}]",
    )
    write_model(
        adapters_dir,
        "variant",
        "base: base2\nlora: [{path: adapters/a.gguf, scale: 2}]\nparameters: {max_tokens: 3}",
    )
    variant = load_catalog(adapters_dir).models["variant"]
    assert (variant.backend, variant.context_size) == ("echo", 512)
    assert [a.scale for a in variant.lora] == [0.5, 2.0]  # the base's adapter first
    assert variant.lora_paths == [str((adapters_dir / "adapters" / "a.gguf").resolve())] * 2
    assert (variant.parameters.temperature, variant.parameters.max_tokens) == (0.3, 3)
    listed = hearth("models", "list", "--models-dir", str(adapters_dir)).stdout
    assert "variant\techo\tvariant of base2\t-\tshares it" in listed.splitlines()


# Routing, on echo ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    models = tmp_path_factory.mktemp("lora-echo")
    (models / "adapters").mkdir()
    for name in ("formal.gguf", "pirate.gguf"):
        (models / "adapters" / name).write_bytes(b"GGUF")
    write_model(models, "assistant", "backend: echo")
    write_model(
        models,
        "assistant-formal",
        "base: assistant\nlora: [{path: adapters/formal.gguf}]\nsystem_prompt: Be formal.",
    )
    write_model(
        models,
        "assistant-pirate",
        "base: assistant\nlora: [{path: adapters/pirate.gguf, scale: 0.5}]\n"
        "parameters: {max_tokens: 3}",
    )
    write_model(models, "standalone", "backend: echo\nlora: [{path: adapters/formal.gguf}]")
    gateway = Gateway(models).start()
    yield gateway
    gateway.cleanup()


def test_variants_are_models_served_by_their_bases_one_process(echo_gateway: Gateway) -> None:
    listed = {m["id"] for m in httpx.get(f"{echo_gateway.url}/v1/models").json()["data"]}
    assert {"assistant", "assistant-formal", "assistant-pirate"} <= listed
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        names = ["assistant", "assistant-formal", "assistant-pirate"] * 2
        answers = list(pool.map(lambda n: answer(echo_gateway, n, max_tokens=None), names))
    assert answers[:3] == [
        "the water is",
        "[formal.gguf*1] the water is",
        "[pirate.gguf*0.5] the water",  # its own max_tokens: 3 echo words
    ]
    assert answers[3:] == answers[:3]
    rows = backend_rows(echo_gateway)
    assert "assistant" in rows
    assert "assistant-formal" not in rows
    assert "assistant-pirate" not in rows
    assert rows["assistant"]["variants"] == ["assistant-formal", "assistant-pirate"]
    assert len(echo_gateway.backend_pids()) == 1
    # A model of its own with adapters has its own process, and sends them the same way.
    assert answer(echo_gateway, "standalone") == "[formal.gguf*1] the water is"
    assert len(echo_gateway.backend_pids()) == 2


def test_an_adapter_deleted_after_the_yaml_was_read_is_a_404_naming_it(
    echo_gateway: Gateway,
) -> None:
    adapter = echo_gateway.models_dir / "adapters" / "pirate.gguf"
    kept = adapter.read_bytes()
    adapter.unlink()
    try:
        response = chat(echo_gateway, "assistant-pirate")
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["message"].startswith(
            "the LoRA adapter pirate.gguf this model names is missing"
        )
        assert str(echo_gateway.models_dir) not in error["message"]
        assert answer(echo_gateway, "assistant") == "the water is"
    finally:
        adapter.write_bytes(kept)


def test_unloading_a_variant_unloads_the_process_it_shares(echo_gateway: Gateway) -> None:
    answer(echo_gateway, "assistant-formal")
    response = httpx.post(
        f"{echo_gateway.url}/api/generate",
        json={"model": "assistant-pirate", "keep_alive": 0},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    rows = backend_rows(echo_gateway)
    assert rows.get("assistant", {}).get("state") != "ready"


# The gallery: an adapter for an installed base ------------------------------------------------


def test_the_gallery_installs_an_adapter_as_a_variant_of_an_installed_base(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    source = write_tiny_lora_gguf(tmp_path / "pirate.gguf")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    index = tmp_path / "index.yaml"
    index.write_text(
        "entries:\n"
        "  - name: tiny-pirate\n"
        "    base: tiny-llama\n"
        "    scale: 0.75\n"
        "    model: pirate.gguf\n"
        "    config: {system_prompt: Talk like a pirate.}\n"
        f"    files: [{{filename: pirate.gguf, sha256: {digest}, uri: 'file://{source}'}}]\n"
    )
    entry = load_gallery(index).get("tiny-pirate")
    assert entry is not None
    models = tmp_path / "models"
    models.mkdir()
    with pytest.raises(InstallRefused, match="install it first"):
        install_entry(entry, models)
    assert sorted(p.name for p in models.iterdir()) == []  # nothing written
    shutil.copy(tiny_gguf, models / "tiny-llama.gguf")
    write_model(models, "tiny-llama", "backend: llama\nmodel: tiny-llama.gguf")
    install_entry(entry, models)
    variant = load_catalog(models).models["tiny-pirate"]
    assert (variant.base, variant.backend, variant.model) == (
        "tiny-llama",
        "llama",
        "tiny-llama.gguf",
    )
    assert [(a.path, a.scale) for a in variant.lora] == [("tiny-pirate/pirate.gguf", 0.75)]
    assert variant.system_prompt == "Talk like a pirate."
    assert (models / "tiny-pirate" / "pirate.gguf").read_bytes() == source.read_bytes()


# llama.cpp applies them ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_gateway(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Gateway]:
    models = tmp_path_factory.mktemp("lora-llama")
    shutil.copy(tiny_gguf, models / "tiny.gguf")
    (models / "adapters").mkdir()
    write_tiny_lora_gguf(models / "adapters" / "a.gguf", seed=1, strength=2.0)
    write_tiny_lora_gguf(models / "adapters" / "b.gguf", seed=2, strength=2.0)
    # An adapter for a model twice as wide: llama.cpp refuses its shapes.
    write_tiny_lora_gguf(models / "adapters" / "wide.gguf", seed=3, width=128)
    base = "backend: llama\nmodel: tiny.gguf\ncontext_size: 256\nthreads: 1\nparallel: 4"
    write_model(models, "tiny", base)
    write_model(models, "tiny-a", "base: tiny\nlora: [{path: adapters/a.gguf}]")
    write_model(models, "tiny-b", "base: tiny\nlora: [{path: adapters/b.gguf}]")
    write_model(models, "tiny-a0", "base: tiny\nlora: [{path: adapters/a.gguf, scale: 0}]")
    write_model(models, "tiny-wide", "base: tiny\nlora: [{path: adapters/wide.gguf}]")
    write_model(models, "tiny-own-a", f"{base}\nlora: [{{path: adapters/a.gguf}}]")
    gateway = Gateway(models).start()
    yield gateway
    gateway.cleanup()


def test_a_lora_changes_the_answer_and_the_base_stays_as_it_was(llama_gateway: Gateway) -> None:
    before = answer(llama_gateway, "tiny")
    adapted = answer(llama_gateway, "tiny-a")
    assert adapted != before
    assert answer(llama_gateway, "tiny-b") not in (before, adapted)
    assert answer(llama_gateway, "tiny-a0") == before  # scale 0: the base itself
    assert answer(llama_gateway, "tiny") == before
    # A model of its own with the same adapter answers as the variant does.
    assert answer(llama_gateway, "tiny-own-a") == adapted


def test_two_variants_and_the_base_at_once_answer_as_they_do_alone(llama_gateway: Gateway) -> None:
    names = ["tiny", "tiny-a", "tiny-b"]
    # Long enough answers that requests sent at once are computed at once.
    alone = {name: answer(llama_gateway, name, max_tokens=150) for name in names}
    said = "generating for 3 adapter sets in one step"
    # Sent at once, they are computed together, not one after the other. Whether the three
    # meet in one step depends on when each arrives (on a busy machine one may finish before
    # the last is read): up to three rounds, every answer checked in each.
    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            # One of each (all in the engine's 4 slots at once), then more than the slots.
            together = [
                item
                for batch in (names, names * 3)
                for item in pool.map(lambda n: (n, answer(llama_gateway, n, max_tokens=150)), batch)
            ]
        assert all(text == alone[name] for name, text in together), (alone, together)
        if wait_until(lambda: said in llama_gateway.log(), timeout=2):
            break
    assert said in llama_gateway.log()
    rows = backend_rows(llama_gateway)
    assert rows["tiny"]["variants"] == ["tiny-a", "tiny-a0", "tiny-b", "tiny-wide"]
    assert "tiny-a" not in rows
    assert "tiny-b" not in rows


def test_an_adapter_for_another_model_is_a_400_and_the_base_serves_on(
    llama_gateway: Gateway,
) -> None:
    before = answer(llama_gateway, "tiny")
    response = chat(llama_gateway, "tiny-wide", max_tokens=4)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "adapter_invalid"
    assert "wide.gguf" in error["message"]
    assert answer(llama_gateway, "tiny") == before
    assert answer(llama_gateway, "tiny-a") != before


def test_an_adapter_file_replaced_in_place_is_read_again(llama_gateway: Gateway) -> None:
    adapters = llama_gateway.models_dir / "adapters"
    before, other = answer(llama_gateway, "tiny-a"), answer(llama_gateway, "tiny-b")
    kept = (adapters / "a.gguf").read_bytes()
    shutil.copy(adapters / "b.gguf", adapters / "a.new")
    (adapters / "a.new").replace(adapters / "a.gguf")  # as a retrained adapter is put in place
    try:
        assert answer(llama_gateway, "tiny-a") == other
    finally:
        (adapters / "a.new").write_bytes(kept)
        (adapters / "a.new").replace(adapters / "a.gguf")
    assert answer(llama_gateway, "tiny-a") == before


def test_a_variant_is_not_quantized_its_base_is(adapters_dir: Path) -> None:
    from gateway.convert.errors import ConvertRefused
    from gateway.convert.make import plan_quantize

    (adapters_dir / "base.gguf").write_bytes(b"GGUF")
    write_model(adapters_dir, "llama-base", "backend: llama\nmodel: base.gguf")
    write_model(adapters_dir, "variant", "base: llama-base\nlora: [{path: adapters/a.gguf}]")
    with pytest.raises(ConvertRefused, match="variant of llama-base") as refused:
        plan_quantize(adapters_dir, "variant", "q4_0")
    assert refused.value.param == "model"
