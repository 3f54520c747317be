"""Backend processes: the runtime dir, the command and environment, spawn, health-wait, load,
output, and stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import ssl
import sys
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Protocol

from google.protobuf import struct_pb2

from gateway.client import BackendClient, BackendTLS, backend_channel
from gateway.config import Catalog, CustomBackend, ModelConfig, RemoteTLS, resolve_model_path
from gateway.errors import OUTPUT_HEADING, OpenAIError
from gateway.manager.admission import Slots
from gateway.manager.instance import BackendInstance, Placed, State
from gateway.settings import Settings
from protos.hearth.backend.v1 import backend_pb2 as pb

log = logging.getLogger("hearth.manager")

_PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
#: Seconds a backend gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT_SECONDS = 8.0
#: The script every local backend is started through, so that it dies with the gateway.
LEASH = Path(__file__).resolve().parent / "leash.py"

#: The gateway's own variables that backends read. Every other HEARTH_* variable stays in the
#: gateway: API keys and key files, and whatever setting comes next (a backend that needs one
#: is given it here). HEARTH_BACKEND_TOKEN_FILE is not passed on either: a local backend
#: given it would refuse the gateway, which sends no token over its private socket.
BACKEND_VARIABLES = frozenset({"HEARTH_LOG_LEVEL", "HEARTH_UNDER_GATEWAY"})
#: Other secrets only the gateway uses (the gallery's downloads from the Hugging Face hub); a
#: custom backend that needs one gets it from its own `env:`.
GATEWAY_SECRETS = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})
#: Backends never reach the network unless the user's environment says otherwise: models are
#: files in the models dir (the gallery downloads, in the gateway). Honoured by
#: huggingface_hub, and through it transformers, diffusers and faster-whisper.
OFFLINE_VARIABLES = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
}


def backend_environment(
    gateway_env: Mapping[str, str], withheld: Collection[str] = ()
) -> dict[str, str]:
    """What a backend's environment starts from: the gateway's, less its secrets and settings
    (and the `withheld` variables), plus the offline switches the user did not set."""
    env = {
        name: value
        for name, value in gateway_env.items()
        if (not name.startswith("HEARTH_") or name in BACKEND_VARIABLES)
        and name not in GATEWAY_SECRETS
        and name not in withheld
    }
    for name, value in OFFLINE_VARIABLES.items():
        if not env.get(name):
            env[name] = value
    return env


def python_path(inherited: str | None) -> str:
    """PYTHONPATH for our backends: the project, then the gateway's own entries, made absolute
    as the gateway reads them. In a backend, whose working directory is the models dir, an
    empty or relative entry would name that dir (or a folder in it)."""
    entries = [str(_PROJECT_ROOT)]
    if inherited:
        entries += [os.path.abspath(entry) for entry in inherited.split(os.pathsep)]
    return os.pathsep.join(entries)


def token_variables(catalog: Catalog) -> frozenset[str]:
    """The gateway's environment variables that hold remote backends' tokens (`token_env` of
    backends.yaml entries and of static placements): secrets of the gateway's, which no local
    backend is given."""
    named = [backend.token_env for backend in catalog.backends.values()]
    for config in catalog.models.values():
        static = config.static_placement()
        named.append(static.token_env if static is not None else None)
    return frozenset(name for name in named if name)


def backend_command(
    backend: str,
    command: list[str] | None,
    command_env: Mapping[str, str],
    address: str,
    env: Mapping[str, str],
    options: Collection[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """How to start a backend listening on `address`, tied to this process by the leash: a
    built-in one (`python -m backends.<backend>`, then `options`), or a backends.yaml `command`
    (`{address}` and `{python}` filled in, its `command_env` over `env`). `env` is what its
    environment starts from (see `backend_environment`)."""
    env = {**env, "PYTHONUNBUFFERED": "1"}
    if command is None:
        env["PYTHONPATH"] = python_path(env.get("PYTHONPATH"))
        # -P: the working directory is the models dir, whose files must never be importable
        # (a gallery folder `x/y.py` would be the namespace package `x.y`); the project
        # comes from PYTHONPATH.
        argv = [sys.executable, "-P", "-m", f"backends.{backend}", "--address", address]
        # Our backends handle SIGTERM: a gateway that dies still gets them a clean unload.
        return leashed([*argv, *options], signal.SIGTERM), env
    values = {"address": address, "python": sys.executable}
    env.update(command_env)
    # A custom command may ignore SIGTERM (or trap it, as shells can): nothing else would end
    # it once the gateway is gone.
    return leashed([part.format_map(values) for part in command], signal.SIGKILL), env


def leashed(argv: list[str], death_signal: signal.Signals) -> list[str]:
    """`argv` started through the leash, which ties its life to this process: `death_signal`
    ends it when this process goes."""
    # -I: the leash needs nothing from PYTHON* variables or its own folder; -S: nor from
    # site-packages, and starts faster without them.
    name = death_signal.name.removeprefix("SIG")
    return [sys.executable, "-I", "-S", str(LEASH), str(os.getpid()), name, *argv]


class RemoteSettings(Protocol):
    """Where a remote backend's token and TLS settings come from (a backends.yaml `address:`
    entry, a static placement)."""

    token_file: str | None
    token_env: str | None

    def remote_tls(self) -> RemoteTLS | None: ...


def remote_credentials(
    custom: RemoteSettings, models_dir: Path, where: str | None = None
) -> tuple[str | None, BackendTLS | None]:
    """The token and TLS settings for reaching a remote backend, read from their files now,
    so that a changed token needs no restart (blocking: call it in a thread). `where` names
    the settings in errors (default: the backends.yaml entry's name)."""
    where = where or f"backend '{getattr(custom, 'name', '?')}' in backends.yaml"
    token = None
    if custom.token_file is not None:
        path = CustomBackend.file_path(models_dir, custom.token_file)
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise _misconfigured(where, f"cannot read its token_file {path}: {exc}") from None
        if not token:
            raise _misconfigured(where, f"its token_file {path} is empty")
    elif custom.token_env is not None:
        token = os.environ.get(custom.token_env, "").strip()
        if not token:
            raise _misconfigured(
                where, f"its token_env {custom.token_env} is not set in the gateway's environment"
            )
    settings = custom.remote_tls()
    if settings is None:
        return token, None
    if settings.ca is not None:
        path = CustomBackend.file_path(models_dir, settings.ca)
        try:
            roots: bytes | None = path.read_bytes()
        except OSError as exc:
            raise _misconfigured(where, f"cannot read its tls.ca {path}: {exc}") from None
    else:
        roots = system_roots()
    return token, BackendTLS(root_certificates=roots, server_name=settings.server_name)


def system_roots() -> bytes | None:
    """The system's trusted certificates (where a home CA is installed); None: gRPC's own."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate:
            with contextlib.suppress(OSError):
                return Path(candidate).read_bytes()
    return None


def _misconfigured(where: str, what: str) -> OpenAIError:
    return OpenAIError(
        500,
        f"{where}: {what}",
        code="backend_misconfigured",
        retry=False,
    )


def load_request_for(config: ModelConfig, models_dir: Path, threads: int = 0) -> pb.LoadRequest:
    """What the backend needs to load `config`'s model, computing with `threads` at most."""
    options = struct_pb2.Struct()
    options.update(config.options)
    request = pb.LoadRequest(
        model_name=config.name,
        model_path=str(resolve_model_path(models_dir, config.model)) if config.model else "",
        context_size=config.context_size or 0,
        threads=threads or config.threads or 0,
        batch_size=config.batch_size or 0,
        chat_template=config.chat_template or "",
        embeddings=config.embeddings,
        rerank=config.rerank,
        options=options,
        parallel=config.parallel or 0,
        tool_parser=config.tool_parser or "",
    )
    if config.mmap is not None:
        request.mmap = config.mmap
    if config.seed is not None:
        request.seed = config.seed
    return request


class Launcher:
    """Starts backends for models and stops them; owns the private runtime dir."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._runtime_dir: Path | None = None
        self._owns_runtime_dir = False
        self._socket_counter = 0
        #: Every process started and not yet reaped, whatever became of its start.
        self.processes: set[asyncio.subprocess.Process] = set()

    def open(self) -> None:
        """Make the runtime dir: the configured one, or a fresh private one."""
        if self.settings.runtime_dir is not None:
            self._runtime_dir = self.settings.runtime_dir
            self._runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._runtime_dir.chmod(0o700)
        else:
            base = os.environ.get("XDG_RUNTIME_DIR")
            if not base or not os.path.isdir(base):
                base = "/tmp"
            self._runtime_dir = Path(tempfile.mkdtemp(prefix="hearth-", dir=base))
            self._owns_runtime_dir = True

    async def close(self) -> None:
        """Stop what is left (starts cancelled half-way) and remove a runtime dir we made."""
        await asyncio.gather(*(terminate(p) for p in list(self.processes)))
        if self._owns_runtime_dir and self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)

    @property
    def runtime_dir(self) -> Path:
        assert self._runtime_dir is not None, "BackendManager.start() was not called"
        return self._runtime_dir

    @property
    def is_open(self) -> bool:
        return self._runtime_dir is not None

    def _next_address(self) -> tuple[str, Path]:
        self._socket_counter += 1
        path = self.runtime_dir / f"{self._socket_counter}.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return f"unix://{path}", path

    def _command(
        self,
        config: ModelConfig,
        custom: CustomBackend | None,
        address: str,
        withheld: Collection[str] = (),
    ) -> tuple[list[str], dict[str, str]]:
        env = backend_environment(os.environ, withheld)
        env["HEARTH_UNDER_GATEWAY"] = "1"  # its lines go to our log, which stamps them
        env.setdefault("HEARTH_LOG_LEVEL", self.settings.log_level.upper())
        command = custom.command if custom is not None else None
        return backend_command(config.backend, command, custom.env if custom else {}, address, env)

    async def spawn_process(
        self,
        config: ModelConfig,
        custom: CustomBackend | None,
        withheld: Collection[str] = (),
    ) -> Placed:
        """A new backend process for `config` on a private socket, not yet healthy; it gets
        none of the `withheld` variables of the gateway's environment."""
        address, _ = self._next_address()
        argv, env = self._command(config, custom, address, withheld)
        log.info("starting %s backend for %s", config.backend, config.name)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C on the gateway's terminal is ours to handle
                env=env,
                cwd=str(self.settings.models_dir) if self.settings.models_dir.is_dir() else None,
            )
        except OSError as exc:
            raise OpenAIError(
                500,
                f"cannot start backend '{config.backend}' for model '{config.name}': {exc}",
                code="backend_start_failed",
            ) from None
        self.processes.add(process)
        return Placed(address=address, process=process)

    def instance(self, config: ModelConfig, placed: Placed, replica: int = 0) -> BackendInstance:
        """The gateway's view of a placed backend, with a channel to it."""
        channel = backend_channel(placed.address, placed.tls)
        return BackendInstance(
            config=config,
            address=placed.address,
            client=BackendClient(channel, config.name, self.settings.request_timeout, placed.token),
            process=placed.process,
            slots=Slots(config.max_concurrency or 1, config.max_queue),
            replica=replica,
            node=placed.node,
        )

    async def spawn(
        self,
        config: ModelConfig,
        custom: CustomBackend | None,
        withheld: Collection[str] = (),
    ) -> BackendInstance:
        """A new local backend process for `config`, not yet healthy (tools that measure one
        model alone use it; the manager goes through its placers)."""
        return self.instance(config, await self.spawn_process(config, custom, withheld))

    async def wait_healthy(self, instance: BackendInstance) -> None:
        """Until the backend answers health checks; its exit or the deadline is an error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.backend_start_timeout
        socket_path = None
        if instance.address.startswith("unix://") and instance.local:
            socket_path = Path(instance.address.removeprefix("unix://"))
        while True:
            if instance.process is not None and instance.process.returncode is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(instance.process.wait(), 1.0)
                how = describe_exit(instance.process.returncode)
                raise start_failure(instance, f"{how} while starting")
            listening = socket_path is None or socket_path.exists()
            if listening and await instance.client.healthy(timeout=1.0):
                return
            if loop.time() > deadline:
                what = f"did not become healthy within {self.settings.backend_start_timeout:g} s"
                if not instance.local and instance.client.last_health_failure:
                    what += f" ({instance.client.last_health_failure})"
                raise start_failure(instance, what)
            await asyncio.sleep(0.02)

    async def load(self, instance: BackendInstance, request: pb.LoadRequest) -> pb.LoadResponse:
        """Load the model into a healthy backend and learn what it serves."""
        instance.state = State.LOADING
        try:
            response = await instance.client.load(request, timeout=self.settings.load_timeout)
        except OpenAIError as exc:
            raise start_failure(instance, f"failed to load: {exc.message}") from None
        instance.capabilities = await instance.client.capabilities()
        return response

    async def pump_output(self, instance: BackendInstance) -> None:
        """Keep the backend's last lines for error messages and pass them to our log."""
        assert instance.process is not None
        assert instance.process.stdout is not None
        logger = logging.getLogger(f"hearth.backend.{instance.config.name}")
        async for raw in instance.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            instance.output.append(line)
            logger.info("%s", line)

    async def stop(self, instance: BackendInstance) -> None:
        """End the backend: its process (SIGTERM, then SIGKILL), or a remote one's model (a
        placer that started more, a Ray actor, ends that itself)."""
        instance.deliberate_stop = True
        instance.dead = True
        instance.state = State.STOPPED
        if instance.process is not None:
            await terminate(instance.process)
            self.processes.discard(instance.process)
        else:
            with contextlib.suppress(OpenAIError):
                await instance.client.unload()
        await instance.client.channel.close()


def describe_exit(code: int | None) -> str:
    """How a process ended, in words: "was killed by SIGSEGV", "exited with code 3"."""
    if code is None:
        return "went away"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def start_failure(instance: BackendInstance, what: str) -> OpenAIError:
    """A failed start, with the backend's last output lines."""
    config = instance.config
    message = f"the {config.backend} backend for model '{config.name}' {what}"
    output = instance.recent_output()
    if output:
        message += f"{OUTPUT_HEADING}{output}"
    # Not worth an SDK's automatic retry: the server itself tries again (see the backoff).
    return OpenAIError(500, message, code="backend_start_failed", retry=False)


async def terminate(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_SECONDS."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
