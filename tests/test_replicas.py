"""Local replicas: `replicas: N` runs N backend processes for one model on this machine, each
counted in the memory budget, requests spread by the fewest in flight, a dead one replaced."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Gateway, wait_until, write_model


def rows(gateway: Gateway, model: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{gateway.url}/backends", timeout=10).json()
    return [row for row in body["data"] if row["model"] == model]


def embed(gateway: Gateway, model: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/embeddings", json={"model": model, "input": "hello"}, timeout=30
    )


def test_local_replicas_share_the_load_and_a_dead_one_is_replaced(
    tmp_path: Path, gateways: list[Gateway]
) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    write_model(models_dir, "twins", "backend: echo\nembeddings: true\nreplicas: 2\nmemory: 40MB")
    gateway = Gateway(models_dir, env={"HEARTH_MEMORY": "1GB"})
    gateways.append(gateway)
    gateway.start()
    # The first request starts both, and is answered by the first one ready.
    assert embed(gateway, "twins").status_code == 200
    assert wait_until(lambda: [r["state"] for r in rows(gateway, "twins")] == ["ready"] * 2)
    before = [r["requests"]["served"] for r in rows(gateway, "twins")]
    for _ in range(4):  # one after the other: they take turns
        assert embed(gateway, "twins").status_code == 200
    replicas = rows(gateway, "twins")
    assert [r["replica"] for r in replicas] == [0, 1]
    assert [r["requests"]["served"] - b for r, b in zip(replicas, before, strict=True)] == [2, 2]
    pids = [r["pid"] for r in replicas]
    assert len(set(pids)) == 2
    assert sorted(pids) == sorted(gateway.backend_pids())
    # Each local replica holds its own memory in the budget.
    budget = httpx.get(f"{gateway.url}/backends", timeout=10).json()["budget"]
    assert budget["memory_used_bytes"] >= 2 * 40_000_000

    os.kill(pids[0], signal.SIGKILL)
    for _ in range(3):  # the other serves meanwhile
        assert embed(gateway, "twins").status_code == 200

    def replaced() -> bool:
        now = [r for r in rows(gateway, "twins") if r["state"] == "ready"]
        return len(now) == 2 and pids[0] not in {r["pid"] for r in now}

    assert wait_until(replaced, timeout=20), rows(gateway, "twins")
    assert "failed" not in {r["state"] for r in rows(gateway, "twins")}


def test_a_replica_that_does_not_fit_leaves_the_others_serving(
    tmp_path: Path, gateways: list[Gateway]
) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    write_model(models_dir, "other", "backend: echo\nembeddings: true\nmemory: 500MB")
    write_model(models_dir, "big", "backend: echo\nembeddings: true\nreplicas: 2\nmemory: 600MB")
    gateway = Gateway(models_dir, env={"HEARTH_MEMORY": "1GB"})
    gateways.append(gateway)
    gateway.start()
    assert embed(gateway, "other").status_code == 200
    # The first replica makes room as any model would (the idle model goes); the second only
    # starts where it fits beside it, and unloads nothing.
    for _ in range(3):
        assert embed(gateway, "big").status_code == 200

    def settled() -> bool:
        # "failing": it waits for its next try
        return {r["state"] for r in rows(gateway, "big")} == {"ready", "failing"}

    assert wait_until(settled, timeout=20), rows(gateway, "big")
    assert rows(gateway, "other") == []
    ready = [r for r in rows(gateway, "big") if r["state"] == "ready"]
    failed = [r for r in rows(gateway, "big") if r["state"] == "failing"]
    assert [r["requests"]["served"] for r in ready] == [3]
    assert failed[0]["retry_at"] is not None
    assert "replica 2 of model 'big' does not fit beside what is loaded" in failed[0]["last_error"]
    assert "memory budget is in use" in failed[0]["last_error"]
    assert len(gateway.backend_pids()) == 1  # it never unloaded its twin to make room


class _Client:
    """What a health check leaves on a backend's client: it ran out of time."""

    last_health_failure = "Deadline Exceeded"
    last_health_slow = True


async def test_a_busy_replica_gets_a_second_check_before_it_leaves(tmp_path: Path) -> None:
    from gateway.config import load_model_file
    from gateway.manager import BackendInstance, BackendManager
    from gateway.manager.admission import Slots
    from gateway.settings import Settings

    path = write_model(tmp_path, "far", "backend: echo\nplacement: {static: {addresses: [a:1]}}")
    config = load_model_file(path, tmp_path)
    manager = BackendManager(Settings(models_dir=tmp_path))

    def replica(busy: bool) -> BackendInstance:
        instance = BackendInstance(config, "a:1", _Client(), None, Slots(1, 0))  # type: ignore[arg-type]
        instance.slots.busy = int(busy)
        return instance

    # Idle and not answering in time: out of the rotation at once.
    idle = replica(busy=False)
    await manager._judge(idle, None)
    assert idle.unhealthy
    # Busy: one slow answer is forgiven, the second in a row is not.
    busy = replica(busy=True)
    await manager._judge(busy, None)
    assert not busy.unhealthy
    await manager._judge(busy, None)
    assert busy.unhealthy
    # An answer in time brings it back, and starts the count afresh.
    await manager._judge(busy, True)
    assert not busy.unhealthy
    await manager._judge(busy, None)
    assert not busy.unhealthy
