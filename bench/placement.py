"""Placing replicas and getting over a dead one: the local placer (the reference: processes of
the gateway's) next to the static placer (backends a supervisor keeps running, here restarted by
this script at once, as Kubernetes would) and, where Ray is installed, the Ray placer (a local
Ray cluster on loopback).

For each placer, in turns over --rounds rounds, with a two-replica echo model:
- placement: first request → first answer (both replicas started or found, and loaded);
- recovery: SIGKILL of one replica's backend → both replicas ready and in rotation again;
- failed requests: requests sent one after another during the recovery that did not get a 200.

    .venv/bin/python bench/placement.py [--rounds 5] [--health-interval 0.5]

The echo backend loads in milliseconds: what is measured is the placement, not a model's load.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from harness import ROOT, free_port, gateway, scratch_models

TOKEN = "bench-token-not-a-secret"


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if condition():
            return time.perf_counter() - started
        time.sleep(0.01)
    raise TimeoutError("condition not met")


def rows(http: httpx.Client) -> list[dict[str, object]]:
    return [r for r in http.get("/backends").json()["data"] if r["model"] == "twins"]


def both_in_rotation(http: httpx.Client) -> bool:
    now = rows(http)
    return len(now) == 2 and all(r["state"] == "ready" and r["healthy"] for r in now)


def ask(http: httpx.Client) -> int:
    try:
        return http.post(
            "/v1/embeddings", json={"model": "twins", "input": "hello"}, timeout=30
        ).status_code
    except httpx.TransportError:
        return 0


def serving(address: str) -> int:
    """The pid of the backend process listening on `address`."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--address" in argv and address.encode() in argv and b"-m" in argv:
                return int(entry.name)
    raise LookupError(f"no backend process serves {address}")


class StaticBackends:
    """Two echo backends on loopback ports, restarted by `revive` as a supervisor would."""

    def __init__(self, directory: Path) -> None:
        self.token_file = directory / "backend.token"
        self.token_file.write_text(TOKEN)
        self.ports = [free_port(), free_port()]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        for port in self.ports:
            self.revive(port)

    def revive(self, port: int) -> None:
        self.processes[port] = subprocess.Popen(
            [
                *(sys.executable, "-m", "backends.echo", "--address", f"127.0.0.1:{port}"),
                *("--token-file", str(self.token_file)),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self, address: str) -> None:
        port = int(address.rsplit(":", 1)[1])
        self.processes[port].send_signal(signal.SIGKILL)
        self.processes[port].wait()
        self.revive(port)  # a supervisor's restart, at once

    def close(self) -> None:
        for process in self.processes.values():
            process.kill()
            process.wait()


@contextmanager
def placed(kind: str, health_interval: float) -> Iterator[tuple[httpx.Client, Callable[[], None]]]:
    """A gateway serving `twins` placed by `kind`, and a function that kills one replica."""
    env = {"HEARTH_HEALTH_INTERVAL": str(health_interval)}
    with scratch_models() as models:
        body = "name: twins\nbackend: echo\nembeddings: true\nreplicas: 2\n"
        backends = None
        cluster = None
        if kind == "static":
            backends = StaticBackends(models)
            (models / "backend.token").write_text(TOKEN)
            addresses = ", ".join(f"127.0.0.1:{p}" for p in backends.ports)
            body += (
                f"placement: {{static: {{addresses: [{addresses}], token_file: backend.token}}}}\n"
            )
        elif kind == "ray":
            from ray.cluster_utils import Cluster

            # 127.0.0.2: on a machine with a route out, Ray rewrites 127.0.0.1 (ray#59110).
            cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": 2,
                    "node_ip_address": "127.0.0.2",
                    "include_dashboard": False,
                },
            )
            env["HEARTH_RAY_ADDRESS"] = cluster.address
            body += "placement: {ray: {num_cpus: 0.5}}\n"
        (models / "twins.yaml").write_text(body)
        try:
            with gateway(models, env) as (http, _):

                def kill() -> None:
                    victim = rows(http)[0]
                    if kind == "static":
                        assert backends is not None
                        backends.kill(str(victim["address"]))
                    elif kind == "local":
                        os.kill(int(str(victim["pid"])), signal.SIGKILL)
                    else:  # a Ray actor's backend, on this machine: found by its address
                        os.kill(serving(str(victim["address"])), signal.SIGKILL)

                yield http, kill
        finally:
            if backends is not None:
                backends.close()
            if cluster is not None:
                cluster.shutdown()


def one_round(kind: str, health_interval: float) -> tuple[float, float, int]:
    with placed(kind, health_interval) as (http, kill):
        started = time.perf_counter()
        assert ask(http) == 200
        placement = time.perf_counter() - started
        wait_for(lambda: both_in_rotation(http))
        failed = 0
        stop = threading.Event()

        def traffic() -> None:
            nonlocal failed
            while not stop.is_set():
                if ask(http) != 200:
                    failed += 1

        sender = threading.Thread(target=traffic)
        killed = time.perf_counter()
        kill()
        sender.start()
        wait_for(lambda: not both_in_rotation(http), timeout=30)
        wait_for(lambda: both_in_rotation(http))
        recovery = time.perf_counter() - killed
        stop.set()
        sender.join()
        return placement, recovery, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--health-interval", type=float, default=0.5)
    parser.add_argument("--placers", default="local,static,ray")
    args = parser.parse_args()
    kinds = args.placers.split(",")
    assert kinds[0] == "local", "local is the reference: name it first"
    if "ray" in kinds:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("ray is not installed: the Ray placer is left out (pip install 'hearth[ray]')")
            kinds.remove("ray")
    results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in kinds}
    for index in range(args.rounds):
        order = kinds if index % 2 == 0 else list(reversed(kinds))
        for kind in order:
            results[kind].append(one_round(kind, args.health_interval))
    print(
        f"\n{args.rounds} rounds, two replicas of an echo model, health checks every "
        f"{args.health_interval:g} s; medians:"
    )
    print(f"{'placer':8} {'placement':>10} {'kill → back':>12} {'failed requests':>16}")
    reference = statistics.median(r[1] for r in results["local"])
    for kind, runs in results.items():
        placement = statistics.median(r[0] for r in runs)
        recovery = statistics.median(r[1] for r in runs)
        failed = statistics.median(r[2] for r in runs)
        print(
            f"{kind:8} {placement:9.2f}s {recovery:11.2f}s {failed:16g}"
            f"   (recovery {recovery / reference:.1f} x local's)"
        )


if __name__ == "__main__":
    main()
