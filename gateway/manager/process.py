"""Backend processes: the runtime dir, the command and environment, spawn, health-wait, load,
output, and stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import grpc
from google.protobuf import struct_pb2

from gateway.client import CHANNEL_OPTIONS, BackendClient
from gateway.config import CustomBackend, ModelConfig, resolve_model_path
from gateway.errors import OpenAIError
from gateway.manager.admission import Slots
from gateway.manager.instance import BackendInstance, State
from gateway.settings import Settings
from protos.hearth.backend.v1 import backend_pb2 as pb

log = logging.getLogger("hearth.manager")

_PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
#: Seconds a backend gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT_SECONDS = 8.0


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
        options=options,
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
        self, config: ModelConfig, custom: CustomBackend | None, address: str
    ) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["HEARTH_UNDER_GATEWAY"] = "1"
        env.setdefault("HEARTH_LOG_LEVEL", self.settings.log_level.upper())
        if custom is None:
            path = env.get("PYTHONPATH")
            env["PYTHONPATH"] = f"{_PROJECT_ROOT}{os.pathsep}{path}" if path else str(_PROJECT_ROOT)
            return [sys.executable, "-m", f"backends.{config.backend}", "--address", address], env
        assert custom.command is not None
        values = {"address": address, "python": sys.executable}
        argv = [part.format_map(values) for part in custom.command]
        env.update(custom.env)
        return argv, env

    async def spawn(self, config: ModelConfig, custom: CustomBackend | None) -> BackendInstance:
        """A new backend for `config` (a process, or a remote address), not yet healthy."""
        if custom is not None and custom.address is not None:
            address, process = custom.address, None
        else:
            address, _ = self._next_address()
            argv, env = self._command(config, custom, address)
            log.info("starting %s backend for %s", config.backend, config.name)
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C on the gateway's terminal is ours to handle
                    env=env,
                    cwd=str(self.settings.models_dir)
                    if self.settings.models_dir.is_dir()
                    else None,
                )
            except OSError as exc:
                raise OpenAIError(
                    500,
                    f"cannot start backend '{config.backend}' for model '{config.name}': {exc}",
                    code="backend_start_failed",
                ) from None
            self.processes.add(process)
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return BackendInstance(
            config=config,
            address=address,
            client=BackendClient(channel, config.name, self.settings.request_timeout),
            process=process,
            slots=Slots(config.max_concurrency, config.max_queue),
        )

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
                raise start_failure(
                    instance,
                    f"did not become healthy within {self.settings.backend_start_timeout:g} s",
                )
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
        """End the backend: its process (SIGTERM, then SIGKILL), or a remote one's model."""
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


#: What separates an error's message from the backend's last output lines.
OUTPUT_HEADING = "\nlast backend output:\n"


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
