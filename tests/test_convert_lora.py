"""Converting PEFT LoRA adapters to GGUF LoRAs (`hearth models convert ADAPTER --base MODEL`).

A LoRA made here with peft on test_convert's tiny Hugging Face llama (q, k, v and o projections:
q and k are the rows llama.cpp's converter permutes) is converted against a GGUF of that same
model, and served as a variant whose greedy answer through llama.cpp is the PEFT model's in
transformers, token for token. Then a convert job, what is refused (nothing left behind), and a
converter cache from before the LoRA converter was kept.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import Gateway, hearth, write_model
from tests.test_convert import ENV, entries, wait_for, write_tiny_spm_llama
from tests.tiny_models import write_tiny_transformers_llama

pytestmark = pytest.mark.llama

ADMIN_KEY = "convert-lora-test-admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
#: A raw completion prompt of the tiny model's words.
PROMPT = "the water of the day"
TOKENS = 8
#: The projections the adapter trains: q and k are permuted by the converter.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def write_peft_lora(
    directory: Path, model: Any, *, seed: int = 1, strength: float = 0.15, **settings: Any
) -> Path:
    """A PEFT LoRA of `model` (a transformers model) on TARGETS, saved as safetensors, its B
    matrices random (PEFT starts them at zero) and strong enough to change greedy output."""
    import torch
    from peft import LoraConfig, get_peft_model

    settings = {"r": 4, "lora_alpha": 8, **settings}
    config = LoraConfig(target_modules=TARGETS, lora_dropout=0.0, **settings)
    adapted = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * strength)
    adapted.save_pretrained(directory, safe_serialization=True)
    return directory


def write_other_peft_lora(directory: Path) -> Path:
    """A PEFT LoRA of a llama of other widths (48 wide, not 64): for another base model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=400,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return write_peft_lora(directory, LlamaForCausalLM(config))


def edit_adapter_config(source: Path, directory: Path, **changes: Any) -> Path:
    """A copy of the adapter `source` with adapter_config.json changed."""
    shutil.copytree(source, directory)
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return directory


def tiny_source_model(models: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(models / "tiny-source", dtype=torch.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir: the tiny HF llama (SentencePiece), its f32 GGUF `tiny-base`, a PEFT LoRA
    of it, and the folders the refusals are made of."""
    directory = tmp_path_factory.mktemp("convert-lora-models")
    bpe = write_tiny_transformers_llama(tmp_path_factory.mktemp("bpe") / "tiny-bpe")
    write_tiny_spm_llama(directory / "tiny-source", bpe)
    # f32, as transformers computes: the comparison with PEFT is of the adapter alone.
    args = ("--outtype", "f32", "--name", "tiny-base", "--models-dir", str(directory))
    base = hearth("models", "convert", str(directory / "tiny-source"), *args, env=ENV)
    assert base.returncode == 0, base.stderr
    adapter = write_peft_lora(directory / "tiny-adapter", tiny_source_model(directory))
    # rsLoRA scales by alpha / sqrt(r), where llama.cpp scales by alpha / r.
    rslora = {"r": 16, "lora_alpha": 8, "use_rslora": True, "seed": 3}
    write_peft_lora(directory / "rs-adapter", tiny_source_model(directory), **rslora)
    write_other_peft_lora(directory / "other-adapter")
    pickled = directory / "pickled-adapter"
    pickled.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle
    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
    edit_adapter_config(adapter, directory / "hub-adapter", base_model_name_or_path=hub)
    edit_adapter_config(adapter, directory / "dora-adapter", use_dora=True)
    (directory / "wide-config").mkdir()
    config = json.loads((directory / "tiny-source" / "config.json").read_text())
    (directory / "wide-config" / "config.json").write_text(
        json.dumps({**config, "hidden_size": 96})
    )
    write_model(directory, "echo", "backend: echo")
    return directory


@pytest.fixture(scope="module")
def converted(models: Path) -> Any:
    """`hearth models convert` of the adapter as the variant tiny-lora of tiny-base."""
    args = ("--base", "tiny-base", "--base-config", str(models / "tiny-source"))
    args += ("--name", "tiny-lora", "--models-dir", str(models))
    return hearth("models", "convert", str(models / "tiny-adapter"), *args, env=ENV)


@pytest.fixture(scope="module")
def gateway(models: Path) -> Iterator[Gateway]:
    running = Gateway(models, env={**ENV, "HEARTH_ADMIN_KEYS": ADMIN_KEY}).start()
    yield running
    running.cleanup()


@pytest.fixture
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers=ADMIN, timeout=120) as client:
        yield client


def complete(http: httpx.Client, model: str) -> dict[str, Any]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
    answer = http.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def peft_text(http: httpx.Client, models: Path, adapter: str, scale: float = 1.0) -> str:
    """The PEFT model's greedy continuation of PROMPT in transformers (the adapter applied at
    `scale`), from the prompt tokens llama.cpp reads, as text in the GGUF's vocabulary."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora.layer import LoraLayer

    content = {"model": "tiny-base", "content": PROMPT, "add_special": True}
    prompt = http.post("/v1/tokenize", json=content).json()["tokens"]
    model = PeftModel.from_pretrained(tiny_source_model(models), models / adapter)
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            layer.scale_layer(scale)
    with torch.no_grad():
        made = model.generate(
            torch.tensor([prompt]), max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False
        )
    tokens = made[0, len(prompt) :].tolist()
    return str(
        http.post("/v1/detokenize", json={"model": "tiny-base", "tokens": tokens}).json()["content"]
    )


def test_the_cli_adds_the_adapter_as_a_variant_of_its_base(converted: Any, models: Path) -> None:
    assert converted.returncode == 0, converted.stderr
    assert "tiny-lora: it applies to tiny-base and answers " in converted.stdout
    assert "as a variant of tiny-base" in converted.stdout
    config = yaml.safe_load((models / "tiny-lora.yaml").read_text())
    assert {k: config[k] for k in ("name", "base", "lora")} == {
        "name": "tiny-lora",
        "base": "tiny-base",
        "lora": [{"path": "tiny-lora/tiny-lora.gguf", "scale": 1.0}],
    }
    from gguf import GGMLQuantizationType, GGUFReader

    lora = GGUFReader(models / "tiny-lora" / "tiny-lora.gguf")
    assert lora.get_field("adapter.type").contents() == "lora"  # type: ignore[union-attr]
    names = {t.name for t in lora.tensors}
    assert {"blk.0.attn_q.weight.lora_a", "blk.1.attn_k.weight.lora_b"} <= names
    assert {t.tensor_type for t in lora.tensors} == {GGMLQuantizationType.F16}  # the default
    assert (models / "tiny-lora" / ".hearth-manifest.json").is_file()


def test_the_variant_answers_as_the_peft_model_does_in_transformers(
    converted: Any, models: Path, http: httpx.Client
) -> None:
    assert converted.returncode == 0, converted.stderr
    base, variant = complete(http, "tiny-base"), complete(http, "tiny-lora")
    text = variant["choices"][0]["text"]
    assert variant["usage"]["completion_tokens"] == TOKENS
    assert text != base["choices"][0]["text"]  # the adapter changes the answer
    # One process serves both.
    rows = {row["model"]: row for row in http.get("/backends").json()["data"]}
    assert set(rows) == {"tiny-base"}
    assert rows["tiny-base"]["variants"] == ["tiny-lora"]
    # Token for token the PEFT model's answer: q and k rows were permuted as in the base.
    assert text == peft_text(http, models, "tiny-adapter")


def test_a_convert_job_makes_a_variant_that_remove_deletes(
    models: Path, http: httpx.Client
) -> None:
    before = entries(models)
    # No base_config: the adapter's base_model_name_or_path is tiny-source, in the models dir.
    body = {"type": "convert", "source": "rs-adapter", "base": "tiny-base", "scale": 0.5}
    started = http.post("/models/jobs", json=body)
    assert started.status_code == 200, started.text
    job = started.json()
    assert (job["object"], job["model"], job["base"]) == (
        "model.convert", "rs-adapter-lora", "tiny-base"
    )  # fmt: skip
    done = wait_for(http, job["id"])[-1]
    assert done["phase"] == "done", done
    assert done["result"]["base"] == "tiny-base"
    assert done["result"]["check"]["tokens"] > 0
    assert done["result"]["check"]["base_answer"]
    assert entries(models) - before == {"rs-adapter-lora", "rs-adapter-lora.yaml"}
    config = yaml.safe_load((models / "rs-adapter-lora.yaml").read_text())
    assert config["lora"] == [{"path": "rs-adapter-lora/rs-adapter-lora.gguf", "scale": 0.5}]
    # rsLoRA's scale carried over, and the variant's scale applied: PEFT's answer at 0.5.
    answer = complete(http, "rs-adapter-lora")
    assert answer["choices"][0]["text"] == peft_text(http, models, "rs-adapter", scale=0.5)
    removed = hearth("models", "remove", "rs-adapter-lora", "--models-dir", str(models))
    assert removed.returncode == 0, removed.stderr
    assert entries(models) == before


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"source": "pickled-adapter"}, 400, "source", "adapter_model.bin, a pickle"),
        ({"source": "dora-adapter"}, 400, "source", "DoRA"),
        ({"base": "echo"}, 400, "base", "applies to llama models"),
        ({"base": "nope"}, 404, "base", "no model named 'nope'"),
        ({"source": "hub-adapter"}, 400, "base_config", "'HuggingFaceTB/SmolLM2-135M-Instruct'"),
        ({"base_config": "../outside"}, 400, "base_config", "outside"),
        ({"base_config": "wide-config"}, 400, "base_config", "hidden_size is 96"),
        ({"base": None}, 400, "base", "PEFT LoRA adapter"),
        ({"source": "tiny-source", "base": None, "scale": 0.5}, 400, "scale", "with `base`"),
        ({"scale": 1000}, 400, "scale", "out of range"),
        ({"name": "tiny-base"}, 409, "name", "tiny-base"),
    ],
)
def test_a_lora_job_that_cannot_be_done_is_refused_at_once(
    models: Path, http: httpx.Client, body: dict, status: int, param: str, words: str
) -> None:
    before = entries(models)
    request = {"type": "convert", "source": "tiny-adapter", "base": "tiny-base", **body}
    refused = http.post("/models/jobs", json={k: v for k, v in request.items() if v is not None})
    assert refused.status_code == status, refused.text
    error = refused.json()["error"]
    assert (error["param"], words in error["message"]) == (param, True), error
    assert entries(models) == before


def test_the_cli_refuses_with_nothing_left(models: Path) -> None:
    args = ("--base", "tiny-base", "--models-dir", str(models))
    before = entries(models)
    # No config of the base to be had: it says what to give.
    hub = hearth("models", "convert", str(models / "hub-adapter"), *args, env=ENV)
    assert hub.returncode == 1
    assert hub.stderr.startswith("error: the converter needs the base model's Hugging Face ")
    assert "Give --base-config DIR" in hub.stderr
    # An adapter for another model: converted, then refused by llama.cpp, which says why.
    config = ("--base-config", str(models / "tiny-source"))
    other = hearth("models", "convert", str(models / "other-adapter"), *args, *config, env=ENV)
    assert other.returncode == 1
    # Named after its folder, which is in the models dir already: other-adapter-lora.
    assert "error: other-adapter-lora was not made: llama.cpp cannot apply the LoRA to the " in (
        other.stderr
    )
    assert "shape" in other.stderr  # llama.cpp's own reason
    assert "Traceback" not in hub.stderr + other.stderr
    assert entries(models) == before  # nor a staging folder


def test_a_converter_cache_without_the_lora_converter_is_completed(tmp_path: Path) -> None:
    """A cache kept before LoRA conversion (the HF converter only) gets the LoRA converter
    from the same source release, and keeps the files it had."""
    from gateway.convert.converter import LORA_SCRIPT, SCRIPT, install_converter

    files = {
        SCRIPT: "new hf converter",
        LORA_SCRIPT: "lora converter",
        "conversion/__init__.py": "new",
        "gguf-py/gguf/__init__.py": "new",
        "tools/other.py": "not kept",
    }
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(f"llama_cpp_python-0.3.36/vendor/llama.cpp/{name}")
            member.size, member.mtime = len(data), int(time.time())
            archive.addfile(member, io.BytesIO(data))
    cache = tmp_path / "llama.cpp-0.3.36"
    (cache / "gguf-py" / "gguf").mkdir(parents=True)
    (cache / SCRIPT).write_text("old hf converter")
    (cache / "gguf-py" / "gguf" / "__init__.py").write_text("old")
    install_converter(sdist, cache, tmp_path / "scratch")
    assert (cache / LORA_SCRIPT).read_text() == "lora converter"
    assert (cache / "conversion" / "__init__.py").read_text() == "new"
    assert (cache / SCRIPT).read_text() == "old hf converter"  # a conversion may be reading it
    assert not (cache / "tools").exists()
    # A fresh cache is the extracted tree itself.
    install_converter(sdist, tmp_path / "fresh", tmp_path / "scratch-2")
    assert (tmp_path / "fresh" / SCRIPT).read_text() == "new hf converter"
