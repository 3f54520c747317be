"""Offline and private by default: backends get none of the gateway's secrets, and a whole
workload (chat, embeddings, transcription, images; real engines) runs through a real gateway
in a network namespace that has only loopback, while an audit hook in the gateway and in every
backend records each connection attempt they make.

Audit hooks see Python's socket calls, not those C libraries make themselves (gRPC, libuv,
glibc's resolver, the engines'); where strace runs, every process of the namespace is traced
too, at the system-call level, and the same rule applies to what it sees.

Run as `python -m tests.test_offline WORKDIR`, this module is the workload itself, inside the
namespace.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import io
import ipaddress
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.config import CustomBackend, ModelConfig
from gateway.manager.process import OFFLINE_VARIABLES, Launcher, backend_environment
from gateway.settings import Settings
from tests.conftest import ROOT, Gateway, link_tree, write_model

API_KEY = "sk-offline-test-key"
#: What the workload serves, by model name: the three real default models and a tiny SD.
REAL_MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2", "whisper-base")
#: An address in TEST-NET-1 (RFC 5737): what the hook's own check tries to reach.
UNREACHABLE = ("192.0.2.1", 9)

#: System calls that name where data goes, as strace reports them.
TRACED_CALLS = "connect,sendto,sendmsg,sendmmsg"
#: Families that never leave the machine: unix sockets, and netlink (talking to the kernel).
LOCAL_FAMILIES = frozenset({"AF_UNIX", "AF_NETLINK", "AF_UNSPEC"})

#: Written as sitecustomize.py into a folder on PYTHONPATH: every Python process started
#: with it (the gateway, each backend) notes its start, then each socket call that could
#: reach or name another machine.
HOOK = """
import json, os, sys

_LOG = {log!r}
_NAMES = {names!r}
_CONNECTS = {{"socket.connect", "socket.sendto", "socket.sendmsg"}}
_LOOKUPS = {{
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"
}}


def _write(record):
    line = (json.dumps(record, default=repr) + "\\n").encode()
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _hook(event, args):
    if event not in _CONNECTS and event not in _LOOKUPS:
        return
    try:  # an exception here would fail the call itself
        record = {{"pid": os.getpid(), "event": event}}
        if event in _CONNECTS:
            record["family"] = int(args[0].family)
            record["address"] = args[1]
        else:
            record["args"] = list(args)
        _write(record)
    except Exception:
        pass


with open("/proc/self/cmdline", "rb") as _f:
    _argv = [part.decode(errors="replace") for part in _f.read().split(b"\\0") if part]
_write({{
    "pid": os.getpid(),
    "event": "start",
    "argv": _argv,
    "hearth_variables": sorted(k for k in os.environ if k.startswith("HEARTH_")),
    "offline_variables": {{k: os.environ.get(k) for k in _NAMES}},
}})
sys.addaudithook(_hook)
"""


def test_backends_get_no_gateway_secrets_and_the_offline_switches() -> None:
    gateway_env = {
        "PATH": "/usr/bin",
        "HEARTH_API_KEYS": "k1",
        "HEARTH_ADMIN_KEYS": "k2",
        "HEARTH_METRICS_KEYS": "k3",
        "HEARTH_KEYS_FILE": "/etc/hearth/keys.yaml",
        "HEARTH_API_KEY": "k4",
        "HEARTH_SOMETHING_NEW": "x",
        "HEARTH_BACKEND_TOKEN_FILE": "/etc/hearth/backend.token",
        "HEARTH_LOG_LEVEL": "DEBUG",
        "HF_HUB_OFFLINE": "0",  # the user's own choice wins
        "HF_TOKEN": "hf_secret",
        "GPU_BOX_TOKEN": "a remote backend's token",  # a backends.yaml `token_env`
    }
    env = backend_environment(gateway_env, withheld={"GPU_BOX_TOKEN"})
    assert {name for name in env if name.startswith("HEARTH_")} == {"HEARTH_LOG_LEVEL"}
    assert "HF_TOKEN" not in env
    assert "GPU_BOX_TOKEN" not in env
    assert env["PATH"] == "/usr/bin"
    assert env["HF_HUB_OFFLINE"] == "0"
    assert {name: env[name] for name in OFFLINE_VARIABLES if name != "HF_HUB_OFFLINE"} == {
        name: "1" for name in OFFLINE_VARIABLES if name != "HF_HUB_OFFLINE"
    }


def test_a_custom_backend_gets_its_own_env_and_a_leash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEARTH_API_KEYS", "gateway-key")
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # empty: not a choice
    custom = CustomBackend(
        name="mine",
        command=["{python}", "mine.py", "--address", "{address}"],
        env={"MINE_MODE": "fast", "HEARTH_API_KEYS": "its-own"},
    )
    launcher = Launcher(Settings())
    argv, env = launcher._command(ModelConfig(name="m", backend="mine"), custom, "unix:///s")
    assert argv[:3] == [sys.executable, "-I", "-S"]
    assert argv[3].endswith("leash.py")
    assert argv[4] == str(os.getpid())
    # It may ignore SIGTERM: SIGKILL ends it when the gateway dies.
    assert argv[5] == "KILL"
    assert argv[6:] == [sys.executable, "mine.py", "--address", "unix:///s"]
    assert env["MINE_MODE"] == "fast"
    assert env["HEARTH_API_KEYS"] == "its-own"  # what backends.yaml gives it, not the gateway's
    assert env["HF_HUB_OFFLINE"] == "1"


def test_a_builtin_backend_is_leashed_with_sigterm_and_started_with_safe_path() -> None:
    launcher = Launcher(Settings())
    argv, env = launcher._command(ModelConfig(name="m", backend="echo"), None, "unix:///s")
    # It stops cleanly on SIGTERM, and its working directory (the models dir) is not on its
    # sys.path: the project comes from PYTHONPATH.
    assert argv[5] == "TERM"
    assert argv[6:] == [sys.executable, "-P", "-m", "backends.echo", "--address", "unix:///s"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


def test_a_builtin_backend_imports_nothing_from_the_models_dir(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_model(models, "echo", "backend: echo")
    marker = tmp_path / "imported"
    # What a download could bring: a package named like ours, a folder importable as the
    # namespace package `evil_model`, and one a relative PYTHONPATH entry would name.
    for package in ("backends", "evil_model", "lib/evil_lib"):
        (models / package).mkdir(parents=True)
        (models / package / "__init__.py").write_text(
            f"open({str(marker)!r}, 'a').write({package!r})\n"
        )
    # An empty entry (the gateway's working directory) and a relative one, as people write.
    gateway = Gateway(models, env={"PYTHONPATH": f"{os.pathsep}lib"}).start()
    try:
        answer = httpx.post(
            f"{gateway.url}/v1/completions", json={"model": "echo", "prompt": "hi"}, timeout=30
        )
        assert answer.status_code == 200, answer.text + gateway.log()
        [pid] = gateway.backend_pids()
        # The backend's own interpreter, flags, environment and working directory: the
        # sys.path it has.
        proc = Path(f"/proc/{pid}")
        argv = proc.joinpath("cmdline").read_bytes().decode().split("\0")
        flags = argv[1 : argv.index("-m")]
        environ = proc.joinpath("environ").read_bytes().decode().split("\0")
        probes = {
            name: subprocess.run(
                [argv[0], *flags, "-c", f"import {name}"],
                cwd=proc.joinpath("cwd").resolve(),
                env=dict(entry.split("=", 1) for entry in environ if "=" in entry),
                capture_output=True,
                text=True,
                check=False,
            ).stderr
            for name in ("evil_model", "evil_lib")
        }
    finally:
        gateway.cleanup()
    assert not marker.exists(), f"imported from the models dir: {marker.read_text()}"
    for name, stderr in probes.items():
        assert f"No module named '{name}'" in stderr, stderr
    assert flags == ["-P"]


def _namespace_command() -> tuple[list[str], str | None]:
    """The unshare command that makes a network namespace here (as root; else inside a user
    namespace of our own), or why none can be made."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return [], "no unshare command (util-linux)"
    errors = []
    for command in ([unshare, "--net"], [unshare, "--user", "--map-root-user", "--net"]):
        probe = subprocess.run([*command, "true"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return command, None
        errors.append(f"{' '.join(command[1:])}: {probe.stderr.strip()}")
    return [], f"no network namespace can be made here ({'; '.join(errors)})"


def _strace() -> list[str]:
    """The strace command that records every process's socket calls; [] if it cannot run."""
    strace = shutil.which("strace")
    if strace is None:
        return []
    # -s 0: no payloads, so nothing a request carries can read as an address.
    command = [strace, "-f", "--seccomp-bpf", "-qq", "-s", "0", "-e", f"trace={TRACED_CALLS}"]
    command += ["-e", "signal=none"]
    probe = subprocess.run([*command, "-o", os.devnull, "true"], capture_output=True, check=False)
    return command if probe.returncode == 0 else []


def _traced_leaving(trace: str, control: int) -> list[str]:
    """strace lines (of any process but the control) that address anything but this machine."""
    leaving = []
    for line in trace.splitlines():
        pid, _, call = line.partition(" ")
        if not pid.isdigit() or int(pid) == control:
            continue
        families = set(re.findall(r"sa_family=(AF_\w+)", call))
        hosts = re.findall(r'inet_addr\("([^"]*)"\)', call)
        hosts += re.findall(r'inet_pton\(AF_INET6, "([^"]*)"', call)
        if families - LOCAL_FAMILIES - {"AF_INET", "AF_INET6"} or not all(
            _is_local_host(host) for host in hosts
        ):
            leaving.append(line)
    return leaving


def _install_model(source_dir: Path, name: str, target_dir: Path) -> None:
    """A gallery-installed model, its YAML and its files, linked into another models dir."""
    source = source_dir / f"{name}.yaml"
    model = yaml.safe_load(source.read_text())["model"]
    destination = target_dir / model
    destination.parent.mkdir(parents=True, exist_ok=True)
    if (source_dir / model).is_dir():
        link_tree(source_dir / model, destination)
    else:
        os.link(source_dir / model, destination)
    shutil.copy(source, target_dir / source.name)


@pytest.mark.real_model
def test_a_whole_workload_runs_offline_and_reaches_only_loopback(
    tmp_path: Path, real_models: Path, tiny_sd: Path
) -> None:
    namespace, why_not = _namespace_command()
    if why_not is not None:
        # In CI a skip would read as a pass, run after run: there it must be made to run.
        if os.environ.get("CI"):
            pytest.fail(f"{why_not} (CI is set: this test must run there)")
        pytest.skip(why_not)
    models = tmp_path / "models"
    models.mkdir()
    for name in REAL_MODELS:
        _install_model(real_models, name, models)
    link_tree(tiny_sd, models / "tiny-sd")
    write_model(models, "tiny-sd", "backend: diffusers\nmodel: tiny-sd\noptions: {steps: 2}")
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    audit_log = tmp_path / "audit.jsonl"
    names = sorted(OFFLINE_VARIABLES)
    (hook_dir / "sitecustomize.py").write_text(HOOK.format(log=str(audit_log), names=names))
    (tmp_path / "job.json").write_text(json.dumps({"models": str(models), "hook": str(hook_dir)}))

    # The gateway must set the offline switches itself.
    env = {name: value for name, value in os.environ.items() if name not in OFFLINE_VARIABLES}
    trace = tmp_path / "strace.log"
    strace = _strace()
    if strace:
        strace += ["-o", str(trace)]
    command = [sys.executable, "-m", "tests.test_offline", str(tmp_path)]
    workload = subprocess.run(
        [*namespace, "--", *strace, *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert workload.returncode == 0, workload.stdout + workload.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    records = [json.loads(line) for line in audit_log.read_text().splitlines()]
    starts = {r["pid"]: r for r in records if r["event"] == "start"}

    # The hook ran in the gateway and in every backend (the leash execs in place: same pid).
    assert result["gateway_pid"] in starts
    assert len(result["backend_pids"]) == 4
    for pid in result["backend_pids"]:
        assert pid in starts, f"no hook in backend {pid}"
        start = starts[pid]
        assert any(part.startswith("backends.") for part in start["argv"]), start
        # Nothing of the gateway's configuration but what backends read, no API key.
        assert set(start["hearth_variables"]) <= {"HEARTH_LOG_LEVEL", "HEARTH_UNDER_GATEWAY"}
        assert start["offline_variables"] == {name: "1" for name in names}
    assert "HEARTH_API_KEYS" in starts[result["gateway_pid"]]["hearth_variables"]

    # The hook's own check: it sees an attempt to leave, and the namespace stops it.
    control = result["control_pid"]
    assert result["control_errno"] in {101, 113}  # ENETUNREACH, EHOSTUNREACH
    assert [r["address"][0] for r in records if r["pid"] == control and "address" in r] == [
        UNREACHABLE[0]
    ]

    leaving = [r for r in records if r["pid"] != control and _leaves_the_machine(r)]
    assert leaving == []

    if strace:
        # Every process at the system-call level: the control's attempt is seen, nothing else.
        calls = trace.read_text()
        assert UNREACHABLE[0] in calls
        assert _traced_leaving(calls, control) == []


def _is_local_host(host: object) -> bool:
    if host in (None, "", b"", "localhost"):
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _leaves_the_machine(record: dict[str, Any]) -> bool:
    """A recorded call that tries to reach, or to look up, anything but this machine."""
    event = record["event"]
    if event == "start":
        return False
    if "family" in record:
        if record["family"] == socket.AF_UNIX:
            return False
        address = record["address"]
        host = address[0] if isinstance(address, list) else address
        return record["family"] not in (socket.AF_INET, socket.AF_INET6) or not _is_local_host(host)
    return not _is_local_host(record["args"][0])


# The workload, inside the namespace --------------------------------------------------------


def _loopback_up() -> None:
    """`ip link set lo up`, without needing iproute2."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, request))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def _tone_wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        samples = (
            int(8000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(int(rate * seconds))
        )
        out.writeframes(b"".join(struct.pack("<h", s) for s in samples))
    return buffer.getvalue()


def _control(hook: str) -> tuple[int, int]:
    """A process with the hook that tries to leave: its pid and the errno it got."""
    code = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection({UNREACHABLE!r}, timeout=2)\n"
        "except OSError as exc:\n"
        "    sys.exit(exc.errno or 1)\n"
    )
    env = {**os.environ, "PYTHONPATH": hook}
    process = subprocess.Popen([sys.executable, "-c", code], env=env)
    return process.pid, process.wait(30)


def _workload(directory: Path) -> None:
    job = json.loads((directory / "job.json").read_text())
    _loopback_up()
    path = os.environ.get("PYTHONPATH")
    hooked = job["hook"] + (os.pathsep + path if path else "")
    gateway = Gateway(Path(job["models"]), env={"PYTHONPATH": hooked, "HEARTH_API_KEYS": API_KEY})
    try:
        gateway.start(timeout=60)
        client = gateway.client(api_key=API_KEY, timeout=120)

        def chat() -> None:
            reply = client.chat.completions.create(
                model="smollm2-135m-instruct",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=12,
                temperature=0,
            )
            assert reply.choices[0].message.content

        def embed() -> None:
            vectors = client.embeddings.create(
                model="all-minilm-l6-v2", input=["a cat", "a dog"], encoding_format="float"
            )
            assert [len(item.embedding) for item in vectors.data] == [384, 384]

        def transcribe() -> None:
            client.audio.transcriptions.create(
                model="whisper-base", file=("tone.wav", _tone_wav(), "audio/wav")
            )

        def draw() -> None:
            image = client.images.generate(
                model="tiny-sd", prompt="a fox", size="64x64", response_format="b64_json"
            )
            assert image.data
            assert image.data[0].b64_json

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for future in [pool.submit(work) for work in (chat, embed, transcribe, draw)]:
                future.result()
        backend_pids = gateway.backend_pids()
        assert gateway.process is not None
        control_pid, control_errno = _control(job["hook"])
        result = {
            "gateway_pid": gateway.process.pid,
            "backend_pids": backend_pids,
            "control_pid": control_pid,
            "control_errno": control_errno,
        }
        (directory / "result.json").write_text(json.dumps(result))
    except BaseException:
        print(gateway.log(), file=sys.stderr)
        raise
    finally:
        gateway.cleanup()


if __name__ == "__main__":
    _workload(Path(sys.argv[1]))
