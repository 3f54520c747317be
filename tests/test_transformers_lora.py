"""LoRA adapters on the Transformers backend: PEFT adapter folders made here for the tiny random
Llama, served as variants (`base:`) of one model by its one process, and as a model of its own.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, link_tree, write_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def write_peft_lora(model: Any, directory: Path, *, seed: int, kind: str = "lora") -> Path:
    """A PEFT adapter for `model` (safetensors), its update matrices random and strong enough
    to change what greedy decoding picks."""
    import torch
    from peft import IA3Config, LoraConfig, get_peft_model

    config = (
        IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"])
        if kind == "ia3"
        else LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    )
    adapted = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name or "ia3_l" in name:  # lora_B starts at zero: no change at all
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    adapted.save_pretrained(directory, safe_serialization=True)
    return directory


def tiny_model(directory: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory)


def wide_model() -> Any:
    """A Llama twice as wide as the tiny one: its adapters have other shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def lora_gateway(tmp_path_factory: pytest.TempPathFactory, tiny_hf: Path) -> Iterator[Gateway]:
    models = tmp_path_factory.mktemp("lora-hf")
    link_tree(tiny_hf, models / "tiny-hf")
    adapters = models / "adapters"
    write_peft_lora(tiny_model(tiny_hf), adapters / "a", seed=1)
    write_peft_lora(tiny_model(tiny_hf), adapters / "b", seed=2)
    write_peft_lora(tiny_model(tiny_hf), adapters / "ia3", seed=3, kind="ia3")
    write_peft_lora(wide_model(), adapters / "wide", seed=4)
    pickled = adapters / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(
        (adapters / "a" / "adapter_config.json").read_text()
    )
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")

    base = "backend: transformers\nmodel: tiny-hf\nthreads: 1"
    write_model(models, "tiny-hf", base)
    variants = {
        "tiny-hf-a": "[{path: adapters/a}]",
        "tiny-hf-b": "[{path: adapters/b, scale: 0.5}]",
        "tiny-hf-ab": "[{path: adapters/a}, {path: adapters/b, scale: 0.5}]",
        "tiny-hf-a0": "[{path: adapters/a, scale: 0}]",
        "tiny-hf-wide": "[{path: adapters/wide}]",
        "tiny-hf-ia3": "[{path: adapters/ia3}]",
        "tiny-hf-pickled": "[{path: adapters/pickled}]",
    }
    for name, lora in variants.items():
        write_model(models, name, f"base: tiny-hf\nlora: {lora}")
    write_model(models, "own-a", f"{base}\nlora: [{{path: adapters/a}}]")
    # Three prompts at once fill a batch of three; one alone waits a second for company.
    write_model(models, "batch", f"{base}\nparallel: 3\noptions: {{batch_window_ms: 1000}}")
    write_model(models, "batch-a", "base: batch\nlora: [{path: adapters/a}]")
    write_model(models, "batch-b", "base: batch\nlora: [{path: adapters/b, scale: 0.5}]")
    gateway = Gateway(models).start()
    try:
        # Start the three processes at once (no adapter loaded in tiny-hf's yet).
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda model: answer(gateway, model), ["tiny-hf", "own-a", "batch-a"]))
        yield gateway
    finally:
        gateway.cleanup()


def chat(gateway: Gateway, model: str, text: str) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": 8,
    }
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60)


def answer(gateway: Gateway, model: str, text: str = "the water is") -> str:
    response = chat(gateway, model, text)
    assert response.status_code == 200, response.text
    body = response.json()
    # The tiny model never prefers its end token: every answer has all its tokens.
    assert body["usage"]["completion_tokens"] == 8, body
    return str(body["choices"][0]["message"]["content"])


def test_an_adapter_changes_the_answer_and_the_base_stays_as_it_was(lora_gateway: Gateway) -> None:
    before = answer(lora_gateway, "tiny-hf")  # no adapter loaded in its process yet
    adapted = answer(lora_gateway, "tiny-hf-a")
    assert adapted != before
    other = answer(lora_gateway, "tiny-hf-b")
    assert other not in (before, adapted)
    assert answer(lora_gateway, "tiny-hf-ab") not in (before, adapted, other)  # both apply
    assert answer(lora_gateway, "tiny-hf-a0") == before  # scale 0: the base itself
    assert answer(lora_gateway, "tiny-hf") == before
    # A model of its own, in a process of its own, with the same adapter answers the same.
    assert answer(lora_gateway, "own-a") == adapted


def test_the_base_and_two_variants_share_one_batch_and_answer_as_they_do_alone(
    lora_gateway: Gateway,
) -> None:
    asks = [("batch", "the water is"), ("batch-a", "hello there"), ("batch-b", "what time is it")]
    alone = [answer(lora_gateway, model, text) for model, text in asks]
    start = len(lora_gateway.log())
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(lambda ask: answer(lora_gateway, *ask), asks))
    assert together == alone
    log = lora_gateway.log()[start:]
    assert "generating 3 prompts together" in log, log
    assert "2 with LoRA adapters" in log, log
    assert alone[0] == answer(lora_gateway, "tiny-hf")  # the same weights, another process

    view = httpx.get(f"{lora_gateway.url}/backends", timeout=10).json()
    rows = {row["model"]: row for row in view["data"]}
    assert rows["batch"]["variants"] == ["batch-a", "batch-b"]
    assert "batch-a" not in rows
    assert "batch-b" not in rows
    listed = {m["id"] for m in httpx.get(f"{lora_gateway.url}/v1/models").json()["data"]}
    assert {"batch", "batch-a", "batch-b"} <= listed


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("tiny-hf-wide", "the LoRA adapter wide does not fit this model"),
        ("tiny-hf-ia3", "the LoRA adapter ia3 is not a LoRA: its adapter_config.json says"),
    ],
)
def test_an_adapter_that_cannot_apply_is_a_400_naming_it_and_the_base_serves_on(
    lora_gateway: Gateway, model: str, problem: str
) -> None:
    before = answer(lora_gateway, "tiny-hf")
    response = chat(lora_gateway, model, "the water is")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "adapter_invalid"
    assert problem in error["message"]
    assert answer(lora_gateway, "tiny-hf") == before
    assert answer(lora_gateway, "tiny-hf-a") != before


def test_an_adapter_with_pickled_weights_is_never_served(lora_gateway: Gateway) -> None:
    listed = {m["id"] for m in httpx.get(f"{lora_gateway.url}/v1/models").json()["data"]}
    assert "tiny-hf-pickled" not in listed
    assert "tiny-hf" in listed
    ready = httpx.get(f"{lora_gateway.url}/readyz", timeout=10).json()
    assert any(
        "tiny-hf-pickled.yaml" in e and "without adapter_model.safetensors" in e
        for e in ready["config_errors"]
    ), ready
    response = chat(lora_gateway, "tiny-hf-pickled", "the water is")
    assert response.status_code == 404, response.text
