"""The backend runtime on its own: a real echo process, driven over real gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1 import backend_pb2_grpc as pb_grpc
from tests.conftest import ROOT, Gateway, short_tempdir, wait_until


class Backend:
    def __init__(self, name: str = "echo", script: Path | None = None) -> None:
        self.socket = short_tempdir() / "b.sock"
        self.address = f"unix://{self.socket}"
        program = [str(script)] if script else ["-m", f"backends.{name}"]
        self.process = subprocess.Popen(
            [sys.executable, *program, "--address", self.address],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.channel = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(self.channel).result(timeout=20)
        self.lifecycle = pb_grpc.LifecycleStub(self.channel)
        self.text = pb_grpc.TextStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def status_of(self, service: str) -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return int(self.health.Check(request, timeout=5).status)


@pytest.fixture
def backend() -> Iterator[Backend]:
    running = Backend()
    yield running
    running.channel.close()
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()


def chat(text: str, **sampling: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content=text)]),
        sampling=pb.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


def test_health_reports_capabilities_only_once_loaded(backend: Backend) -> None:
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert backend.status_of("") == serving
    assert backend.status_of("hearth.backend.v1.Text") == not_serving
    with pytest.raises(grpc.RpcError) as caught:
        backend.status_of("hearth.backend.v1.Images")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # echo has no image code
    backend.lifecycle.Load(pb.LoadRequest(model_name="e"), timeout=10)
    assert backend.status_of("hearth.backend.v1.Text") == serving
    assert backend.status_of("hearth.backend.v1.Embeddings") == serving
    status = backend.lifecycle.Status(pb.StatusRequest(), timeout=5)
    assert status.state == pb.MODEL_STATE_READY
    assert status.memory_bytes > 1_000_000


def test_calls_before_load_fail_with_a_reason(backend: Backend) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        backend.text.Generate(chat("hi"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    trailing = dict(caught.value.trailing_metadata())
    assert trailing["hearth-error-reason"] == "model_not_loaded"


def test_backend_error_becomes_status_and_reason(backend: Backend) -> None:
    options = {"fail_code": "OUT_OF_RANGE", "fail_reason": "too_far", "fail_message": "nope"}
    request = pb.LoadRequest(model_name="e")
    request.options.update(options)
    backend.lifecycle.Load(request, timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        backend.text.Generate(chat("hi"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert caught.value.details() == "nope"
    assert dict(caught.value.trailing_metadata())["hearth-error-reason"] == "too_far"


def test_set_threads_is_capped_to_what_the_model_was_loaded_with(backend: Backend) -> None:
    loaded = backend.lifecycle.Load(pb.LoadRequest(model_name="e", threads=4), timeout=10)
    assert (loaded.threads, loaded.adjustable_threads) == (4, True)
    assert backend.lifecycle.SetThreads(pb.SetThreadsRequest(threads=2), timeout=5).threads == 2
    assert backend.lifecycle.Status(pb.StatusRequest(), timeout=5).threads == 2
    assert backend.lifecycle.SetThreads(pb.SetThreadsRequest(threads=64), timeout=5).threads == 4
    assert backend.lifecycle.SetThreads(pb.SetThreadsRequest(threads=0), timeout=5).threads == 1


def test_a_backend_that_cannot_change_its_threads_says_so() -> None:
    custom = Backend(script=ROOT / "tests" / "custom" / "reverse_backend.py")
    try:
        loaded = custom.lifecycle.Load(pb.LoadRequest(model_name="r", threads=3), timeout=10)
        assert (loaded.threads, loaded.adjustable_threads) == (3, False)
        with pytest.raises(grpc.RpcError) as caught:
            custom.lifecycle.SetThreads(pb.SetThreadsRequest(threads=1), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        custom.channel.close()
        custom.process.kill()
        custom.process.wait()


def test_sigterm_stops_gracefully(backend: Backend) -> None:
    backend.process.send_signal(signal.SIGTERM)
    assert backend.process.wait(timeout=15) == 0
    output = backend.process.stdout.read().decode()  # type: ignore[union-attr]
    assert "stopping" in output
    assert "Traceback" not in output


def test_a_backend_exits_when_its_parent_dies(tmp_path: Path) -> None:
    socket = short_tempdir() / "orphan.sock"
    pid_file = tmp_path / "pid"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-m', 'backends.echo', '--address', "
            f"'unix://{socket}'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(60)\n",
        ],
        cwd=ROOT,
    )
    assert wait_until(lambda: socket.exists(), timeout=20)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state == "Z"

    assert wait_until(gone, timeout=10)


def test_a_client_that_leaves_mid_stream_stops_the_generation(gateway: Gateway) -> None:
    words = " ".join(f"w{i}" for i in range(40))
    body = {"model": "echo-slow", "messages": [{"role": "user", "content": words}], "stream": True}
    started = time.monotonic()
    with (
        httpx.Client(base_url=gateway.url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        for index, _ in enumerate(response.iter_lines()):
            if index >= 6:
                break
    # 40 words at 200 ms would take 8 s; the backend must notice and stop long before.
    assert wait_until(lambda: "stream cancelled after" in gateway.log(), timeout=5)
    assert time.monotonic() - started < 6
    line = next(ln for ln in gateway.log().splitlines() if "stream cancelled after" in ln)
    assert "of 40 words" in line
