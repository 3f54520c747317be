"""Replicas placed on Ray (`placement: ray`): a real gateway and a three-node Ray cluster on
this machine, inside a network namespace of the test's own where every packet that would
leave the machine is counted (tests/ray_scenario.py runs it and reports what it saw)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.ray_scenario import NO_NAMESPACE

pytest.importorskip("ray", reason="Ray is not installed (pip install 'hearth[ray]')")

#: The scenario's own bound (it takes about 25 s on two busy cores).
SCENARIO_SECONDS = 150
pytestmark = pytest.mark.timeout(SCENARIO_SECONDS + 30)

_TOOLS = ("unshare", "ip", "iptables", "ip6tables", "sysctl", "ss")


def _namespace_problem() -> str | None:
    """Why this machine cannot give the test a network namespace; None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"not installed: {', '.join(missing)}"
    probe = subprocess.run(
        ["unshare", "--net", "sh", "-c", "ip link set lo up && iptables -L OUTPUT -n"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"cannot make a network namespace with iptables: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    problem = _namespace_problem()
    if problem is not None:
        pytest.skip(problem)
    result_path = tmp_path_factory.mktemp("ray") / "result.json"
    process = subprocess.Popen(
        ["unshare", "--net", sys.executable, "-m", "tests.ray_scenario", str(result_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own group: what it started ends with it below
    )
    try:
        output, _ = process.communicate(timeout=SCENARIO_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"the scenario took over {SCENARIO_SECONDS} s:\n{_tail(output)}")
    finally:
        # Anything of the scenario's left behind (Ray's processes, the gateway) is in its
        # group; the backends die with their actors.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    if process.returncode == NO_NAMESPACE:
        pytest.skip(f"cannot set up the network namespace: {_tail(output)}")
    assert process.returncode == 0, _tail(output)
    result = json.loads(result_path.read_text())
    if "error" in result:
        pytest.fail(f"{result['error']}\ngateway log:\n{result.get('gateway_log', '')}")
    print(
        "\nplacement {:.1f} s; SIGKILL of a backend -> serving again {:.1f} s; node lost -> "
        "serving again {:.1f} s; packets that tried to leave: {}".format(
            result["placement_seconds"],
            result["kill_to_serving_seconds"],
            result["node_loss_to_serving_seconds"],
            result["outbound_packets"],
        )
    )
    return result


def _tail(output: bytes | None) -> str:
    return (output or b"").decode(errors="replace")[-4000:]


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return ipaddress.ip_address(host).is_loopback


def test_both_replicas_are_placed_on_the_node_with_the_resource(
    scenario: dict[str, Any],
) -> None:
    placed = scenario["placed"]
    assert [row["replica"] for row in placed] == [0, 1]
    node_id = scenario["gpu_box_node_id"]
    for row in placed:
        assert row["placement"] == "ray"
        assert row["node"] == f"gpu-box (ray node {node_id[:12]})"
    assert len({row["address"] for row in placed}) == 2


def test_chats_are_answered_by_both_replicas(scenario: dict[str, Any]) -> None:
    assert scenario["first_answer"] == "hello ray"
    assert scenario["answers"] == [f"hello number {i}" for i in range(6)]
    # One request at a time each: six at once went to both.
    assert all(served > 0 for served in scenario["served_after_placement"])


def test_a_replica_over_tls(scenario: dict[str, Any]) -> None:
    assert scenario["tls_answer"] == "hello tls"
    # The backend Ray started serves the YAML's certificate (the gateway checked it against
    # the YAML's authority, or there would have been no answer).
    [backend] = scenario["tls_backends"]
    assert "--tls-cert" in backend
    assert "--tls-key" in backend
    assert "--token-file" in backend


def test_a_killed_backend_is_restarted_and_serves_again(scenario: dict[str, Any]) -> None:
    assert len(scenario["killed_backend_pids"]) == 1
    # The other replica answered meanwhile.
    assert scenario["answer_after_kill"] == "still there"
    assert scenario["answers_after_kill"] == [f"hello number {i}" for i in range(4)]
    before = {row["replica"]: row for row in scenario["placed"]}
    after = {row["replica"]: row for row in scenario["after_kill"]}
    assert after[0]["address"] != before[0]["address"]  # a new backend, on the same node
    assert after[0]["node"] == before[0]["node"]
    assert after[1]["address"] == before[1]["address"]  # the other one was left alone


def test_replicas_move_to_a_replacement_node(scenario: dict[str, Any]) -> None:
    assert scenario["answers_after_node_loss"] == [f"hello number {i}" for i in range(4)]
    node_id = scenario["replacement_node_id"]
    rows = scenario["after_node_loss"]
    assert [row["node"] for row in rows] == [f"gpu-box-2 (ray node {node_id[:12]})"] * 2
    lost = {node["name"]: node["alive"] for node in scenario["nodes"]}
    assert lost == {"head": True, "plain": True, "gpu-box": False, "gpu-box-2": True}


def test_a_model_no_node_can_take_fails_saying_why(scenario: dict[str, Any]) -> None:
    reply = scenario["nowhere"]
    assert reply["status"] in (500, 503)
    message = reply["body"]["error"]["message"]
    assert "echo-nowhere" in message
    assert "no Ray node with the resources it asks for" in message
    assert "tpu-box" in message


def test_nothing_is_left_once_the_gateway_stops(scenario: dict[str, Any]) -> None:
    assert len(scenario["backend_processes_before_stop"]) == 2
    assert len(scenario["actor_pids"]) == 2
    assert scenario["gateway_exit"] in (0, -signal.SIGTERM)
    assert scenario["actors_alive_after_stop"] == []
    assert scenario["backend_processes_after_stop"] == {}
    assert scenario["actor_processes_after_stop"] == []


def test_nothing_leaves_the_machine(scenario: dict[str, Any]) -> None:
    assert scenario["outbound_packets"] == 0
    # Ray's nodes and the backends they started stayed on loopback.
    assert all(_loopback(node["address"]) for node in scenario["nodes"])
    for row in [*scenario["placed"], *scenario["after_kill"], *scenario["after_node_loss"]]:
        assert _loopback(row["address"]), row
    assert _loopback(scenario["cluster_address"])
