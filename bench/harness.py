"""What the benchmarks share: a real `hearth run` gateway on a free port, over a models dir built
from hard links (symlinks out of a models dir are refused), and the gallery's entries."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.gallery import GalleryEntry, gallery_path, install_entry, load_gallery  # noqa: E402


def installed(name: str, models_dir: Path) -> GalleryEntry:
    """The gallery entry `name`, installed into `models_dir` (a no-op when it already is)."""
    entry = load_gallery(gallery_path()).get(name)
    assert entry is not None, f"no gallery entry {name}"
    install_entry(entry, models_dir)
    return entry


def link(source: Path, target: Path) -> None:
    """Hard-link a model file or directory into place, copying where links cannot go."""

    def one(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir():
        shutil.copytree(source, target, copy_function=one)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        one(str(source), str(target))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def scratch_models() -> Iterator[Path]:
    """A fresh, empty models dir, removed afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="hearth-bench-"))
    try:
        models = scratch / "models"
        models.mkdir()
        yield models
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def gateway(models: Path, env: dict[str, str] | None = None) -> Iterator[tuple[httpx.Client, int]]:
    """A `hearth run` on `models` (with `env` added): an HTTP client for it, and its pid."""
    port = free_port()
    log_path = models.parent / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "run",
                "--port",
                str(port),
                "--models-dir",
                str(models),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise SystemExit(
                            f"the gateway did not start:\n{log_path.read_text()}"
                        ) from None
                time.sleep(0.05)
            yield http, process.pid
    finally:
        process.terminate()
        process.wait(30)


def chat_pieces(http: httpx.Client, body: dict[str, object]) -> Iterator[str]:
    """Stream a chat completion; yield each piece of content as it arrives."""
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            content = choices[0]["delta"].get("content") if choices else None
            if content:
                yield content


def interleaved(rounds: int, modes: tuple[str, str]) -> Iterator[str]:
    """The modes in turns, swapping which goes first each round, so drift hits both alike."""
    for index in range(rounds):
        yield from modes if index % 2 == 0 else reversed(modes)
