"""Run a backend's command so that it dies with the gateway:
`python -I -S leash.py PID SIGNAL ARGV...`.

Linux sends the signal set by PR_SET_PDEATHSIG when the parent goes, however it went (SIGKILL
included), and the setting survives exec. Our own backends set it themselves, but only once
their imports are done (seconds, for torch), and a custom command may not set it at all, so the
gateway starts every backend through this script: it sets SIGNAL (TERM or KILL, by name) as the
parent-death signal, makes sure the parent is still the gateway that started it (if the gateway
died before that, nothing would ever fire), and execs the command in its own place (same pid,
same pipes). The gateway picks TERM for its own backends, which stop cleanly on it, and KILL for
custom commands, which may ignore TERM.

The signal fires when the *thread* that forked us ends, not the process: the gateway forks on
its event-loop thread, which lives as long as the gateway serves.

Standalone on purpose: it imports nothing of the gateway's, so it costs a bare interpreter's
start (run with -I -S) before the backend's own.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
#: Exit status when the command cannot be run, as a shell reports it.
_CANNOT_RUN = 127
_USAGE = "usage: leash.py PARENT_PID TERM|KILL COMMAND [ARG...]"
_DEATH_SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL}


def _die_with_parent(death_signal: signal.Signals) -> None:
    if not sys.platform.startswith("linux"):
        return  # no PDEATHSIG: our own backends still poll their parent
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        print(f"leash: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(error)}", file=sys.stderr)


def main(argv: list[str]) -> int:
    """Set the parent-death signal, check the parent, exec the command; a status if not."""
    if len(argv) < 3 or not argv[0].isdigit() or argv[1] not in _DEATH_SIGNALS:
        print(_USAGE, file=sys.stderr)
        return 2
    parent, death_signal, command = int(argv[0]), _DEATH_SIGNALS[argv[1]], argv[2:]
    _die_with_parent(death_signal)
    if os.getppid() != parent:
        print(f"leash: the gateway (pid {parent}) is gone; not starting", file=sys.stderr)
        return 1
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"leash: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
    return _CANNOT_RUN


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
