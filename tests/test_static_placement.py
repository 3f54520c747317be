"""A model with two replicas at static addresses, each backend on a "host" of its own: a network
namespace on this machine, joined to ours by a veth pair, so the gateway reaches each over a
real (non-loopback) network link, with the token. The backends are started by the test, as
Kubernetes or compose would: the gateway only loads the model into them and routes to them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Gateway, wait_until, write_model
from tests.test_remote_backends import SERVER_NAME, make_certificate

TOKEN = "tea for two and two for tea"
PORT = 50051
#: Health checks every half second (half the interval), each given half a second.
HEALTH_INTERVAL = 1.0


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


class Host:
    """A network namespace with one address, reached from ours over a veth pair."""

    def __init__(self, index: int) -> None:
        tag = f"{os.getpid() % 100000}{index}"
        self.namespace = f"hearth-test-{tag}"
        self.outer, self.inner = f"ht{tag}o", f"ht{tag}i"
        # A /30 per host, in a range this machine does not use; the pid keeps parallel runs apart.
        base = 4 * (index + 2 * (os.getpid() % 32))
        self.gateway_ip = f"10.231.{os.getpid() % 250}.{base + 1}"
        self.ip = f"10.231.{os.getpid() % 250}.{base + 2}"
        self.processes: list[subprocess.Popen[bytes]] = []

    def create(self) -> None:
        steps = [
            ["netns", "add", self.namespace],
            ["link", "add", self.outer, "type", "veth", "peer", "name", self.inner],
            ["link", "set", self.inner, "netns", self.namespace],
            ["addr", "add", f"{self.gateway_ip}/30", "dev", self.outer],
            ["link", "set", self.outer, "up"],
            ["-n", self.namespace, "addr", "add", f"{self.ip}/30", "dev", self.inner],
            ["-n", self.namespace, "link", "set", self.inner, "up"],
            ["-n", self.namespace, "link", "set", "lo", "up"],
        ]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                raise OSError(f"ip {' '.join(step)}: {done.stderr.strip()}")

    def start_backend(
        self, token_file: Path, log_path: Path, port: int = PORT, *extra: str
    ) -> Backend:
        """`python -m backends.echo` listening on this host's address (its pid is the
        backend's: `ip netns exec` execs it)."""
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    *("ip", "netns", "exec", self.namespace, sys.executable, "-m"),
                    *("backends.echo", "--address", f"{self.ip}:{port}"),
                    *("--token-file", str(token_file), *extra),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        backend = Backend(self, process, port, log_path)
        assert wait_until(backend.listening, timeout=20), backend.log()
        return backend

    def delete(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        _ip("link", "del", self.outer)  # its peer goes with it
        _ip("netns", "del", self.namespace)


class Backend:
    def __init__(
        self, host: Host, process: subprocess.Popen[bytes], port: int, log_path: Path
    ) -> None:
        self.host, self.process, self.port, self.log_path = host, process, port, log_path
        self.address = f"{host.ip}:{port}"

    def listening(self) -> bool:
        assert self.process.poll() is None, self.log()
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((self.host.ip, self.port)) == 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    if os.geteuid() != 0:
        pytest.skip("making network namespaces needs root (CAP_NET_ADMIN)")
    made: list[Host] = []
    try:
        for index in range(2):
            host = Host(index)
            made.append(host)
            try:
                host.create()
            except OSError as exc:
                pytest.skip(f"cannot make a network namespace here: {exc}")
        yield made
    finally:
        for host in made:
            host.delete()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """An empty models dir, and the token file the backends are started with."""
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    token_file = tmp_path / "backend.token"
    token_file.write_text(TOKEN + "\n")
    return models_dir, token_file


def rows(gateway: Gateway, model: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{gateway.url}/backends", timeout=10).json()
    return [row for row in body["data"] if row["model"] == model]


def served(gateway: Gateway, model: str) -> dict[str, int]:
    """Requests each ready replica has served, by its address."""
    return {
        row["address"]: row["requests"]["served"]
        for row in rows(gateway, model)
        if row["state"] == "ready"
    }


def complete(
    gateway: Gateway, prompt: str = "one two three", timeout: float = 30
) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/completions",
        json={"model": "spread", "prompt": prompt, "max_tokens": 64},
        timeout=timeout,
    )


@pytest.mark.timeout(180)
def test_two_replicas_on_two_hosts(
    tmp_path: Path, dirs: tuple[Path, Path], hosts: list[Host], gateways: list[Gateway]
) -> None:
    models_dir, token_file = dirs
    (models_dir / "backend.token").write_text(TOKEN + "\n")
    logs = [tmp_path / f"backend-{i}.log" for i in range(2)]
    backends = [host.start_backend(token_file, log) for host, log in zip(hosts, logs, strict=True)]
    addresses = [b.address for b in backends]
    write_model(
        models_dir,
        "spread",
        "backend: echo\n"
        "options: {latency_ms: 40}\n"
        "placement:\n"
        "  static:\n"
        f"    addresses: [{addresses[0]}, {addresses[1]}]\n"
        "    token_file: backend.token\n",
    )
    gateway = Gateway(models_dir, env={"HEARTH_HEALTH_INTERVAL": str(HEALTH_INTERVAL)})
    gateways.append(gateway)
    gateway.start()

    # Both replicas load at the first request, and requests take turns between them.
    answer = complete(gateway)
    assert answer.status_code == 200, answer.text
    assert wait_until(lambda: sorted(served(gateway, "spread")) == sorted(addresses))
    first = served(gateway, "spread")
    for _ in range(6):
        answer = complete(gateway)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"].strip() == "one two three"
    counts = served(gateway, "spread")
    assert [counts[a] - first[a] for a in addresses] == [3, 3], (first, counts)
    for row in rows(gateway, "spread"):
        assert (row["placement"], row["replicas"], row["healthy"]) == ("static", 2, True)
        assert row["pid"] is None  # not the gateway's process

    # A long request holds one replica: the next requests go to the other, the one with
    # fewer in flight.
    long_prompt = " ".join(["word"] * 150)  # 150 words at 40 ms: 6 s
    outcome: dict[str, httpx.Response] = {}
    worker = threading.Thread(
        target=lambda: outcome.setdefault("long", complete(gateway, long_prompt)), daemon=True
    )
    worker.start()
    assert wait_until(
        lambda: any(r["requests"]["in_flight"] for r in rows(gateway, "spread")), timeout=10
    )
    busy = next(r["address"] for r in rows(gateway, "spread") if r["requests"]["in_flight"])
    other = next(a for a in addresses if a != busy)
    before = served(gateway, "spread")
    for _ in range(3):
        assert complete(gateway).status_code == 200
    after = served(gateway, "spread")
    assert (after[other], after[busy]) == (before[other] + 3, before[busy]), (before, after)

    # SIGKILL the busy replica's backend: its request fails cleanly (a JSON error, no hang)...
    victim = backends[addresses.index(busy)]
    killed_at = time.monotonic()
    victim.process.send_signal(signal.SIGKILL)
    worker.join(30)
    assert not worker.is_alive()
    failed = outcome["long"]
    assert failed.status_code == 503, failed.text
    assert failed.json()["error"]["code"] == "backend_crashed"
    # ... and every later request succeeds on the other.
    for _ in range(5):
        answer = complete(gateway)
        assert answer.status_code == 200, answer.text
    assert served(gateway, "spread").get(other, 0) >= after[other] + 5

    # Restarted (as Kubernetes would), it is loaded again and back in the rotation.
    revived = victim.host.start_backend(token_file, logs[addresses.index(busy)])

    def both_ready() -> bool:
        ready = [r for r in rows(gateway, "spread") if r["state"] == "ready" and r["healthy"]]
        return len(ready) == 2

    assert wait_until(both_ready, timeout=30), rows(gateway, "spread")
    print(f"killed replica serving again {time.monotonic() - killed_at:.1f} s after SIGKILL")
    start = served(gateway, "spread")
    for _ in range(4):
        assert complete(gateway).status_code == 200
    end = served(gateway, "spread")
    assert end[busy] > start.get(busy, 0), (start, end)
    assert end[other] > start[other], (start, end)

    # A replica that stops answering (frozen, not dead) leaves the rotation within one health
    # interval, and comes back when it answers again.
    frozen = revived if revived.address == busy else backends[addresses.index(other)]
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        assert wait_until(
            lambda: any(not r["healthy"] for r in rows(gateway, "spread")),
            timeout=HEALTH_INTERVAL * 2 + 5,  # one interval, and the check's own timeout
        )
        start = served(gateway, "spread")
        for _ in range(3):
            assert complete(gateway, timeout=10).status_code == 200
        end = served(gateway, "spread")
        live = next(a for a in addresses if a != frozen.address)
        assert end[live] == start[live] + 3, (start, end)
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    assert wait_until(lambda: all(r["healthy"] for r in rows(gateway, "spread")), timeout=10)
    assert "passes its health check again: back in rotation" in gateway.log()
    assert TOKEN not in gateway.log()


@pytest.mark.timeout(60)
def test_a_backend_on_another_host_refuses_the_wrong_token(
    tmp_path: Path, dirs: tuple[Path, Path], hosts: list[Host], gateways: list[Gateway]
) -> None:
    models_dir, token_file = dirs
    (models_dir / "stale.token").write_text("last year's token\n")
    backend = hosts[0].start_backend(token_file, tmp_path / "backend.log")
    write_model(
        models_dir,
        "spread",
        "backend: echo\n"
        f"placement: {{static: {{addresses: [{backend.address}], token_file: stale.token}}}}\n",
    )
    gateway = Gateway(models_dir)
    gateways.append(gateway)
    gateway.start()
    answer = complete(gateway)
    assert answer.status_code == 502, answer.text
    error = answer.json()["error"]
    assert error["code"] == "backend_unauthenticated"
    assert "refused the gateway's token" in error["message"]
    assert wait_until(lambda: "wrong token" in backend.log())
    assert "last year" not in backend.log() + gateway.log()


@pytest.mark.timeout(60)
def test_replicas_on_other_hosts_over_tls(
    tmp_path: Path, dirs: tuple[Path, Path], hosts: list[Host], gateways: list[Gateway]
) -> None:
    models_dir, token_file = dirs
    cert, key = make_certificate(tmp_path)
    (models_dir / "backend-ca.pem").write_bytes(cert.read_bytes())
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    backends = [
        host.start_backend(token_file, tmp_path / f"backend-{i}.log", PORT, *tls)
        for i, host in enumerate(hosts)
    ]
    assert all("(token required, TLS)" in b.log() for b in backends)
    write_model(
        models_dir,
        "spread",
        "backend: echo\n"
        "placement:\n"
        "  static:\n"
        f"    addresses: [{backends[0].address}, {backends[1].address}]\n"
        "    token_env: SPREAD_TOKEN\n"
        f"    tls: {{ca: backend-ca.pem, server_name: {SERVER_NAME}}}\n",
    )
    gateway = Gateway(models_dir, env={"SPREAD_TOKEN": TOKEN})
    gateways.append(gateway)
    gateway.start()
    for _ in range(3):
        answer = complete(gateway)
        assert answer.status_code == 200, answer.text
    assert wait_until(lambda: len(served(gateway, "spread")) == 2)
    assert "travels in clear" not in gateway.log()
