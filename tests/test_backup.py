"""`hearth backup` and `hearth restore`: a backup deleted and restored gives back the same bytes
(and mtimes, which the footprint book's fingerprints compare), a damaged or altered archive is
refused before anything is written, and a file newer than the backup's is kept unless forced."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.backup import restore_backup, write_backup
from gateway.config import load_catalog
from gateway.gallery.disk import MANIFEST, Manifest, ManifestFile
from gateway.manager.footprint import FootprintBook
from tests.conftest import hearth, write_model
from tests.tiny_models import write_tiny_llama_gguf

WEIGHTS = "tiny-llama/tiny-llama.gguf"
#: What a backup leaves alone: an install's staging folder, a temporary file, a link out.
NOT_BACKED_UP = {".hearth-install-big-x1y2/part.bin", ".hearth/tmpab12.tmp"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def make_models_dir(root: Path, gguf: Path) -> Path:
    """A models dir as a user's looks: echo models, one with two LoRA adapters (a GGUF file and
    a PEFT folder), an installed tiny GGUF with its manifest, backends.yaml, a measured
    footprint and a tuning record; and things a backup must leave out."""
    root.mkdir()
    write_model(root, "echo", "backend: echo")
    adapters = root / "adapters"
    (adapters / "polite").mkdir(parents=True)
    (adapters / "house-style.gguf").write_bytes(bytes(range(256)) * 16)
    (adapters / "polite" / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
    (adapters / "polite" / "adapter_model.safetensors").write_bytes(b"\x07" * 2048)
    write_model(
        root,
        "echo-house",
        "backend: echo\nlora:\n  - path: adapters/house-style.gguf\n    scale: 0.5\n"
        "  - path: adapters/polite",
    )
    (root / "tiny-llama").mkdir()
    shutil.copy(gguf, root / WEIGHTS)
    listed = ManifestFile(
        path="tiny-llama.gguf", sha256=sha256(root / WEIGHTS), size=(root / WEIGHTS).stat().st_size
    )
    (root / "tiny-llama" / MANIFEST).write_bytes(
        Manifest(entry="tiny-llama", files=[listed]).encode()
    )
    write_model(root, "tiny-llama", f"backend: llama\nmodel: {WEIGHTS}\ncontext_size: 256")
    (root / "backends.yaml").write_text("backends:\n  - name: lan\n    address: 127.0.0.1:50051\n")
    catalog = load_catalog(root)
    assert catalog.errors == []
    FootprintBook(root).record(catalog.models["tiny-llama"], 300_000_000)
    (root / ".hearth" / "tune").mkdir()
    (root / ".hearth" / "tune" / "tiny-llama.json").write_text('{"threads": 2, "parallel": 1}')
    (root / ".hearth-install-big-x1y2").mkdir()
    (root / ".hearth-install-big-x1y2" / "part.bin").write_bytes(b"half a download")
    (root / ".hearth" / "tmpab12.tmp").write_text('{"half')
    (root / "elsewhere.gguf").symlink_to("/etc/hostname")
    return root


def regular_files(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every regular file below `root` (links left out): its sha256, mtime in ns and mode."""
    return {
        path.relative_to(root).as_posix(): (
            sha256(path),
            path.stat().st_mtime_ns,
            path.stat().st_mode & 0o777,
        )
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def everything(root: Path) -> dict[str, object]:
    """All that is below `root`: files by content and mtime, links by target, folders."""
    found: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[relative] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            found[relative] = "folder"
        else:
            found[relative] = (sha256(path), path.stat().st_mtime_ns)
    return found


@pytest.mark.parametrize(
    ("name", "flags"), [("models.tar", []), ("models.tgz", ["--models"])], ids=["default", "models"]
)
def test_backup_then_delete_then_restore_gives_back_the_same_files(
    tmp_path: Path, gguf: Path, name: str, flags: list[str]
) -> None:
    source = make_models_dir(tmp_path / "models", gguf)
    before = regular_files(source)
    with_weights = bool(flags)
    expected = set(before) - NOT_BACKED_UP - (set() if with_weights else {WEIGHTS})
    archive = tmp_path / name

    done = hearth("backup", str(archive), "--models-dir", str(source), *flags)
    assert done.returncode == 0, done.stderr
    assert f"skipped {source}/elsewhere.gguf: a symbolic link" in done.stdout
    assert f"skipped {source}/.hearth/tmpab12.tmp: a temporary file" in done.stdout
    assert "4 YAML files, 1 install manifest, 2 state files, 3 adapter files" in done.stdout
    assert ("left out 1 model file" in done.stdout) != with_weights
    with tarfile.open(archive) as tar:  # gzip for .tgz, found by its content
        names = tar.getnames()
    assert names == [f"models/{p}" for p in names_in_order(expected)] + ["hearth-backup.json"]
    assert archive.stat().st_mode & 0o077 == 0  # it may hold keys of remote backends

    if with_weights:
        shutil.rmtree(source)
    else:
        for path in expected:
            (source / path).unlink()
    done = hearth("restore", str(archive), "--models-dir", str(source))
    assert done.returncode == 0, done.stderr
    assert f"restored {len(expected)} files" in done.stdout

    survivors = set() if with_weights else set(before) - expected
    assert regular_files(source) == {p: before[p] for p in expected | survivors}
    catalog = load_catalog(source)
    assert catalog.errors == []  # the adapters are where echo-house's YAML says
    # The measured footprint still applies: the weights' mtime came back to the nanosecond.
    assert FootprintBook(source).footprint(catalog.models["tiny-llama"]).source == "measured"
    assert not list(source.glob(".hearth-restore-*"))


def names_in_order(paths: set[str]) -> list[str]:
    """The archive's order: YAML, manifests, state, adapters, model files; by path in each."""
    order = ["yaml", "manifest", "state", "adapter", "model"]

    def kind(path: str) -> str:
        if path.startswith(".hearth/"):
            return "state"
        if path.endswith(MANIFEST):
            return "manifest"
        if "/" not in path:
            return "yaml"
        return "adapter" if path.startswith("adapters/") else "model"

    return sorted(paths, key=lambda p: (order.index(kind(p)), p))


# Damaged and altered archives -------------------------------------------------------------------


def rewrite(
    archive: Path,
    edit: Callable[[dict[str, object]], None] = lambda manifest: None,
    extra: tuple[tuple[tarfile.TarInfo, bytes], ...] = (),
) -> None:
    """Write `archive` again with its manifest edited and `extra` members added before it."""
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    *files, (manifest_info, manifest_data) = members
    manifest = json.loads(manifest_data)
    edit(manifest)
    data = json.dumps(manifest).encode()
    manifest_info.size = len(data)
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, content in [*files, *extra, (manifest_info, data)]:
            tar.addfile(info, io.BytesIO(content) if info.isreg() else None)


def flip_a_byte_in_the_weights(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        member = tar.getmember(f"models/{WEIGHTS}")
    with archive.open("r+b") as handle:
        handle.seek(member.offset_data + member.size // 2)
        byte = handle.read(1)
        handle.seek(-1, io.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))


def cut_in_half(archive: Path) -> None:
    os.truncate(archive, archive.stat().st_size // 2)


def cut_before_the_manifest(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        manifest = tar.getmember("hearth-backup.json")
    os.truncate(archive, manifest.offset)


def edit_a_hash(archive: Path) -> None:
    def edit(manifest: dict[str, object]) -> None:
        files = manifest["files"]
        assert isinstance(files, list)
        files[0]["sha256"] = hashlib.sha256(b"something else").hexdigest()

    rewrite(archive, edit)


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = kind, len(data), 0o644
    if kind == tarfile.SYMTYPE:
        info.linkname, info.size = "/etc/passwd", 0
    return info


def listed(path: str, data: bytes) -> dict[str, object]:
    return {
        "path": path,
        "kind": "yaml",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "mtime_ns": 0,
        "mode": 0o644,
    }


def add_a_member_outside(archive: Path) -> None:
    evil = b"name: evil\nbackend: echo\n"
    rewrite(archive, extra=((member("../evil.yaml", evil), evil),))


def add_a_listed_member_climbing_out(archive: Path) -> None:
    evil = b"name: evil\nbackend: echo\n"

    def edit(manifest: dict[str, object]) -> None:
        manifest["files"].append(listed("../evil.yaml", evil))  # type: ignore[attr-defined]

    rewrite(archive, edit, extra=((member("models/../evil.yaml", evil), evil),))


def add_a_symlink(archive: Path) -> None:
    def edit(manifest: dict[str, object]) -> None:
        manifest["files"].append(listed("passwd.yaml", b""))  # type: ignore[attr-defined]

    rewrite(archive, edit, extra=((member("models/passwd.yaml", kind=tarfile.SYMTYPE), b""),))


def not_an_archive(archive: Path) -> None:
    archive.write_text("name: echo\nbackend: echo\n")


DAMAGES = [
    (flip_a_byte_in_the_weights, f"models/{WEIGHTS} does not match its sha256"),
    (cut_in_half, "it is cut short or damaged (unexpected end of data)"),
    (cut_before_the_manifest, "it has no hearth-backup.json: it is not a Hearth backup, or it"),
    (edit_a_hash, "models/backends.yaml does not match its sha256"),
    (add_a_member_outside, "it holds '../evil.yaml', which is not a file of a models dir"),
    (add_a_listed_member_climbing_out, "its manifest lists an unsafe path: '../evil.yaml'"),
    (add_a_symlink, "models/passwd.yaml is a symbolic link"),
    (not_an_archive, "it is not a Hearth backup: not a tar archive"),
]


@pytest.mark.parametrize(("damage", "message"), DAMAGES, ids=[d.__name__ for d, _ in DAMAGES])
def test_a_damaged_or_altered_archive_is_refused_and_nothing_is_written(
    tmp_path: Path, gguf: Path, damage: Callable[[Path], None], message: str
) -> None:
    source = make_models_dir(tmp_path / "models", gguf)
    archive = tmp_path / "models.tar"
    write_backup(source, archive, model_files=True)
    damage(archive)
    # A restore would have files to write: two are gone, and another was changed long ago.
    (source / "echo.yaml").unlink()
    (source / WEIGHTS).unlink()
    (source / "backends.yaml").write_text("backends: []\n")
    os.utime(source / "backends.yaml", (0, 0))
    before = everything(source)

    done = hearth("restore", str(archive), "--models-dir", str(source))
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: refused {archive}: "), done.stderr
    assert message in done.stderr
    assert "nothing was restored" in done.stderr
    assert "Traceback" not in done.stderr
    assert everything(source) == before


def test_a_restore_that_needs_more_space_than_the_disk_has_is_refused(tmp_path: Path) -> None:
    """A whole archive of one 10 TiB file, made sparse: its data is a hole in the file."""
    huge = 10 * 1024**4
    if shutil.disk_usage(tmp_path).free >= huge:
        pytest.skip("this disk has 10 TiB free")
    manifest = {
        "format": "hearth-backup",
        "version": 1,
        "created": "2026-01-01T00:00:00+00:00",
        "hearth_version": "0.1.0",
        "models_dir": "/srv/models",
        "model_files": True,
        "files": [{**listed("huge.gguf", b""), "kind": "model", "size": huge}],
    }
    data = json.dumps(manifest).encode()
    weights = member("models/huge.gguf")
    weights.size = huge
    archive = tmp_path / "huge.tar"
    try:
        with archive.open("wb") as raw:
            raw.write(member("hearth-backup.json", data).tobuf(tarfile.PAX_FORMAT))
            raw.write(data + bytes(-len(data) % tarfile.BLOCKSIZE))
            raw.write(weights.tobuf(tarfile.PAX_FORMAT))
            raw.seek(huge, io.SEEK_CUR)
            raw.write(bytes(2 * tarfile.BLOCKSIZE))  # the end of the archive
    except OSError as exc:
        pytest.skip(f"this filesystem has no 10 TiB sparse files: {exc}")
    target = tmp_path / "models"
    done = hearth("restore", str(archive), "--models-dir", str(target))
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: restoring needs 10240.0 GiB free in {target}, and ")
    assert not target.exists()


def test_a_newer_file_is_kept_unless_forced(tmp_path: Path, gguf: Path) -> None:
    source = make_models_dir(tmp_path / "models", gguf)
    archive = tmp_path / "models.tar"
    write_backup(source, archive)
    original = {name: (source / name).read_bytes() for name in ("echo.yaml", "tiny-llama.yaml")}
    # Edited since the backup (newer): kept. Changed, but older than the backup: replaced.
    (source / "echo.yaml").write_text("name: echo\nbackend: echo\ndescription: mine now\n")
    (source / "tiny-llama.yaml").write_text("name: tiny-llama\nbackend: echo\n")
    os.utime(source / "tiny-llama.yaml", (0, 0))

    done = hearth("restore", str(archive), "--models-dir", str(source))
    assert done.returncode == 0, done.stderr
    assert f"kept {source}/echo.yaml: newer than the backup (use --force)" in done.stdout
    size = len(original["tiny-llama.yaml"])
    assert f"restored 1 file ({size} bytes) in {source}, unchanged 8, kept 1" in done.stdout
    assert (source / "echo.yaml").read_text().endswith("description: mine now\n")
    assert (source / "tiny-llama.yaml").read_bytes() == original["tiny-llama.yaml"]

    before = everything(source)
    done = hearth("restore", str(archive), "--models-dir", str(source), "--force", "--dry-run")
    assert f"would restore {source}/echo.yaml" in done.stdout
    assert everything(source) == before

    result = restore_backup(archive, source, force=True)
    assert [f.path for f in result.restored] == ["echo.yaml"]
    assert (source / "echo.yaml").read_bytes() == original["echo.yaml"]


def test_what_backup_and_restore_refuse(tmp_path: Path, gguf: Path) -> None:
    source = make_models_dir(tmp_path / "models", gguf)
    inside = hearth("backup", str(source / "backup.tar"), "--models-dir", str(source))
    assert inside.returncode == 1
    assert "is inside the models dir" in inside.stderr
    assert not (source / "backup.tar").exists()

    archive = tmp_path / "models.tar"
    archive.write_bytes(b"last week's backup")
    again = hearth("backup", str(archive), "--models-dir", str(source))
    assert again.returncode == 1
    assert f"error: {archive} exists; give --force to replace it" in again.stderr
    assert archive.read_bytes() == b"last week's backup"
    assert hearth("backup", str(archive), "--models-dir", str(source), "--force").returncode == 0
    assert archive.read_bytes() != b"last week's backup"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []

    for command, path, models_dir, words in [
        ("backup", tmp_path / "x.tar", tmp_path / "none", "there is no models dir at"),
        ("backup", tmp_path / "no" / "such" / "x.tar", source, "cannot write"),
        ("restore", tmp_path / "missing.tar", source, "does not exist"),
        ("restore", tmp_path, source, "is a folder, not a backup"),
    ]:
        done = hearth(command, str(path), "--models-dir", str(models_dir))
        assert done.returncode == 1, (command, path)
        assert done.stderr.startswith("error: "), done.stderr
        assert words in done.stderr
        assert "Traceback" not in done.stderr
