"""Child processes of a conversion: started leashed (they die with us), their output read line
by line while a cancel is watched for, and ended (TERM, then KILL) when it comes."""

from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from gateway.convert.errors import ConvertCancelled
from gateway.manager.process import backend_environment, leashed

_PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
#: Seconds a child gets to go after SIGTERM before it is killed.
_STOP_SECONDS = 5.0
#: Lines of a child's stderr kept for the message when it fails.
_TAIL_LINES = 40


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A child's environment: the gateway's less its keys and tokens, offline for Hugging Face
    (a conversion reads local files only), with this project importable."""
    env = backend_environment(os.environ)
    inherited = env.get("PYTHONPATH")
    paths = [str(_PROJECT_ROOT)]
    if inherited:
        paths += [os.path.abspath(entry) for entry in inherited.split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def python_module(module: str, *args: str) -> list[str]:
    """argv running `module` with this Python; -P: the working directory is never importable."""
    return [sys.executable, "-P", "-m", module, *args]


class ChildFailed(Exception):
    """A child that exited with a status other than 0; `tail` is the end of its stderr."""

    def __init__(self, status: int, tail: list[str]) -> None:
        super().__init__(f"exited with status {status}")
        self.status = status
        self.tail = tail

    def last_line(self) -> str:
        return next((line for line in reversed(self.tail) if line.strip()), "").strip()


def run_child(
    argv: list[str],
    *,
    cwd: Path,
    cancelled: threading.Event,
    on_stdout: Callable[[str], None] | None = None,
    on_stderr: Callable[[str], None] | None = None,
    every_tick: Callable[[], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Run `argv` to its end, handing each line of its output to the callbacks (and calling
    `every_tick` about five times a second); return the tail of its stderr. ChildFailed: it
    exited with another status than 0; ConvertCancelled: `cancelled` was set, and it was ended.
    However this returns (Ctrl-C included), the child is gone."""
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    # SIGKILL when we go: a child left alone would write into a staging folder nobody removes.
    process = subprocess.Popen(
        leashed(argv, signal.SIGKILL),
        cwd=cwd,
        env=dict(env) if env is not None else child_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    readers = [
        threading.Thread(target=_pump, args=(process.stdout, "out", lines), daemon=True),
        threading.Thread(target=_pump, args=(process.stderr, "err", lines), daemon=True),
    ]
    for reader in readers:
        reader.start()
    open_streams = 2
    try:
        while open_streams:
            if cancelled.is_set():
                raise ConvertCancelled("cancelled")
            try:
                stream, line = lines.get(timeout=0.2)
            except queue.Empty:
                if every_tick is not None:
                    every_tick()
                continue
            if line is None:
                open_streams -= 1
            elif stream == "out":
                if on_stdout is not None:
                    on_stdout(line)
            else:
                # Progress bars redraw with carriage returns: each redraw is a line of its own.
                for part in line.split("\r"):
                    if part.strip():
                        tail.append(part)
                        if on_stderr is not None:
                            on_stderr(part)
        status = process.wait()
    finally:
        _end(process)
    if status != 0:
        raise ChildFailed(status, list(tail))
    return list(tail)


def _pump(stream: IO[bytes], name: str, lines: queue.Queue[tuple[str, str | None]]) -> None:
    with stream:
        for raw in stream:
            lines.put((name, raw.decode("utf-8", errors="replace").rstrip("\n")))
    lines.put((name, None))


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
