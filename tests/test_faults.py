"""Fault injection: clients that leave at any moment, backends killed under load, floods, crash
loops, slow clients, and stopping the gateway with requests in flight. Whatever happens, every
request ends cleanly, nothing stays held, and the server goes on answering."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Gateway, wait_until, write_model

LONG = " ".join(f"w{i}" for i in range(60))


@pytest.fixture(scope="module")
def fault_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fault-models")
    # One slot, a load that takes a moment, words that take a moment: every phase is reachable.
    write_model(
        directory,
        "one-slot",
        "backend: echo\nmax_concurrency: 1\nmax_queue: 32\n"
        "options: {load_delay_ms: 400, latency_ms: 30}",
    )
    write_model(
        directory,
        "killable",
        "backend: echo\nmax_concurrency: 1\nmax_queue: 16\noptions: {latency_ms: 20}",
    )
    write_model(
        directory,
        "two-slots",
        "backend: echo\nmax_concurrency: 2\nmax_queue: 16\noptions: {latency_ms: 40}",
    )
    write_model(directory, "cannot-start", "backend: echo\noptions: {exit_on_load: true}")
    write_model(directory, "fast-one-slot", "backend: echo\nmax_concurrency: 1")
    write_model(directory, "dies-on-request", "backend: echo\noptions: {exit_after_words: 0}")
    return directory


@pytest.fixture(scope="module")
def gateway(fault_models: Path) -> Iterator[Gateway]:
    running = Gateway(fault_models, env={"HEARTH_READ_TIMEOUT": "1"}).start()
    yield running
    running.cleanup()


def _backend(gateway: Gateway, model: str) -> dict[str, object] | None:
    rows = httpx.get(f"{gateway.url}/backends", timeout=10).json()["data"]
    return next((row for row in rows if row["model"] == model), None)


def _requests_held(gateway: Gateway, model: str) -> tuple[int, int]:
    row = _backend(gateway, model)
    if row is None:
        return 0, 0
    held = row["requests"]
    assert isinstance(held, dict)
    return held["in_flight"], held["queued"]


def _post(path: str, body: dict[str, object], send_body: bool = True) -> bytes:
    """An HTTP/1.1 POST of `body` as JSON, as bytes for a raw socket (just its head, unless
    `send_body`)."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    return head + data if send_body else head


def _chat(model: str, content: str, stream: bool = False) -> bytes:
    messages = [{"role": "user", "content": content}]
    return _post("/v1/chat/completions", {"model": model, "stream": stream, "messages": messages})


def _abandon(gateway: Gateway, request: bytes, after: float, read_first: bool = False) -> None:
    """Send `request` on a raw connection and hang up `after` seconds later (after reading the
    first bytes of the answer, if `read_first`)."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as conn:
        conn.sendall(request)
        if read_first:
            conn.recv(1)
        time.sleep(after)


def _answers_at_once(gateway: Gateway, model: str) -> None:
    """The model answers a short request now, and nothing stays held afterwards."""
    reply = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "still here"}]},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "still here"
    assert wait_until(lambda: _requests_held(gateway, model) == (0, 0), timeout=5)


def test_streams_abandoned_at_any_moment_give_their_slot_back(gateway: Gateway) -> None:
    # While the model loads: nobody has their first token yet.
    httpx.post(f"{gateway.url}/backends/one-slot/unload", timeout=10)
    loading = [
        threading.Thread(target=_abandon, args=(gateway, _chat("one-slot", LONG, True), 0.1))
        for _ in range(4)
    ]
    for thread in loading:
        thread.start()
    for thread in loading:
        thread.join()
    _answers_at_once(gateway, "one-slot")

    # Then 20 at random moments: queued behind each other, at the first token, mid-stream.
    rng = random.Random(7)
    threads = [
        threading.Thread(
            target=_abandon,
            args=(gateway, _chat("one-slot", LONG, True), rng.uniform(0, 1.5), rng.random() < 0.5),
        )
        for _ in range(20)
    ]
    for thread in threads:
        thread.start()
        time.sleep(rng.uniform(0, 0.05))
    for thread in threads:
        thread.join()
    assert wait_until(lambda: _requests_held(gateway, "one-slot") == (0, 0), timeout=10)
    _answers_at_once(gateway, "one-slot")


def test_a_unary_request_abandoned_stops_the_backend_work(gateway: Gateway) -> None:
    # 60 words at 30 ms: 1.8 s of work, abandoned after 0.3 s. The backend says when it stops
    # early, and only then.
    before = gateway.log().count("stream cancelled after")
    _abandon(gateway, _chat("one-slot", LONG), 0.3)
    assert wait_until(lambda: gateway.log().count("stream cancelled after") > before, timeout=5)
    assert wait_until(lambda: _requests_held(gateway, "one-slot") == (0, 0), timeout=5)
    _answers_at_once(gateway, "one-slot")


@pytest.mark.parametrize(
    ("path", "body", "said"),
    [
        ("/v1/embeddings", {"model": "one-slot", "input": LONG.split()}, "embeddings cancelled"),
        (
            "/v1/completions",
            {"model": "one-slot", "prompt": LONG, "max_tokens": 60},
            "stream cancelled",
        ),
    ],
)
def test_every_route_stops_the_backend_when_its_client_leaves(
    gateway: Gateway, path: str, body: dict[str, object], said: str
) -> None:
    before = gateway.log().count(said)
    _abandon(gateway, _post(path, body), 0.6)  # 60 inputs or words at 30 ms: 1.8 s of work
    assert wait_until(lambda: gateway.log().count(said) > before, timeout=5)
    assert wait_until(lambda: _requests_held(gateway, "one-slot") == (0, 0), timeout=5)


async def _post_all(
    gateway: Gateway, bodies: list[dict[str, object]], path: str = "/v1/chat/completions"
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(path, json=body) for body in bodies))


def test_killing_a_backend_fails_only_the_request_running_on_it(gateway: Gateway) -> None:
    killed = set()
    results: dict[str, object] = {}
    queued_bodies: list[dict[str, object]] = [
        {"model": "killable", "messages": [{"role": "user", "content": f"queued {i}"}]}
        for i in range(10)
    ]
    for _round in range(10):
        results.clear()

        def running() -> None:
            results["running"] = httpx.post(
                f"{gateway.url}/v1/chat/completions",
                json={"model": "killable", "messages": [{"role": "user", "content": LONG}]},
                timeout=30,
            )

        runner = threading.Thread(target=running)
        runner.start()
        assert wait_until(lambda: _requests_held(gateway, "killable")[0] == 1, timeout=10)

        def queue() -> None:
            results["queued"] = asyncio.run(_post_all(gateway, queued_bodies))

        queuer = threading.Thread(target=queue)
        queuer.start()
        assert wait_until(lambda: _requests_held(gateway, "killable") == (1, 10), timeout=10)
        row = _backend(gateway, "killable")
        assert row is not None
        pid = row["pid"]
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
        runner.join(30)
        queuer.join(60)

        crashed = results["running"]
        assert isinstance(crashed, httpx.Response)
        assert crashed.status_code == 503, crashed.text
        assert crashed.json()["error"]["code"] == "backend_crashed"
        assert "SIGKILL" in crashed.json()["error"]["message"]
        assert crashed.headers["x-should-retry"] == "false"  # OpenAI's SDKs will not resend it
        replies = results["queued"]
        assert isinstance(replies, list)
        assert [r.status_code for r in replies] == [200] * 10, [r.text for r in replies]
        answers = sorted(r.json()["choices"][0]["message"]["content"] for r in replies)
        assert answers == sorted(f"queued {i}" for i in range(10))
    row = _backend(gateway, "killable")
    assert row is not None
    assert row["pid"] not in killed
    # The ten that queued behind the killed one were all served by its replacement.
    assert row["requests"] == {"in_flight": 0, "queued": 0, "at_once": 1, "served": 10}


def test_requests_a_backend_died_before_beginning_go_to_its_replacement(
    gateway: Gateway,
) -> None:
    """A backend frozen (swapping, stopped) and then killed never began the requests already
    sent to it: they cannot be what killed it, so its replacement answers them."""
    _answers_at_once(gateway, "two-slots")
    row = _backend(gateway, "two-slots")
    assert row is not None
    pid = row["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGSTOP)
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:

            def ask(stream: bool) -> str:
                messages = [{"role": "user", "content": f"sent while frozen {stream}"}]
                body = {"model": "two-slots", "messages": messages, "stream": stream}
                reply = http.post("/v1/chat/completions", json=body)
                assert reply.status_code == 200, reply.text
                if not stream:
                    return str(reply.json()["choices"][0]["message"]["content"])
                events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                return "".join(
                    json.loads(e)["choices"][0]["delta"].get("content") or ""
                    for e in events[:-1]
                    if json.loads(e)["choices"]
                )

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                answers = [pool.submit(ask, stream) for stream in (False, True)]
                assert wait_until(lambda: _requests_held(gateway, "two-slots")[0] == 2)
                time.sleep(0.3)  # the calls are in the frozen backend's socket
                os.kill(pid, signal.SIGKILL)
                assert [a.result(30) for a in answers] == [
                    "sent while frozen False",
                    "sent while frozen True",
                ]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    row = _backend(gateway, "two-slots")
    assert row is not None
    assert row["pid"] != pid
    assert row["failures"] == 0


def test_a_flood_is_queued_or_refused_with_retry_after_never_a_server_error(
    gateway: Gateway,
) -> None:
    bodies: list[dict[str, object]] = [
        {"model": "two-slots", "messages": [{"role": "user", "content": f"n{i} x"}]}
        for i in range(200)
    ]
    replies = asyncio.run(_post_all(gateway, bodies))
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    accepted = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert len(accepted) >= 18  # 2 running + 16 queued, at least
    assert refused, "200 requests at once against 18 places: some must be refused"
    for reply in refused:
        assert reply.json()["error"]["code"] == "model_busy"
        assert int(reply.headers["retry-after"]) >= 1
    for reply, body in zip(replies, bodies, strict=True):
        if reply.status_code == 200:
            messages = body["messages"]
            assert isinstance(messages, list)
            assert reply.json()["choices"][0]["message"]["content"] == messages[0]["content"]
    assert wait_until(lambda: _requests_held(gateway, "two-slots") == (0, 0), timeout=5)


def _starts(gateway: Gateway, model: str) -> int:
    return gateway.log().count(f"starting echo backend for {model}")


@pytest.mark.parametrize(
    ("model", "first_code"),
    [("cannot-start", "backend_start_failed"), ("dies-on-request", "backend_crashed")],
)
def test_a_crash_looping_backend_is_restarted_with_backoff(
    gateway: Gateway, model: str, first_code: str
) -> None:
    before = _starts(gateway, model)
    codes = []
    retry_after = []
    deadline = time.monotonic() + 8
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        while time.monotonic() < deadline:
            reply = client.post(
                "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert reply.status_code in {500, 503}, reply.text
            codes.append(reply.json()["error"]["code"])
            if reply.status_code == 503 and "retry-after" in reply.headers:
                retry_after.append(int(reply.headers["retry-after"]))
            time.sleep(0.1)
    starts = _starts(gateway, model) - before
    # Started at once, again at once, then after 2 s and 4 s: 4 in 8 s, not one per request.
    assert 2 <= starts <= 5, (starts, codes)
    assert codes[0] == first_code
    assert "backend_failing" in codes
    assert retry_after
    assert all(1 <= s <= 60 for s in retry_after)
    # Each start fails one request at most; everyone else hears "failing, retry later".
    assert codes.count(first_code) <= starts
    assert set(codes) == {first_code, "backend_failing"}
    row = _backend(gateway, model)
    assert row is not None
    assert row["failures"] >= 2
    assert row["last_output"]  # the backend's own last words, for its admin
    failing = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    if failing.json()["error"]["code"] == "backend_failing":
        assert row["state"] in {"failing", "failed"}
        assert "last" in failing.json()["error"]["message"]


def test_a_client_that_sends_nothing_is_disconnected(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as silent:
        started = time.monotonic()
        assert silent.recv(1024) == b""  # closed by the server (read timeout 1 s)
        assert time.monotonic() - started < 9
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as dripping:
        dripping.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
        assert dripping.recv(1024) == b""


def test_a_connection_whose_body_was_never_read_is_closed(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/nothing HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000000\r\n\r\n"
        )
        answer = conn.recv(4096)
        assert answer.startswith(b"HTTP/1.1 404"), answer
        conn.sendall(b"x")
        # Closed by the server (a reset: the body it never read was still coming), not left
        # open with no timer running.
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(4096):
                assert b"HTTP/1.1" not in chunk


def test_a_body_dripped_a_byte_at_a_time_is_a_408(gateway: Gateway) -> None:
    body: dict[str, object] = {"model": "killable", "messages": [{"role": "user", "content": "x"}]}
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as slow:
        slow.sendall(_post("/v1/chat/completions", body, send_body=False))
        started = time.monotonic()
        answer = b""
        for byte in json.dumps(body).encode():
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.5)  # each byte within the 1 s timeout: only the total is too slow
            slow.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                answer += slow.recv(4096)
            slow.setblocking(True)
            if answer:
                break
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started < 5


def test_a_client_that_stops_reading_its_stream_gives_its_slot_back(gateway: Gateway) -> None:
    words = " ".join(["w"] * 200_000)
    conn = socket.socket()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.connect(("127.0.0.1", gateway.port))
    try:
        conn.sendall(_chat("fast-one-slot", words, stream=True))
        assert wait_until(lambda: _requests_held(gateway, "fast-one-slot")[0] == 1, timeout=10)
        # It reads nothing more, and stays connected: after the 1 s timeout its slot is free.
        assert wait_until(lambda: _requests_held(gateway, "fast-one-slot") == (0, 0), timeout=10)
        _answers_at_once(gateway, "fast-one-slot")
    finally:
        conn.close()


def test_a_body_that_stops_arriving_is_a_408(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as slow:
        slow.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": '
        )
        answer = b""
        while b"}}" not in answer and (chunk := slow.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"request_timeout" in answer


def _stream_into(gateway: Gateway, content: str, lines: list[str]) -> None:
    """Stream a chat from "killable" and keep its SSE lines (as far as they came)."""
    body = {"model": "killable", "stream": True, "messages": [{"role": "user", "content": content}]}
    with (
        contextlib.suppress(httpx.HTTPError),
        httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=30) as reply,
    ):
        lines.extend(reply.iter_lines())


def test_stopping_lets_requests_in_flight_finish(fault_models: Path) -> None:
    gateway = Gateway(fault_models, env={"HEARTH_SHUTDOWN_GRACE": "10"}).start()
    try:
        chunks: list[str] = []
        streamer = threading.Thread(target=_stream_into, args=(gateway, LONG, chunks))
        streamer.start()
        assert wait_until(lambda: _requests_held(gateway, "killable")[0] == 1, timeout=10)
        assert gateway.backend_pids()
        gateway.stop(signal.SIGTERM, timeout=30)
        streamer.join(30)
        assert "data: [DONE]" in chunks
        text = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            for line in chunks
            if line.startswith("data: {") and json.loads(line[6:])["choices"]
        )
        assert text == LONG
        assert gateway.backend_pids() == []
    finally:
        gateway.cleanup()


def test_stopping_ends_requests_that_outlast_the_grace_period(fault_models: Path) -> None:
    gateway = Gateway(fault_models, env={"HEARTH_SHUTDOWN_GRACE": "1"}).start()
    try:
        slow = " ".join(["w"] * 1500)  # 30 s at 20 ms a word
        lines: list[str] = []
        streamer = threading.Thread(target=_stream_into, args=(gateway, slow, lines))
        streamer.start()
        assert wait_until(lambda: _requests_held(gateway, "killable")[0] == 1, timeout=10)
        started = time.monotonic()
        # uvicorn ends by re-raising the signal it caught, once it has shut down.
        assert gateway.stop(signal.SIGTERM, timeout=30) in {0, -signal.SIGTERM}
        assert "Finished server process" in gateway.log()
        assert time.monotonic() - started < 12  # 1 s grace, then backends stop: not 30 s
        streamer.join(30)
        assert gateway.backend_pids() == []
        # The stream was told, as for any error mid-stream, not cut off.
        events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["error"]["code"] == "shutting_down"
        assert "Exception in ASGI application" not in gateway.log()
    finally:
        gateway.cleanup()


def test_docker_waits_for_the_grace_period_and_the_backends_to_stop() -> None:
    import yaml

    from gateway.manager.process import STOP_TIMEOUT_SECONDS
    from tests.conftest import ROOT

    service = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["hearth"]
    grace = float(service["environment"]["HEARTH_SHUTDOWN_GRACE"])
    docker_waits = float(str(service["stop_grace_period"]).removesuffix("s"))
    # Docker's SIGKILL must not land while requests finish or backends stop.
    assert docker_waits >= grace + STOP_TIMEOUT_SECONDS


def test_a_real_model_survives_abandoned_prefills_and_a_kill(real_models: Path) -> None:
    gateway = Gateway(real_models).start()
    try:
        model = "smollm2-135m-instruct"
        long_prompt = "Tell me about the history of bread. " * 150  # ~1,200 tokens of prefill
        for after, read_first in [(0.0, False), (0.3, False), (0.3, False), (0.5, True)]:
            _abandon(gateway, _chat(model, long_prompt, stream=True), after, read_first)
        assert wait_until(lambda: _requests_held(gateway, model) == (0, 0), timeout=10)
        question = {"role": "user", "content": "What is the capital of France? One word."}
        body = {"model": model, "messages": [question], "max_tokens": 8, "temperature": 0}
        reply = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60)
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]

        # Killed with four requests computing together (the model's default) and three
        # waiting: only the four fail.
        results: dict[str, object] = {}
        long_body = {**body, "messages": [{"role": "user", "content": long_prompt}]}
        runner = threading.Thread(
            target=lambda: results.update(running=asyncio.run(_post_all(gateway, [long_body] * 4)))
        )
        runner.start()
        assert wait_until(lambda: _requests_held(gateway, model)[0] == 4, timeout=10)
        queuer = threading.Thread(
            target=lambda: results.update(queued=asyncio.run(_post_all(gateway, [body] * 3)))
        )
        queuer.start()
        assert wait_until(lambda: _requests_held(gateway, model) == (4, 3), timeout=10)
        row = _backend(gateway, model)
        assert row is not None
        assert isinstance(row["pid"], int)
        os.kill(row["pid"], signal.SIGKILL)
        runner.join(60)
        queuer.join(120)
        crashed = results["running"]
        assert isinstance(crashed, list)
        assert [r.json()["error"]["code"] for r in crashed] == ["backend_crashed"] * 4
        queued = results["queued"]
        assert isinstance(queued, list)
        assert [r.status_code for r in queued] == [200, 200, 200]
        assert all("Paris" in r.json()["choices"][0]["message"]["content"] for r in queued)
    finally:
        gateway.cleanup()
