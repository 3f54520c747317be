"""Backend processes come and go with the gateway: shared loads, idle unloads, no orphans."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, Gateway, free_port, wait_until, write_model


@pytest.fixture
def lifecycle_models(tmp_path: Path) -> Path:
    write_model(tmp_path, "a", "backend: echo")
    write_model(tmp_path, "b", "backend: echo")
    write_model(tmp_path, "slow-load", "backend: echo\noptions: {load_delay_ms: 700}")
    write_model(tmp_path, "brief", "backend: echo\nkeep_alive: 1s")
    return tmp_path


@pytest.fixture
def fresh_gateway(lifecycle_models: Path) -> Gateway:
    gateway = Gateway(lifecycle_models).start()
    yield gateway  # type: ignore[misc]
    gateway.cleanup()


def ask(gateway: Gateway, model: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/completions", json={"model": model, "prompt": "hi"}, timeout=30
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_the_gateway_stops_every_backend(fresh_gateway: Gateway, sig: int) -> None:
    assert ask(fresh_gateway, "a").status_code == 200
    assert ask(fresh_gateway, "b").status_code == 200
    assert len(fresh_gateway.backend_pids()) == 2
    # uvicorn re-raises the signal after a clean shutdown, as a shell expects.
    assert fresh_gateway.stop(sig) in (0, -sig)
    assert "Application shutdown complete" in fresh_gateway.log()
    assert fresh_gateway.backend_pids() == []


def test_a_killed_gateway_leaves_no_backend_behind(fresh_gateway: Gateway) -> None:
    assert ask(fresh_gateway, "a").status_code == 200
    assert len(fresh_gateway.backend_pids()) == 1
    fresh_gateway.stop(signal.SIGKILL)
    assert wait_until(lambda: fresh_gateway.backend_pids() == [], timeout=10)


def test_concurrent_first_requests_share_one_load(fresh_gateway: Gateway) -> None:
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: ask(fresh_gateway, "slow-load").status_code, range(6)))
    assert codes == [200] * 6
    assert len(fresh_gateway.backend_pids()) == 1
    assert fresh_gateway.log().count("starting echo backend for slow-load") == 1


def test_keep_alive_ends_an_idle_backend_and_the_next_request_reloads(
    fresh_gateway: Gateway,
) -> None:
    assert ask(fresh_gateway, "brief").status_code == 200
    assert len(fresh_gateway.backend_pids()) == 1
    assert wait_until(lambda: fresh_gateway.backend_pids() == [], timeout=10)
    assert "unloading brief" in fresh_gateway.log()
    assert ask(fresh_gateway, "brief").status_code == 200


def test_models_added_while_running_are_served(
    fresh_gateway: Gateway, lifecycle_models: Path
) -> None:
    assert ask(fresh_gateway, "late").status_code == 404
    write_model(lifecycle_models, "late", "backend: echo")
    assert ask(fresh_gateway, "late").status_code == 200


def test_api_keys_are_required_when_set(lifecycle_models: Path) -> None:
    gateway = Gateway(lifecycle_models, env={"HEARTH_API_KEYS": "k1,k2"}).start()
    try:
        url = f"{gateway.url}/v1/models"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(url, headers={"authorization": "Bearer k2"}).status_code == 200
        denied = httpx.get(url, headers={"authorization": "Bearer k3"}).json()["error"]
        assert denied["type"] == "authentication_error"
        assert denied["code"] == "invalid_api_key"
        assert httpx.get(f"{gateway.url}/healthz").status_code == 200
    finally:
        gateway.cleanup()


def start_remote(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests/custom/reverse_backend.py"),
            "--address",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert wait_until(lambda: _listening(port), timeout=20)
    return process


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_remote_backend_is_served_and_reloaded_after_it_restarts(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "backends.yaml").write_text(
        f"backends:\n  - name: remote\n    address: 127.0.0.1:{port}\n"
    )
    write_model(tmp_path, "far", "backend: remote")
    remote = start_remote(port)
    gateway = Gateway(tmp_path).start()
    try:
        assert ask(gateway, "far").json()["choices"][0]["text"] == "ih"
        remote.kill()
        remote.wait()
        remote = start_remote(port)  # a fresh process: no model loaded
        answer = ask(gateway, "far")
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == "ih"
    finally:
        gateway.cleanup()
        remote.kill()
        remote.wait()
