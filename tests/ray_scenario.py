"""The Ray placement scenario of tests/test_ray_placement.py, run inside a network namespace
of its own: `unshare --net python -m tests.ray_scenario RESULT.json`.

The namespace has loopback, and a veth with an address and a default route into nothing, so
that a connection to anywhere but this machine would send a packet; iptables rejects and
counts every packet that leaves other than on loopback. Ray's nodes (a head, a plain node and
a node with the custom resource `gpu-box`) are pinned to 127.0.0.2: Ray rewrites 127.0.0.1
(and "localhost") in a cluster address to the machine's routable address (ray#59110).

A real gateway places an echo model's two replicas on the `gpu-box` node; the scenario kills
one replica's backend, then the node itself (a replacement joins), stops the gateway, and
writes what it saw to RESULT.json for the test to judge. Everything it started ends with it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from tests.conftest import processes_with

#: The loopback address Ray's nodes and the backends they start listen on.
NODE_IP = "127.0.0.2"
MODEL = "echo-ray"
#: A model asking for a resource no node has.
NOWHERE = "echo-nowhere"
#: A model whose backend serves TLS (unloaded once it has answered).
TLS_MODEL = "echo-tls"
#: The gateway's HEARTH_BACKEND_START_TIMEOUT: how long a placement may take.
START_TIMEOUT = 15
#: Seconds each phase may take before the scenario gives up on it.
PHASE_SECONDS = 40.0
#: Exit status when the namespace cannot be set up here (the test skips).
NO_NAMESPACE = 77


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def isolate_network() -> None:
    """Loopback up; a veth with an address and a default route (connections to anywhere
    would be sent); every packet not on loopback rejected and counted."""
    _run("ip", "link", "set", "lo", "up")
    # No IPv6 on the veth: its neighbour discovery would be packets of the kernel's own.
    _run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
    _run("ip", "link", "add", "hearth0", "type", "veth", "peer", "name", "hearth1")
    _run("ip", "addr", "add", "10.77.0.2/24", "dev", "hearth0")
    _run("ip", "link", "set", "hearth0", "up")
    _run("ip", "link", "set", "hearth1", "up")
    _run("ip", "route", "add", "default", "via", "10.77.0.1")
    for tables in ("iptables", "ip6tables"):
        _run(tables, "-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT")
        _run(tables, "-A", "OUTPUT", "-j", "REJECT")


def outbound_packets() -> int:
    """Packets that tried to leave the machine (the REJECT rules' counters)."""
    total = 0
    for tables in ("iptables", "ip6tables"):
        for line in _run(tables, "-L", "OUTPUT", "-v", "-x", "-n").splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[2] == "REJECT":
                total += int(fields[0])
    return total


def main(result_path: Path) -> int:
    try:
        isolate_network()
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"cannot set up the network namespace: {exc}", file=sys.stderr)
        return NO_NAMESPACE
    scratch = Path(tempfile.mkdtemp(prefix="hearth-ray-", dir="/tmp"))
    home = scratch / "home"
    home.mkdir()
    # With no autoscaler config here, the head's usage module asks the cloud-metadata
    # addresses which cloud it runs on, usage statistics or not: this one says "local".
    (home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    (scratch / "ray").mkdir()
    os.environ.update(
        HOME=str(home),
        TMPDIR=str(scratch),  # the actors' token folders, so their backends carry this path
        RAY_TMPDIR=str(scratch),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_USAGE_STATS_REPORT_URL="http://127.0.0.1:9/",
    )
    result: dict[str, Any] = {"scratch": str(scratch)}
    try:
        scenario(scratch, result)
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        result["outbound_packets"] = outbound_packets()
        result_path.write_text(json.dumps(result, indent=2, default=str))
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def scenario(scratch: Path, result: dict[str, Any]) -> None:
    import httpx
    from ray.cluster_utils import Cluster

    from tests.conftest import Gateway, wait_until, write_model

    def now() -> float:
        return time.monotonic()

    # Node death is noticed in about 1.5 s rather than Ray's default 30 s.
    system = {
        "health_check_period_ms": 500,
        "health_check_timeout_ms": 500,
        "health_check_failure_threshold": 3,
    }
    begun = now()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "node_ip_address": NODE_IP,
            "node_name": "head",
            "include_dashboard": False,
            "temp_dir": str(scratch),
            "_system_config": system,
        },
    )
    gateway = None
    try:
        common = {"num_cpus": 1, "node_ip_address": NODE_IP}
        cluster.add_node(node_name="plain", **common)
        gpu_box = cluster.add_node(node_name="gpu-box", resources={"gpu-box": 1}, **common)
        result["cluster_seconds"] = now() - begun
        result["cluster_address"] = cluster.address

        models = scratch / "models"
        models.mkdir()
        write_model(
            models,
            MODEL,
            "backend: echo\nreplicas: 2\nmax_concurrency: 1\noptions: {latency_ms: 30}\n"
            "placement: {ray: {num_cpus: 0.5, resources: {gpu-box: 0.5}, max_restarts: 3}}",
        )
        from tests.test_remote_backends import SERVER_NAME, make_certificate

        cert, key = make_certificate(scratch)
        write_model(
            models,
            TLS_MODEL,
            "backend: echo\nplacement:\n  ray:\n    num_cpus: 0.25\n"
            f"    tls: {{cert: {cert}, key: {key}, ca: {cert}, server_name: {SERVER_NAME}}}",
        )
        # A model no node can take: its error comes while the scenario goes on.
        write_model(
            models,
            NOWHERE,
            "backend: echo\nplacement: {ray: {num_cpus: 0.5, resources: {tpu-box: 1}}}",
        )
        gateway = Gateway(
            models,
            env={
                "HEARTH_RAY_ADDRESS": cluster.address,
                "HEARTH_HEALTH_INTERVAL": "1",
                "HEARTH_BACKEND_START_TIMEOUT": str(START_TIMEOUT),
            },
        )
        # The gateway quiets Ray itself: none of the cluster's settings reach it.
        for name in [n for n in gateway.env if n.startswith("RAY_")]:
            del gateway.env[name]
        gateway.start()
        http = httpx.Client(base_url=gateway.url, timeout=60)
        background = concurrent.futures.ThreadPoolExecutor(1)

        def ask_nowhere() -> dict[str, Any]:
            reply = http.post(
                "/v1/chat/completions",
                json={"model": NOWHERE, "messages": [{"role": "user", "content": "hi"}]},
            )
            return {"status": reply.status_code, "body": reply.json()}

        nowhere = background.submit(ask_nowhere)

        def rows() -> list[dict[str, Any]]:
            data = http.get("/backends").json()["data"]
            return [row for row in data if row["model"] == MODEL]

        def serving() -> list[dict[str, Any]]:
            ready = [r for r in rows() if r["state"] == "ready" and r["healthy"]]
            return sorted(ready, key=lambda r: r["replica"])

        def chat(words: str) -> str:
            reply = http.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": words}]},
            )
            reply.raise_for_status()
            return str(reply.json()["choices"][0]["message"]["content"])

        def chats(count: int) -> list[str]:
            """`count` chats at once: with one request at a time per replica, both serve."""
            with concurrent.futures.ThreadPoolExecutor(count) as pool:
                return list(pool.map(chat, [f"hello number {i}" for i in range(count)]))

        def both_serving(other_than: set[str] = frozenset()) -> bool:  # type: ignore[assignment]
            ready = serving()
            return len(ready) == 2 and not {r["address"] for r in ready} & other_than

        # Placement: the first request starts both replicas.
        started = now()
        result["first_answer"] = chat("hello ray")
        assert wait_until(both_serving, timeout=PHASE_SECONDS), rows()
        result["placement_seconds"] = now() - started
        placed = serving()
        result["placed"] = placed
        result["gpu_box_node_id"] = gpu_box.node_id
        result["answers"] = chats(6)
        result["served_after_placement"] = [r["requests"]["served"] for r in serving()]

        # Over TLS: the backend on its node serves the certificate the YAML names, and the
        # gateway checks it against the YAML's authority.
        reply = http.post(
            "/v1/chat/completions",
            json={"model": TLS_MODEL, "messages": [{"role": "user", "content": "hello tls"}]},
        )
        result["tls_answer"] = reply.json()["choices"][0]["message"]["content"]
        result["tls_rows"] = [
            r for r in http.get("/backends").json()["data"] if r["model"] == TLS_MODEL
        ]
        listening = [
            cmdline
            for cmdline in processes_with("backends.echo", str(scratch)).values()
            if "--tls-cert" in cmdline
        ]
        result["tls_backends"] = listening
        http.post(f"/backends/{TLS_MODEL}/unload").raise_for_status()

        # A replica's backend is killed: its actor ends, Ray restarts it, the gateway finds
        # it again.
        victim = placed[0]
        pids = [
            pid
            for pid, cmdline in processes_with("backends.echo", str(scratch)).items()
            if f"--address {victim['address']} " in cmdline
        ]
        result["killed_backend_pids"] = pids
        killed = now()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        result["answer_after_kill"] = chat("still there")
        old = {victim["address"]}
        assert wait_until(lambda: both_serving(old), timeout=PHASE_SECONDS), rows()
        result["answers_after_kill"] = chats(4)
        result["kill_to_serving_seconds"] = now() - killed
        result["after_kill"] = serving()

        # The node goes away; a replacement with the resource joins.
        lost = now()
        cluster.remove_node(gpu_box, allow_graceful=False)
        replacement = cluster.add_node(node_name="gpu-box-2", resources={"gpu-box": 1}, **common)
        result["replacement_node_id"] = replacement.node_id
        old = {r["address"] for r in result["after_kill"]}
        assert wait_until(lambda: both_serving(old), timeout=PHASE_SECONDS), rows()
        result["answers_after_node_loss"] = chats(4)
        result["node_loss_to_serving_seconds"] = now() - lost
        result["after_node_loss"] = serving()

        result["nodes"] = [
            {"name": n.get("NodeName"), "address": n["NodeManagerAddress"], "alive": n["Alive"]}
            for n in cluster.global_state.node_table()
        ]
        result["nowhere"] = nowhere.result(timeout=START_TIMEOUT + PHASE_SECONDS)
        background.shutdown()
        result["listeners"] = sorted(
            " ".join(line.split()[3:6:2])
            for line in _run("ss", "-ltnpH").splitlines()
            if line.strip()
        )
        result["backend_processes_before_stop"] = processes_with("backends.echo", str(scratch))
        actors = cluster.global_state.actor_table(None)
        result["actor_pids"] = [a["Pid"] for a in actors.values() if a["State"] == "ALIVE"]

        stopping = now()
        result["gateway_exit"] = gateway.stop()
        result["gateway_stop_seconds"] = now() - stopping
        http.close()

        def actors_alive() -> list[str]:
            table = cluster.global_state.actor_table(None)
            return [a["Name"] for a in table.values() if a["State"] != "DEAD"]

        wait_until(lambda: not actors_alive(), timeout=10)
        result["actors_alive_after_stop"] = actors_alive()
        wait_until(lambda: not processes_with("backends.echo", str(scratch)), timeout=10)
        result["backend_processes_after_stop"] = processes_with("backends.echo", str(scratch))
        result["actor_processes_after_stop"] = [
            pid for pid in result["actor_pids"] if Path(f"/proc/{pid}").exists()
        ]
        result["gateway_log"] = gateway.log()[-6000:]
    finally:
        if gateway is not None:
            result.setdefault("gateway_log", gateway.log()[-6000:])
            gateway.cleanup()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
