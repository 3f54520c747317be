"""Fixtures: real gateway processes on free ports, model dirs with echo, tiny and real models."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.tiny_models import (
    write_tiny_llama_gguf,
    write_tiny_stable_diffusion,
    write_tiny_transformers_llama,
    write_tiny_whisper,
)

ROOT = Path(__file__).resolve().parent.parent
#: Real models fetched from PyPI are kept here between runs (gitignored).
CACHE = ROOT / ".cache" / "test-models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_tempdir() -> Path:
    """Unix socket paths are limited to ~107 bytes: keep runtime dirs short."""
    return Path(tempfile.mkdtemp(prefix="ht-", dir="/tmp"))


class Gateway:
    """A real `hearth run` process."""

    def __init__(self, models_dir: Path, env: dict[str, str] | None = None) -> None:
        self.models_dir = models_dir
        self.runtime_dir = short_tempdir() / "run"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.runtime_dir.parent / "gateway.log"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Gateway:
        with self.log_path.open("wb") as log:
            command = [sys.executable, "-m", "gateway", "run", "--port", str(self.port)]
            command += ["--models-dir", str(self.models_dir)]
            command += ["--runtime-dir", str(self.runtime_dir)]
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **kwargs: object) -> openai.OpenAI:
        options: dict[str, object] = {
            "base_url": f"{self.url}/v1",
            "api_key": "unused",
            "max_retries": 0,
            "timeout": 60,
            "_strict_response_validation": True,
        }
        return openai.OpenAI(**{**options, **kwargs})  # type: ignore[arg-type]

    def backend_pids(self) -> list[int]:
        """Backend processes started by this gateway (their --address is in its runtime dir)."""
        return backend_pids(str(self.runtime_dir))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
        for pid in self.backend_pids():
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.runtime_dir.parent, ignore_errors=True)


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    """Gateways a test starts itself (several, or with settings of its own): stopped after."""
    started: list[Gateway] = []
    yield started
    for gateway in started:
        gateway.cleanup()


def hearth(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `hearth` command (as `python -m gateway`) and capture what it says."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


def processes_with(*markers: str) -> dict[int, str]:
    """Live processes (not this one, no zombies) whose command line holds every one of
    `markers`, with that command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if all(m in cmdline for m in markers) and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def backend_pids(marker: str) -> list[int]:
    return list(processes_with(marker, "--address"))


def wait_until(condition: object, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(condition())  # type: ignore[operator]


ECHO_MODELS = {
    "echo": "",
    "echo-slow": "options: {latency_ms: 200}",
    "echo-fail-before": (
        "options: {fail_code: INVALID_ARGUMENT, fail_reason: context_length_exceeded, "
        "fail_message: 'prompt too long for echo', fail_after_words: 0}"
    ),
    "echo-fail-mid": "options: {fail_code: INTERNAL, fail_after_words: 2}",
    "echo-crash-mid": "options: {exit_after_words: 2}",
    "echo-single": "max_concurrency: 1\nmax_queue: 0\noptions: {latency_ms: 300}",
    "echo-defaults": "parameters: {max_tokens: 2}\nsystem_prompt: 'be brief'",
}


def write_model(models_dir: Path, name: str, body: str) -> Path:
    path = models_dir / f"{name}.yaml"
    path.write_text(f"name: {name}\n{body}\n")
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_transformers_llama(tmp_path_factory.mktemp("hf") / "tiny-hf")


@pytest.fixture(scope="session")
def real_models() -> Path:
    """The default models, installed the way `make run` installs them (cached between runs)."""
    from gateway.gallery import install_named

    install_named(["smollm2-135m-instruct", "all-minilm-l6-v2", "whisper-base"], CACHE)
    return CACHE


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory, real_models: Path) -> Path:
    tokenizer = real_models / "whisper-base" / "tokenizer.json"
    return write_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-whisper", tokenizer)


def link_tree(source: Path, target: Path) -> None:
    """Hard-link (or copy) a model into a models dir: symlinks out of it are refused."""
    shutil.copytree(source, target, copy_function=_link_or_copy)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@pytest.fixture(scope="session")
def models_dir(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_gguf: Path,
    tiny_hf: Path,
    tiny_whisper: Path,
    tiny_sd: Path,
    real_models: Path,
) -> Path:
    directory = tmp_path_factory.mktemp("models")
    for name, extra in ECHO_MODELS.items():
        write_model(directory, name, f"backend: echo\n{extra}")
    shutil.copy(tiny_gguf, directory / "tiny-llama.gguf")
    tiny = "backend: llama\nmodel: tiny-llama.gguf\ncontext_size: 256"
    write_model(directory, "tiny-llama", tiny)
    write_model(directory, "tiny-llama-embed", f"{tiny}\nembeddings: true")
    write_tiny_llama_gguf(directory / "tiny-infill.gguf", infill=True)
    write_model(directory, "tiny-llama-infill", tiny.replace("tiny-llama.gguf", "tiny-infill.gguf"))
    template = "Q: {{ messages[-1]['content'] }}\\nA:"
    write_model(directory, "tiny-llama-template", f'{tiny}\nchat_template: "{template}"')
    link_tree(tiny_hf, directory / "tiny-hf")
    write_model(directory, "tiny-hf", "backend: transformers\nmodel: tiny-hf\nthreads: 1")
    link_tree(real_models / "all-minilm-l6-v2", directory / "all-minilm-l6-v2")
    minilm = "backend: transformers\nmodel: all-minilm-l6-v2\nembeddings: true"
    write_model(directory, "all-minilm-l6-v2", minilm)
    write_model(directory, "all-minilm-strict", f"{minilm}\noptions: {{truncate: false}}")
    link_tree(real_models / "whisper-base", directory / "whisper-base")
    write_model(directory, "whisper-base", "backend: whisper\nmodel: whisper-base")
    link_tree(tiny_whisper, directory / "tiny-whisper")
    write_model(
        directory,
        "tiny-whisper",
        "backend: whisper\nmodel: tiny-whisper\n"
        "options: {beam_size: 1, max_new_tokens: 8, temperature_fallback: false}",
    )
    link_tree(tiny_sd, directory / "tiny-sd")
    write_model(
        directory,
        "tiny-sd",
        "backend: diffusers\nmodel: tiny-sd\noptions: {steps: 2, max_size: 256}",
    )
    custom = ROOT / "tests" / "custom" / "reverse_backend.py"
    (directory / "backends.yaml").write_text(
        "backends:\n"
        f"  - name: reverse\n    command: ['{{python}}', '{custom}', '--address', '{{address}}']\n"
        "  - name: broken\n    command: ['{python}', '-c', "
        "'import sys; print(\"cannot find libfoo.so\", file=sys.stderr); sys.exit(3)']\n"
    )
    write_model(directory, "reverse", "backend: reverse")
    write_model(directory, "broken", "backend: broken")
    return directory


@pytest.fixture(scope="session")
def gateway(models_dir: Path) -> Iterator[Gateway]:
    running = Gateway(models_dir).start()
    yield running
    running.cleanup()


@pytest.fixture(scope="session")
def client(gateway: Gateway) -> openai.OpenAI:
    return gateway.client()


@pytest.fixture
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60) as session:
        yield session
