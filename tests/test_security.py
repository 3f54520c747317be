"""Safe on a home network: keys with scopes on every route, and what web pages may not do."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway import identity
from gateway.app import create_app
from gateway.auth import KeyRing, Scope, scope_of
from gateway.errors import OpenAIError, for_caller
from gateway.settings import Settings
from tests.conftest import ROOT, Gateway, hearth, wait_until, write_model

INFERENCE_KEY = "inference-key-0123456789"
LIMITED_KEY = "limited-key-0123456789ab"
ADMIN_KEY = "admin-key-0123456789abcd"
METRICS_KEY = "metrics-key-0123456789ab"
WRONG_KEY = "wrong-key-0123456789abcd"

#: Every route of the app and who may call it. A route added to the app without a line here
#: fails `test_every_route_has_the_scope_this_table_gives`.
ROUTE_SCOPES = {
    "/v1/audio/transcriptions": Scope.INFERENCE,
    "/v1/audio/translations": Scope.INFERENCE,
    "/v1/audio/speech": Scope.INFERENCE,
    "/v1/audio/voices": Scope.INFERENCE,
    "/v1/rerank": Scope.INFERENCE,
    "/rerank": Scope.INFERENCE,
    "/v2/rerank": Scope.INFERENCE,
    "/v1/chat/completions": Scope.INFERENCE,
    "/v1/completions": Scope.INFERENCE,
    "/v1/embeddings": Scope.INFERENCE,
    "/v1/images/generations": Scope.INFERENCE,
    "/v1/models": Scope.INFERENCE,
    "/v1/models/{model_id:path}": Scope.INFERENCE,
    "/v1/responses": Scope.INFERENCE,
    "/v1/tokenize": Scope.INFERENCE,
    "/v1/detokenize": Scope.INFERENCE,
    "/": Scope.OPEN,  # the web UI's page (it asks for a key), and Ollama's probe
    "/ui/{name:str}": Scope.OPEN,
    "/ui/session": Scope.INFERENCE,
    "/api/chat": Scope.INFERENCE,
    "/api/generate": Scope.INFERENCE,
    "/api/embed": Scope.INFERENCE,
    "/api/embeddings": Scope.INFERENCE,
    "/api/tags": Scope.INFERENCE,
    "/api/ps": Scope.INFERENCE,
    "/api/show": Scope.INFERENCE,
    "/api/version": Scope.INFERENCE,
    "/api/pull": Scope.INFERENCE,
    "/api/push": Scope.INFERENCE,
    "/api/create": Scope.INFERENCE,
    "/api/copy": Scope.INFERENCE,
    "/api/delete": Scope.INFERENCE,
    "/backends": Scope.ADMIN,
    "/backends/{target:path}": Scope.ADMIN,
    "/models/jobs": Scope.ADMIN,
    "/models/apply": Scope.ADMIN,
    "/models/available": Scope.ADMIN,
    "/models/jobs/{job_id:str}": Scope.ADMIN,
    "/models/{name:str}": Scope.ADMIN,
    "/system": Scope.ADMIN,
    "/metrics": Scope.METRICS,
    "/healthz": Scope.OPEN,
    "/readyz": Scope.OPEN,
    "/generated/{name:str}": Scope.OPEN,
}
#: A concrete value for each path parameter.
PARAMETERS = {
    "model_id": "echo",
    "target": "echo/unload",
    "job_id": "job-0000",
    "name": "no-such-model",
}

#: What each kind of caller sends, and the scopes it may use.
CALLERS: dict[str, tuple[dict[str, str], set[Scope]]] = {
    "no key": ({}, {Scope.OPEN}),
    "wrong key": ({"authorization": f"Bearer {WRONG_KEY}"}, {Scope.OPEN}),
    "inference key": ({"authorization": f"Bearer {INFERENCE_KEY}"}, {Scope.OPEN, Scope.INFERENCE}),
    "model-limited key": ({"x-api-key": LIMITED_KEY}, {Scope.OPEN, Scope.INFERENCE}),
    "metrics key": ({"authorization": f"Bearer {METRICS_KEY}"}, {Scope.OPEN, Scope.METRICS}),
    "admin key": ({"authorization": f"bearer {ADMIN_KEY}"}, set(Scope)),
}


@functools.cache
def _app_routes() -> list[tuple[str, str, Scope | None]]:
    """(path, method, scope) of every route the app serves (not the automatic OPTIONS)."""
    app = create_app(Settings())
    return sorted(
        (route.path, method, scope_of(handler))
        for route in app.routes
        for handler in getattr(route, "route_handlers", [])
        for method in handler.http_methods
        if method not in {"OPTIONS", "HEAD"}
    )


@pytest.fixture(scope="module")
def keyed_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keyed-models")
    write_model(directory, "echo", "backend: echo")
    write_model(directory, "echo-private", "backend: echo")
    write_model(directory, "cannot-start", "backend: echo\noptions: {exit_on_load: true}")
    return directory


@pytest.fixture(scope="module")
def keyed(keyed_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys_file.write_text(
        "keys:\n"
        f"  - {{name: kid, key: {LIMITED_KEY}, models: [echo]}}\n"
        f"  - {{name: scraper, scope: metrics, key: {METRICS_KEY}}}\n"
    )
    env = {
        "HEARTH_API_KEYS": INFERENCE_KEY,
        "HEARTH_ADMIN_KEYS": ADMIN_KEY,
        "HEARTH_KEYS_FILE": str(keys_file),
    }
    running = Gateway(keyed_models, env=env).start()
    yield running
    running.cleanup()


@pytest.fixture(scope="module")
def open_gateway(keyed_models: Path) -> Iterator[Gateway]:
    """No keys, loopback: the default `make run`."""
    running = Gateway(keyed_models, env={"HEARTH_CORS_ORIGINS": "http://app.example:3000"})
    running.start()
    yield running
    running.cleanup()


def test_every_route_has_the_scope_this_table_gives() -> None:
    # And every route runs the app's check: a router's own before_request would replace it.
    app = create_app(Settings())
    handlers = [h for route in app.routes for h in getattr(route, "route_handlers", [])]
    assert app.before_request is not None
    assert all(h.resolve_before_request() is app.before_request for h in handlers)
    routes = _app_routes()
    assert {path for path, _, _ in routes} == set(ROUTE_SCOPES)
    for path, method, scope in routes:
        assert scope == ROUTE_SCOPES[path], f"{method} {path}"


@pytest.mark.parametrize("caller", list(CALLERS))
def test_every_route_answers_each_caller_by_its_scope(keyed: Gateway, caller: str) -> None:
    headers, may = CALLERS[caller]
    with httpx.Client(base_url=keyed.url, timeout=30, headers=headers) as http:
        for path, method, scope in _app_routes():
            assert scope is not None
            url = re.sub(r"\{(\w+):\w+\}", lambda m: PARAMETERS[m.group(1)], path)
            body = {} if method in {"POST", "PUT", "PATCH"} else None
            status = http.request(method, url, json=body).status_code
            where = f"{caller}: {method} {url} answered {status}"
            if scope in may:
                assert status not in (401, 403), where
                assert status < 500, where
            elif caller in {"no key", "wrong key"}:
                assert status == 401, where
            else:
                assert status == 403, where


def test_a_model_limited_key_sees_and_uses_only_its_models(keyed: Gateway) -> None:
    with httpx.Client(base_url=keyed.url, timeout=30, headers={"x-api-key": LIMITED_KEY}) as http:
        listed = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert listed == ["echo"]
        session = http.get("/ui/session").json()  # what the web UI's pickers offer
        assert [m["id"] for m in session["models"]] == ["echo"]
        assert session["admin"] is False
        messages = [{"role": "user", "content": "hello"}]
        ok = http.post("/v1/chat/completions", json={"model": "echo", "messages": messages})
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["message"]["content"] == "hello"
        refused = http.post(
            "/v1/chat/completions", json={"model": "echo-private", "messages": messages}
        )
        # As if it did not exist, as OpenAI answers: the key cannot tell which models there are.
        unknown = http.post(
            "/v1/chat/completions", json={"model": "no-such-model", "messages": messages}
        )
        assert refused.status_code == unknown.status_code == 404
        assert refused.json()["error"]["code"] == "model_not_found"
        assert http.get("/v1/models/echo-private").status_code == 404
        for route, body in (
            ("/v1/embeddings", {"model": "echo-private", "input": "x"}),
            ("/v1/completions", {"model": "echo-private", "prompt": "x"}),
            ("/v1/tokenize", {"model": "echo-private", "content": "x"}),
            ("/v1/images/generations", {"model": "echo-private", "prompt": "x"}),
        ):
            assert http.post(route, json=body).status_code == 404, route
        form = {"model": (None, "echo-private"), "file": ("a.wav", b"RIFF")}
        assert http.post("/v1/audio/transcriptions", files=form).status_code == 404
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    rows = httpx.get(f"{keyed.url}/backends", headers=admin, timeout=10).json()["data"]
    assert "echo-private" not in {row["model"] for row in rows}  # nothing ran for it


def test_a_key_in_either_header_is_found(keyed: Gateway) -> None:
    # Clients that put a placeholder in Authorization and the key in x-api-key, or the reverse.
    for headers in (
        {"authorization": "Bearer sk-placeholder", "x-api-key": INFERENCE_KEY},
        {"authorization": f"Bearer  {INFERENCE_KEY}", "x-api-key": "placeholder"},
    ):
        assert httpx.get(f"{keyed.url}/v1/models", headers=headers).status_code == 200


def test_a_wrong_key_is_told_how_to_send_one(keyed: Gateway) -> None:
    reply = httpx.get(f"{keyed.url}/v1/models", headers={"authorization": "Bearer nope"})
    assert reply.status_code == 401
    error = reply.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in error["message"]
    assert WRONG_KEY not in reply.text


def test_readyz_tells_anonymous_callers_only_the_status(keyed: Gateway) -> None:
    anonymous = httpx.get(f"{keyed.url}/readyz", timeout=10).json()
    assert anonymous == {"status": "ready"}
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    full = httpx.get(f"{keyed.url}/readyz", headers=admin, timeout=10).json()
    assert full["models"] == 3
    assert "config_errors" in full


def test_only_admins_see_a_failed_start_s_output(keyed: Gateway) -> None:
    body = {"model": "cannot-start", "messages": [{"role": "user", "content": "hi"}]}
    inference = {"authorization": f"Bearer {INFERENCE_KEY}"}
    seen = httpx.post(f"{keyed.url}/v1/chat/completions", json=body, headers=inference)
    assert seen.status_code in (500, 503)
    assert "cannot-start" in seen.json()["error"]["message"]
    assert "last backend output" not in seen.json()["error"]["message"]
    assert str(keyed.models_dir) not in seen.text
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    rows = httpx.get(f"{keyed.url}/backends", headers=admin, timeout=10).json()["data"]
    failing = next(row for row in rows if row["model"] == "cannot-start")
    assert failing["last_output"]  # the admin can still read it


def test_backends_get_no_api_keys(keyed: Gateway) -> None:
    headers = {"authorization": f"Bearer {INFERENCE_KEY}"}
    body = {"model": "echo", "prompt": "hi"}
    assert httpx.post(f"{keyed.url}/v1/completions", json=body, headers=headers).status_code == 200
    pids = keyed.backend_pids()
    assert pids
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        for key in (INFERENCE_KEY, ADMIN_KEY):
            assert key.encode() not in environ
        assert b"HEARTH_KEYS_FILE" not in environ


def test_redaction_hides_output_and_paths_from_all_but_admins(tmp_path: Path) -> None:
    models = tmp_path / "models"
    error = OpenAIError(
        500,
        f"model 'org/x' failed: {models}/x.gguf missing, see /etc/hearth/token "
        "(http://example.lan/docs)\nlast backend output:\nsecret line",
    )
    token = identity.caller.set(identity.ANONYMOUS)
    try:
        hidden = for_caller(error, models, tmp_path / "run")
    finally:
        identity.caller.reset(token)
    assert hidden.message == (
        "model 'org/x' failed: <models dir>/x.gguf missing, see <path> (http://example.lan/docs)"
    )
    assert error.message.endswith("secret line")  # the original is untouched
    token = identity.caller.set(identity.LOCAL)
    try:
        assert for_caller(error, models, tmp_path / "run") is error
    finally:
        identity.caller.reset(token)


def test_a_models_dir_at_slash_models_leaves_route_names_whole() -> None:
    # The Docker image keeps models at /models: the route /v1/models in a message must stay.
    def hidden(status: int, message: str) -> str:
        token = identity.caller.set(identity.ANONYMOUS)
        try:
            error = OpenAIError(status, message)
            return for_caller(error, Path("/models"), Path("/run/hearth")).message
        finally:
            identity.caller.reset(token)

    assert hidden(404, "no model 'x' in /models; GET /v1/models lists them (not /models2/x)") == (
        "no model 'x' in <models dir>; GET /v1/models lists them (not /models2/x)"
    )
    died = "no model in /models. The backend at unix:///run/hearth/1.sock died (/models/x.gguf)."
    assert hidden(500, died) == (
        "no model in <models dir>. The backend at unix://<runtime dir>/1.sock died "
        "(<models dir>/x.gguf)."
    )


def test_keys_files_are_checked_and_keys_matched_by_digest(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    digest = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    keys_file.write_text(f"keys:\n  - {{name: hashed, scope: admin, sha256: {digest}}}\n")
    hashed = KeyRing.load(keys_file=keys_file)
    caller = hashed.identify(ADMIN_KEY)
    assert caller is not None
    assert caller.admin
    assert caller.name == "hashed"
    assert hashed.identify(ADMIN_KEY[:-1]) is None
    ring = KeyRing.load(api_keys=("short", "a-much-longer-key-of-many-characters"))
    assert ring.identify("short") is not None
    assert ring.identify("shor") is None
    with pytest.raises(ValueError, match="twice"):
        KeyRing.load(api_keys=(INFERENCE_KEY,), admin_keys=(INFERENCE_KEY,))
    keys_file.write_text("keys: []\n")  # would turn keys off: refused
    with pytest.raises(ValueError, match="no keys"):
        KeyRing.load(keys_file=keys_file)
    keys_file.write_text(f"keys:\n  - {{name: local, key: {ADMIN_KEY}}}\n")
    with pytest.raises(ValueError, match="reserved"):
        KeyRing.load(keys_file=keys_file)


# Browsers ------------------------------------------------------------------------------------


def _chat_body(model: str = "echo") -> str:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})


def _loaded(gateway: Gateway) -> set[str]:
    rows = httpx.get(f"{gateway.url}/backends", timeout=10).json()["data"]
    return {row["model"] for row in rows}


def test_a_cross_origin_text_plain_post_runs_nothing(open_gateway: Gateway) -> None:
    # What any web page can send without a CORS preflight.
    page = {"origin": "http://evil.example", "content-type": "text/plain"}
    chat = httpx.post(
        f"{open_gateway.url}/v1/chat/completions",
        content=_chat_body("echo-private"),
        headers=page,
    )
    assert chat.status_code == 403
    assert chat.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in chat.headers
    install = httpx.post(
        f"{open_gateway.url}/models/apply", content='{"id": "whisper-tiny-en"}', headers=page
    )
    assert install.status_code == 403
    form = {"origin": "http://evil.example", "content-type": "application/x-www-form-urlencoded"}
    delete = httpx.request(
        "DELETE", f"{open_gateway.url}/models/echo-private", headers=form, content="x=1"
    )
    assert delete.status_code == 403
    assert "echo-private" not in _loaded(open_gateway)
    assert (open_gateway.models_dir / "echo-private.yaml").exists()
    jobs = httpx.get(f"{open_gateway.url}/models/jobs/job-0000", timeout=10)
    assert jobs.status_code == 404


def test_a_body_must_say_it_is_json(open_gateway: Gateway) -> None:
    # Without an Origin (curl, scripts) the type still has to be right: a form or text/plain is
    # what a page could send cross-site, so it never runs a model.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        reply = httpx.post(
            f"{open_gateway.url}/v1/chat/completions",
            content=_chat_body("echo-private"),
            headers=headers,
        )
        assert reply.status_code == 415, content_type
        assert reply.json()["error"]["code"] == "unsupported_media_type"
        assert "application/json" in reply.json()["error"]["message"]
    assert "echo-private" not in _loaded(open_gateway)
    json_type = {"content-type": "application/json; charset=utf-8"}
    reply = httpx.post(
        f"{open_gateway.url}/v1/chat/completions", content=_chat_body(), headers=json_type
    )
    assert reply.status_code == 200


def test_audio_takes_multipart_only(open_gateway: Gateway) -> None:
    reply = httpx.post(
        f"{open_gateway.url}/v1/audio/transcriptions", json={"model": "echo", "file": "x"}
    )
    assert reply.status_code == 415
    assert "multipart/form-data" in reply.json()["error"]["message"]


def test_a_foreign_host_header_is_refused(open_gateway: Gateway) -> None:
    # DNS rebinding: a page of rebind.example whose name now resolves to this server.
    for method, path in (("GET", "/v1/models"), ("DELETE", "/models/echo-private")):
        reply = httpx.request(
            method, f"{open_gateway.url}{path}", headers={"host": "rebind.example:8080"}
        )
        assert reply.status_code == 400
        assert reply.json()["error"]["code"] == "host_not_allowed"
        assert "HEARTH_ALLOWED_HOSTS" in reply.json()["error"]["message"]
    assert (open_gateway.models_dir / "echo-private.yaml").exists()
    tricked = httpx.get(
        f"{open_gateway.url}/v1/models", headers={"host": "rebind.example:80@127.0.0.1"}
    )
    assert tricked.status_code == 400  # not read as userinfo before 127.0.0.1
    for host in (
        "localhost",
        f"127.0.0.1:{open_gateway.port}",
        "[::1]:8080",
        "192.168.1.20",
        "hearth:8080",  # a Docker service name
        "nas.local",
        "server.home.arpa",
    ):
        reply = httpx.get(f"{open_gateway.url}/v1/models", headers={"host": host})
        assert reply.status_code == 200, host


def test_cors_is_open_only_to_the_listed_origins(open_gateway: Gateway) -> None:
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(
            f"{open_gateway.url}/v1/chat/completions",
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )

    refused = preflight("http://evil.example")
    assert refused.status_code == 403
    assert "access-control-allow-origin" not in refused.headers
    allowed = preflight("http://app.example:3000")
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == "http://app.example:3000"
    assert "content-type" in allowed.headers["access-control-allow-headers"]
    reply = httpx.post(
        f"{open_gateway.url}/v1/chat/completions",
        content=_chat_body(),
        headers={"origin": "http://app.example:3000", "content-type": "application/json"},
    )
    assert reply.status_code == 200
    assert reply.headers["access-control-allow-origin"] == "http://app.example:3000"
    # A page of another origin may still GET (a browser will not let it read the answer).
    other = httpx.get(f"{open_gateway.url}/v1/models", headers={"origin": "http://evil.example"})
    assert other.status_code == 200
    assert "access-control-allow-origin" not in other.headers


def test_odd_origins_are_refused_not_crashed_on(open_gateway: Gateway) -> None:
    for origin in ("null", "http://[::1", "HTTP://EVIL.EXAMPLE", "file://"):
        reply = httpx.post(
            f"{open_gateway.url}/v1/chat/completions",
            content=_chat_body(),
            headers={"origin": origin, "content-type": "application/json"},
        )
        assert reply.status_code == 403, origin
        assert reply.json()["error"]["code"] == "origin_not_allowed"


def test_the_server_s_own_page_may_post(open_gateway: Gateway) -> None:
    own = f"http://127.0.0.1:{open_gateway.port}"
    reply = httpx.post(
        f"{open_gateway.url}/v1/chat/completions",
        content=_chat_body(),
        headers={"origin": own, "content-type": "application/json"},
    )
    assert reply.status_code == 200


def test_a_non_loopback_address_without_keys_is_refused(keyed_models: Path, tmp_path: Path) -> None:
    # Refused before it listens: nothing is exposed by this test.
    result = hearth("run", "--host", "10.255.255.1", "--models-dir", str(keyed_models))
    assert result.returncode == 2
    assert "--insecure" in result.stderr
    assert "HEARTH_API_KEYS" in result.stderr
    empty = tmp_path / "keys.yaml"
    empty.write_text("keys: []\n")
    result = hearth(
        "run", "--host", "10.255.255.1", "--models-dir", str(keyed_models),
        env={"HEARTH_KEYS_FILE": str(empty)},
    )  # fmt: skip
    assert result.returncode == 2
    assert "no keys" in result.stderr


def test_the_docker_entrypoint_makes_keys_when_none_are_given(tmp_path: Path) -> None:
    # A `hearth` that shows what the entrypoint gave it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hearth").write_text('#!/bin/sh\necho "$HEARTH_KEYS_FILE"\n')
    (bin_dir / "hearth").chmod(0o755)
    models = tmp_path / "models"
    models.mkdir()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HEARTH_MODELS_DIR": str(models),
        "HEARTH_DEFAULT_MODELS": "",
    }
    for name in ("HEARTH_API_KEYS", "HEARTH_ADMIN_KEYS", "HEARTH_KEYS_FILE", "HEARTH_INSECURE"):
        env.pop(name, None)
    entrypoint = ["sh", str(ROOT / "docker" / "entrypoint.sh")]

    def start(*command: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*entrypoint, *(command or ("hearth", "run"))],
            env={**env, **extra},
            capture_output=True,
            text=True,
        )

    # Any other command (a backend run from the image) runs as it is: no keys made for it.
    other = start("sh", "-c", "echo ran; echo $HEARTH_KEYS_FILE")
    assert other.stdout.split() == ["ran"]
    assert not (models / ".hearth").exists()

    first = start()
    keys_file = models / ".hearth" / "keys.yaml"
    assert first.stdout.strip() == str(keys_file)
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    ring = KeyRing.load(keys_file=keys_file)
    callers = {key.caller.name: key.caller for key in ring.keys}
    assert callers["admin"].admin
    assert callers["household"].inference
    printed = re.findall(r"household key: (\S+)", first.stderr)
    assert printed
    assert ring.identify(printed[0]) == callers["household"]
    again = start()
    assert again.stdout.strip() == str(keys_file)
    assert KeyRing.load(keys_file=keys_file).keys == ring.keys  # the same keys, not new ones
    assert start(HEARTH_INSECURE="1").stdout.strip() == ""
    assert start(HEARTH_API_KEYS=INFERENCE_KEY).stdout.strip() == ""


def test_unload_through_an_admin_key(keyed: Gateway) -> None:
    inference = {"authorization": f"Bearer {INFERENCE_KEY}"}
    body = {"model": "echo", "prompt": "hi"}
    assert httpx.post(f"{keyed.url}/v1/completions", json=body, headers=inference).is_success
    refused = httpx.post(f"{keyed.url}/backends/echo/unload", headers=inference)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_scope"
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.post(f"{keyed.url}/backends/echo/unload", headers=admin).status_code == 200

    def gone() -> bool:
        rows = httpx.get(f"{keyed.url}/backends", headers=admin, timeout=10).json()["data"]
        return "echo" not in {row["model"] for row in rows}

    assert wait_until(gone)


def test_the_web_ui_is_served_to_browsers_and_ollama_clients_still_find_ollama(
    keyed: Gateway,
) -> None:
    http = httpx.Client(base_url=keyed.url, timeout=30)
    page = http.get("/", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200, "the page itself needs no key: it asks for one"
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["vary"] == "Accept"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy
    assert "connect-src 'self';" in policy
    assert "frame-ancestors 'none'" in policy
    assert page.headers["x-frame-options"] == "DENY"
    assert 'src="/ui/app.js"' in page.text
    probe = http.get("/", headers={"accept": "*/*"})
    assert probe.text == "Ollama is running"
    assert probe.headers["content-type"] == "text/plain; charset=utf-8"
    assert http.head("/").status_code == 200
    script = http.get("/ui/app.js")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert script.headers["content-security-policy"] == policy
    again = http.get("/ui/app.js", headers={"if-none-match": script.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""
    # Only the UI's own files: not the package's Python, not a path out of its folder.
    for path in ("/ui/__init__.py", "/ui/..%2F__init__.py", "/ui/nothing.js", "/ui/static"):
        missing = http.get(path)
        assert missing.status_code == 404, path
        assert missing.json()["error"]["message"]
    assert http.get("/ui/session").status_code == 401
    bearer = {"authorization": f"Bearer {INFERENCE_KEY}"}
    session = http.get("/ui/session", headers=bearer).json()
    assert session == {
        "admin": False,
        "keys": True,
        "models": [
            {"id": name, "kind": "chat", "backend": "echo", "description": None}
            for name in ("cannot-start", "echo", "echo-private")
        ],
    }
    admin = http.get("/ui/session", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert admin.json()["admin"] is True
    metrics = http.get("/ui/session", headers={"authorization": f"Bearer {METRICS_KEY}"})
    assert metrics.status_code == 403
