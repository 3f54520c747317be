"""Backends on the network: the gateway's token on every call, TLS, and custom commands that
die with the gateway. Real backend processes on loopback TCP ports, a real gateway."""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config import load_catalog
from tests.conftest import ROOT, Gateway, free_port, wait_until, write_model

TOKEN = "correct horse battery staple"
#: The name the test certificate is made for (the backend is reached at 127.0.0.1).
SERVER_NAME = "backend.hearth.test"


class RemoteBackend:
    """`python -m backends.echo --address 127.0.0.1:<port> ...`, its output in a file."""

    def __init__(self, directory: Path, *args: str, address: str | None = None) -> None:
        self.port = free_port()
        self.address = address or f"127.0.0.1:{self.port}"
        self.log_path = directory / f"backend-{self.port}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "backends.echo", "--address", self.address, *args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_listening(self) -> RemoteBackend:
        assert wait_until(self._listening, timeout=20), self.log()
        return self

    def _listening(self) -> bool:
        assert self.process.poll() is None, self.log()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def remotes() -> Iterator[list[RemoteBackend]]:
    started: list[RemoteBackend] = []
    yield started
    for remote in started:
        remote.stop()


def start_remote(remotes: list[RemoteBackend], directory: Path, *args: str) -> RemoteBackend:
    remote = RemoteBackend(directory, *args)
    remotes.append(remote)
    return remote.wait_listening()


def serve_remote(
    gateways: list[Gateway], models_dir: Path, entry: str, env: dict[str, str] | None = None
) -> Gateway:
    """A gateway whose model `far` is served by the remote backend `entry` describes."""
    (models_dir / "backends.yaml").write_text(f"backends:\n  - name: remote\n{entry}")
    write_model(models_dir, "far", "backend: remote")
    gateway = Gateway(models_dir, env=env)
    gateways.append(gateway)
    return gateway.start()


def ask(gateway: Gateway, prompt: str = "hello there") -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/completions", json={"model": "far", "prompt": prompt}, timeout=30
    )


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    (directory / "remote.token").write_text(TOKEN + "\n")
    return directory


@pytest.fixture
def backend_token(tmp_path: Path) -> Path:
    path = tmp_path / "backend.token"
    path.write_text(TOKEN)
    return path


@pytest.mark.parametrize(
    ("entry", "env"),
    [
        ("    token_file: remote.token\n", {}),
        ("    token_env: REMOTE_BACKEND_TOKEN\n", {"REMOTE_BACKEND_TOKEN": TOKEN}),
    ],
    ids=["token_file", "token_env"],
)
def test_the_gateway_sends_the_backend_its_token(
    tmp_path: Path,
    models_dir: Path,
    backend_token: Path,
    remotes: list[RemoteBackend],
    gateways: list[Gateway],
    entry: str,
    env: dict[str, str],
) -> None:
    remote = start_remote(remotes, tmp_path, "--token-file", str(backend_token))
    gateway = serve_remote(gateways, models_dir, f"    address: {remote.address}\n{entry}", env=env)
    answer = ask(gateway)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == "hello there"
    # A stream (another kind of call) carries it too.
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json={"model": "far", "messages": [{"role": "user", "content": "a b c"}], "stream": True},
        timeout=30,
    ) as stream:
        assert stream.status_code == 200
        body = "".join(stream.iter_text())
    assert '"content":" c"' in body
    assert body.rstrip().endswith("data: [DONE]")
    assert "refused" not in remote.log()


@pytest.mark.parametrize(
    "entry",
    ["    token_file: wrong.token\n", ""],
    ids=["wrong token", "no token"],
)
def test_a_refused_token_is_a_clear_error_and_the_backend_logs_it(
    tmp_path: Path,
    models_dir: Path,
    backend_token: Path,
    remotes: list[RemoteBackend],
    gateways: list[Gateway],
    entry: str,
) -> None:
    (models_dir / "wrong.token").write_text("not the token\n")
    remote = start_remote(remotes, tmp_path, "--token-file", str(backend_token))
    gateway = serve_remote(gateways, models_dir, f"    address: {remote.address}\n{entry}")
    started = time.monotonic()
    answer = ask(gateway)
    # At once: the first refused health check says it, no waiting out the start timeout.
    assert time.monotonic() - started < 10
    assert answer.status_code == 502, answer.text
    error = answer.json()["error"]
    assert error["code"] == "backend_unauthenticated"
    assert error["type"] == "server_error"
    assert "the remote backend for model 'far' refused the gateway's token" in error["message"]
    assert answer.headers["x-should-retry"] == "false"
    why = "wrong token" if entry else "no token was sent"
    assert wait_until(lambda: "refused a call to /grpc.health.v1.Health/Check" in remote.log())
    assert why in remote.log()
    assert TOKEN not in remote.log() + gateway.log()


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for SERVER_NAME and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = directory / "backend.crt", directory / "backend.key"
    command = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    command += ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2"]
    command += ["-subj", f"/CN={SERVER_NAME}", "-addext", f"subjectAltName=DNS:{SERVER_NAME}"]
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


def start_tls_remote(
    remotes: list[RemoteBackend], tmp_path: Path, token: Path
) -> tuple[Path, RemoteBackend]:
    """A remote backend that wants `token` and speaks TLS with a self-signed certificate: the
    certificate, and the backend."""
    cert, key = make_certificate(tmp_path)
    arguments = ("--token-file", str(token), "--tls-cert", str(cert), "--tls-key", str(key))
    return cert, start_remote(remotes, tmp_path, *arguments)


def test_tls_with_a_self_signed_certificate(
    tmp_path: Path,
    models_dir: Path,
    backend_token: Path,
    remotes: list[RemoteBackend],
    gateways: list[Gateway],
) -> None:
    cert, remote = start_tls_remote(remotes, tmp_path, backend_token)
    shutil.copy(cert, models_dir / "backend-ca.pem")
    assert "(token required, TLS)" in remote.log()
    entry = (
        f"    address: {remote.address}\n    token_file: remote.token\n"
        f"    tls: {{ca: backend-ca.pem, server_name: {SERVER_NAME}}}\n"
    )
    gateway = serve_remote(gateways, models_dir, entry)
    answer = ask(gateway)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == "hello there"


def test_a_tls_backend_is_not_reached_in_plaintext(
    tmp_path: Path,
    models_dir: Path,
    backend_token: Path,
    remotes: list[RemoteBackend],
    gateways: list[Gateway],
) -> None:
    _, remote = start_tls_remote(remotes, tmp_path, backend_token)
    entry = f"    address: {remote.address}\n    token_file: remote.token\n"
    gateway = serve_remote(gateways, models_dir, entry, env={"HEARTH_BACKEND_START_TIMEOUT": "2"})
    answer = ask(gateway)
    assert answer.status_code == 500, answer.text
    assert answer.json()["error"]["code"] == "backend_start_failed"
    assert "did not become healthy within 2 s" in answer.json()["error"]["message"]


def test_a_backend_refuses_to_listen_on_the_network_without_a_token(tmp_path: Path) -> None:
    remote = RemoteBackend(tmp_path, address=f"0.0.0.0:{free_port()}")
    try:
        assert remote.process.wait(20) != 0
    finally:
        remote.stop()
    assert "refusing to listen on 0.0.0.0" in remote.log()
    assert "--token-file" in remote.log()


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("command: [x]\n    token_file: t", "`token_file` is for `address` backends"),
        ("command: [x]\n    tls: true", "`tls` is for `address` backends"),
        (
            "address: 127.0.0.1:1\n    token_file: t\n    token_env: T",
            "give at most one of `token_file` or `token_env`",
        ),
        ("address: 127.0.0.1:1\n    tls: {ca: a.pem, servername: x}", "tls.servername"),
        ("address: 127.0.0.1:1\n    token_env: 'NOT A NAME'", "token_env"),
        ("address: 127.0.0.1:1\n    token_env: T\n    tls: {ca: a.pem}", None),
    ],
    ids=[
        "token on a command",
        "tls on a command",
        "two tokens",
        "unknown tls key",
        "bad name",
        "ok",
    ],
)
def test_token_and_tls_settings_are_checked(
    tmp_path: Path, entry: str, problem: str | None
) -> None:
    (tmp_path / "backends.yaml").write_text(f"backends:\n  - name: mine\n    {entry}\n")
    catalog = load_catalog(tmp_path)
    if problem is None:
        assert catalog.errors == []
        tls = catalog.backends["mine"].remote_tls()
        assert tls is not None
        assert tls.ca == "a.pem"
    else:
        assert catalog.backends == {}
        assert problem in catalog.errors[0]


@pytest.mark.parametrize(
    ("entry", "warning"),
    [
        ("address: 192.0.2.7:50051", "has no token (token_file or token_env): anyone who can"),
        ("address: gpu-box:50051\n    token_env: T", "has a token but no tls: the token travels"),
        ("address: '[2001:db8::7]:50051'\n    token_file: t\n    tls: true", None),
        ("address: 127.0.0.1:50051", None),
        ("address: unix:///run/backend.sock", None),
    ],
    ids=["no token", "no tls", "token and tls", "loopback", "unix socket"],
)
def test_a_backend_open_to_the_network_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, entry: str, warning: str | None
) -> None:
    (tmp_path / "backends.yaml").write_text(f"backends:\n  - name: far\n    {entry}\n")
    with caplog.at_level(logging.WARNING, logger="hearth.config"):
        catalog = load_catalog(tmp_path)
    assert catalog.errors == []
    assert "far" in catalog.backends  # a warning, not a refusal
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warning is None:
        assert warnings == []
    else:
        [message] = warnings
        assert "backend 'far'" in message
        assert warning in message


def test_local_backends_do_not_get_a_remote_backends_token_variable(
    tmp_path: Path, gateways: list[Gateway]
) -> None:
    secret = "gpu-box-secret-3f9a"
    (tmp_path / "backends.yaml").write_text(
        "backends:\n"
        f"  - name: remote\n    address: 127.0.0.1:{free_port()}\n    token_env: GPU_BOX_TOKEN\n"
        "  - name: mine\n    command: ['{python}', '"
        + str(ROOT / "tests/custom/reverse_backend.py")
        + "', '--address', '{address}']\n"
    )
    write_model(tmp_path, "echo", "backend: echo")
    write_model(tmp_path, "mine", "backend: mine")
    gateway = Gateway(tmp_path, env={"GPU_BOX_TOKEN": secret})
    gateways.append(gateway)
    gateway.start()
    for model in ("echo", "mine"):
        answer = httpx.post(
            f"{gateway.url}/v1/completions", json={"model": model, "prompt": "hi"}, timeout=30
        )
        assert answer.status_code == 200, answer.text
    pids = gateway.backend_pids()
    assert len(pids) == 2
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"GPU_BOX_TOKEN" not in environ
        assert secret.encode() not in environ
    # The gateway itself still has it, for the remote backend.
    assert gateway.process is not None
    assert secret.encode() in Path(f"/proc/{gateway.process.pid}/environ").read_bytes()


@pytest.mark.parametrize(
    "command",
    [
        # A program that runs the runtime's serve() itself: nothing of its own watches the
        # gateway.
        "['{python}', '" + str(ROOT / "tests/custom/unwatched_backend.py") + "', "
        "'--address', '{address}']",
        # A wrapper shell that starts the backend as its child (and stays): the shell is what
        # the gateway starts.
        "['sh', '-c', '\"$0\" "
        + str(ROOT / "tests/custom/reverse_backend.py")
        + " --address \"$1\"; echo backend ended', '{python}', '{address}']",
        # A wrapper shell that ignores SIGTERM: only SIGKILL ends it (and then its backend,
        # which watches its parent, the shell).
        "['sh', '-c', 'trap \"\" TERM; \"$0\" "
        + str(ROOT / "tests/custom/reverse_backend.py")
        + " --address \"$1\"; echo backend ended', '{python}', '{address}']",
    ],
    ids=["serve() without a parent watch", "behind a wrapper shell", "ignoring SIGTERM"],
)
def test_a_custom_command_dies_with_a_killed_gateway(
    tmp_path: Path, gateways: list[Gateway], command: str
) -> None:
    (tmp_path / "backends.yaml").write_text(f"backends:\n  - name: mine\n    command: {command}\n")
    write_model(tmp_path, "mine", "backend: mine")
    gateway = Gateway(tmp_path)
    gateways.append(gateway)
    gateway.start()
    answer = httpx.post(
        f"{gateway.url}/v1/completions", json={"model": "mine", "prompt": "abc"}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == "cba"
    backends = gateway.backend_pids()
    assert backends
    gateway.stop(signal.SIGKILL)
    assert wait_until(lambda: gateway.backend_pids() == [], timeout=5), backends


async def test_a_backend_without_status_is_asked_the_standard_health_check() -> None:
    """A backend of someone else's, built from the proto without Hearth's runtime, may leave
    Lifecycle.Status unimplemented: its health is then the standard gRPC health service's."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from gateway.client import BackendClient, backend_channel
    from protos.hearth.backend.v1 import backend_pb2_grpc as pb_grpc

    server = grpc.aio.server()
    pb_grpc.add_LifecycleServicer_to_server(pb_grpc.LifecycleServicer(), server)  # UNIMPLEMENTED
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = BackendClient(backend_channel(f"127.0.0.1:{port}"), "far", 10)
    try:
        await checker.set("", health_pb2.HealthCheckResponse.SERVING)
        assert await client.serves(1.0) is True
        await checker.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await client.serves(1.0) is None
        assert client.last_health_failure == "not serving"
    finally:
        await client.channel.close()
        await server.stop(0)
