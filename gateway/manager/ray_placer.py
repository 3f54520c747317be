"""Replicas on a Ray cluster (`placement: ray`, the `ray` extra).

Each replica is a detached, named Ray actor (`hearth/<model>/<replica>` in the `hearth`
namespace), placed by the resources its YAML asks for. The actor starts the model's backend,
unchanged, as a process on its node: bound to the node's address on a free port, answering
only calls that carry the gateway's token, and tied to the actor's life (the leash). When
the backend exits the actor exits too, and Ray starts it again, on any node with the
resources, up to `max_restarts` times, each restart after the first waiting longer (0.5 s, 1 s,
2 s, ... 8 s).
A replica whose backend stopped answering and is gone from its address (its actor restarted, or
its port closed) is placed again (`moved`): the gateway asks the actor for its new address.

Every Ray node must see the models dir at the gateway's path and have Hearth (with the
model's backend) installed; the gateway's machine must be a node of the cluster (a driver
needs a local raylet: `ray start --address=<head> --num-cpus=0` there).

Ray must not phone home: its usage statistics are off and their report, and the report that
they are off, go to a local sink, in this process and in every actor, unless the user's
environment says otherwise. The cluster's own processes (started with `ray start`) take their
settings from the environment they were started in: see the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from gateway.client import BackendTLS
from gateway.config import CustomBackend, ModelConfig, RayPlacement, RayTLS
from gateway.errors import OUTPUT_HEADING, OpenAIError
from gateway.manager.instance import BackendInstance, Placed
from gateway.manager.placement import Placer
from gateway.manager.process import (
    OFFLINE_VARIABLES,
    STOP_TIMEOUT_SECONDS,
    backend_command,
    backend_environment,
    describe_exit,
    system_roots,
)
from gateway.settings import Settings
from protos.hearth.backend.v1.contract import TOKEN_FILE_ENV

#: Set before Ray is imported, here and in the actors. Ray reports usage (and, with usage
#: off, that it is off) to a server of its own unless told where else; the local discard
#: port takes both.
QUIET_RAY_VARIABLES = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
}
for _name, _value in QUIET_RAY_VARIABLES.items():
    if not os.environ.get(_name):
        os.environ[_name] = _value

import ray  # noqa: E402
import ray.exceptions  # noqa: E402

log = logging.getLogger("hearth.manager.ray")

#: The Ray namespace of every actor the gateway places.
NAMESPACE = "hearth"
#: The second restart of an actor waits this long, each next one twice as long, up to the cap.
RESTART_DELAY_SECONDS = 0.5
RESTART_DELAY_MAX_SECONDS = 8.0
#: Lines of a backend's output an actor keeps for error messages.
OUTPUT_LINES = 40
#: Seconds an ended actor's name takes to become free for a new one.
_NAME_RELEASE_SECONDS = 10.0


def actor_name(model: str, replica: int) -> str:
    """The Ray name of a replica's actor."""
    return f"hearth/{model}/{replica}"


def restart_delay(restarts: int) -> float:
    """Seconds a restarted actor waits before it starts its backend: none at its first start
    and first restart (a backend that died once is started again at once, as the manager does
    with a local one), then 0.5 s, 1 s, 2 s ... up to the cap."""
    if restarts <= 1:
        return 0.0
    return min(RESTART_DELAY_SECONDS * 2 ** (restarts - 2), RESTART_DELAY_MAX_SECONDS)


@dataclass
class ReplicaSpec:
    """What a replica's actor runs: everything but its token is fixed at its creation."""

    model: str
    replica: int
    #: A built-in backend's name (`python -m backends.<backend>`), or
    backend: str
    #: a backends.yaml `command` (argv with `{address}` and `{python}`) and its `env`.
    command: list[str] | None
    command_env: dict[str, str]
    #: The gateway's variables no backend may get (not compared: adding a token variable to
    #: another model's YAML is no reason to replace running actors).
    withheld: list[str] = field(compare=False)
    #: The backend's working directory: the gateway's models dir, at the same path here.
    models_dir: str
    log_level: str
    start_timeout: float
    #: The certificate and key its backend serves TLS with (paths on the node), if any.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: The YAML's resources, compared when a running actor is found (not used by it).
    placement: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Running:
    """One backend process of an actor's, and whether its end is the actor's doing."""

    process: subprocess.Popen[bytes]
    token: str = field(repr=False)
    address: str = ""
    #: Listening: from now on its exit ends the actor (before, its start fails instead).
    armed: bool = False
    deliberate: bool = False
    ended: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ReplicaActor:
    """The Ray actor of one replica: it runs the replica's backend on its node and lives as
    long as the backend does (made a Ray actor by `ray.remote` in the placer)."""

    def __init__(self, spec: ReplicaSpec, token: str) -> None:
        self.spec = spec
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES)
        self.running: _Running | None = None
        self.restarts = _restart_count()
        delay = restart_delay(self.restarts)
        if delay:
            _say(f"restart {self.restarts} of {actor_name(spec.model, spec.replica)}: {delay:g} s")
            time.sleep(delay)
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.node_name = self.node_ip
        with contextlib.suppress(Exception):  # a name only to show; the IP will do
            for node in ray.nodes():
                if node.get("NodeID") == self.node_id and node.get("NodeName"):
                    self.node_name = node["NodeName"]
        if not Path(spec.models_dir).is_dir():
            raise RuntimeError(
                f"the models dir {spec.models_dir} is not on Ray node {self.node_name} "
                f"({self.node_ip}): every node must see it at the gateway's path"
            )
        self._start(token)

    def serve(self, token: str) -> dict[str, Any]:
        """Where its backend listens, for callers with `token` (a backend started with another
        token, by an earlier gateway, is started again with this one)."""
        running = self.running
        if running is not None and running.process.poll() is not None:
            # Its exit is being handled (the actor ends, and Ray restarts it): this call is
            # tried again on the restarted actor.
            os._exit(1)
        if running is None or running.token != token:
            self._stop()
            self._start(token)
            running = self.running
            assert running is not None
        return {
            "address": running.address,
            "pid": running.process.pid,
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "node_name": self.node_name,
            "restarts": self.restarts,
            "spec": self.spec,
        }

    def stop(self) -> None:
        """End its backend (the placer then ends the actor, for good)."""
        self._stop()

    def _start(self, token: str) -> None:
        host = self.node_ip
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        folder = Path(tempfile.mkdtemp(prefix="hearth-ray-"))
        token_file = folder / "token"
        descriptor = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(token)
        argv, env = self._command(address, token_file)
        started: list[_Running | BaseException] = []
        ready = threading.Event()
        # The keeper thread starts the process and outlives it: the leash's parent-death
        # signal fires when the thread that started the process ends, and Ray may run this
        # actor's calls on threads that end sooner.
        keeper = threading.Thread(
            target=self._keep,
            args=(argv, env, token, address, started, ready),
            name="hearth-backend",
            daemon=True,
        )
        keeper.start()
        ready.wait()
        outcome = started[0]
        if isinstance(outcome, BaseException):
            _remove(folder)
            raise RuntimeError(f"cannot start {argv[0]!r}: {outcome}")
        self.running = outcome
        try:
            self._wait_listening(outcome, host, port)
        finally:
            _remove(folder)  # the backend has read it (or will never need it)

    def _command(self, address: str, token_file: Path) -> tuple[list[str], dict[str, str]]:
        spec = self.spec
        env = backend_environment(os.environ, spec.withheld)
        # The backend is no Ray process: Ray's settings (its cluster token, say) stay here.
        env = {name: value for name, value in env.items() if not name.startswith("RAY_")}
        env.setdefault("HEARTH_LOG_LEVEL", spec.log_level.upper())
        options = ["--token-file", str(token_file)]
        if spec.tls_cert is not None and spec.tls_key is not None:
            options += ["--tls-cert", spec.tls_cert, "--tls-key", spec.tls_key]
        argv, env = backend_command(
            spec.backend, spec.command, spec.command_env, address, env, options
        )
        if spec.command is not None:
            # Hearth's backend runtime reads its token file from here (a command has no
            # --token-file of ours).
            env[TOKEN_FILE_ENV] = str(token_file)
        return argv, env

    def _keep(
        self,
        argv: list[str],
        env: dict[str, str],
        token: str,
        address: str,
        started: list[_Running | BaseException],
        ready: threading.Event,
    ) -> None:
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.spec.models_dir,
                start_new_session=True,
            )
        except OSError as exc:
            started.append(exc)
            ready.set()
            return
        running = _Running(process=process, token=token, address=address)
        started.append(running)
        ready.set()
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.output.append(line)
            _say(line)
        code = process.wait()
        running.ended.set()
        with running.lock:
            if running.deliberate or not running.armed:
                return
        _say(f"the backend {describe_exit(code)}; the actor ends so that Ray restarts it")
        sys.stderr.flush()
        os._exit(1)  # an unexpected exit: Ray restarts the actor while restarts are left

    def _wait_listening(self, running: _Running, host: str, port: int) -> None:
        deadline = time.monotonic() + self.spec.start_timeout
        while True:
            if running.process.poll() is not None:
                # A backend that cannot start is an error of the actor's start, which Ray
                # does not retry: no restart loop.
                running.ended.wait(5)
                how = describe_exit(running.process.returncode)
                raise RuntimeError(f"the backend {how} while starting{self._recent_output()}")
            with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
                with running.lock:
                    if running.process.poll() is None:
                        running.armed = True
                        return
                continue
            if time.monotonic() > deadline:
                self._stop()
                raise RuntimeError(
                    f"the backend did not listen on {host}:{port} within "
                    f"{self.spec.start_timeout:g} s{self._recent_output()}"
                )
            time.sleep(0.05)

    def _stop(self) -> None:
        running, self.running = self.running, None
        if running is None:
            return
        running.deliberate = True
        process = running.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        running.ended.wait(5)

    def _recent_output(self) -> str:
        lines = list(self.output)[-12:]
        return f"{OUTPUT_HEADING}" + "\n".join(lines) if lines else ""


def _say(line: str) -> None:
    """A line in the actor's log (Ray keeps it on the node)."""
    print(line, file=sys.stderr, flush=True)


def _remove(folder: Path) -> None:
    for entry in folder.iterdir():
        with contextlib.suppress(OSError):
            entry.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _restart_count() -> int:
    """How many times Ray has restarted the calling actor."""
    context = ray.get_runtime_context()
    try:
        # The same look-up as `was_current_actor_reconstructed`, which gives only a yes/no.
        from ray._private.state import actors

        info = actors(actor_id=context.get_actor_id())
        return int(info.get("NumRestarts", 0)) if info else 0
    except Exception:
        return 1 if context.was_current_actor_reconstructed else 0


def _actor_info(actor_id: str) -> dict[str, Any]:
    """The GCS's record of an actor (state, restarts, death cause); {} if unknown."""
    try:
        from ray._private.state import actors

        return dict(actors(actor_id=actor_id) or {})
    except Exception:
        return {}


@dataclass
class _Actor:
    """A replica's actor, as this gateway placed (or found) it."""

    name: str
    handle: Any
    #: What it runs (None for one found by name only, at close).
    spec: ReplicaSpec | None = None
    #: Where its backend listened, and the actor's restarts, when it was last placed.
    address: str = ""
    restarts: int = 0


class RayPlacer(Placer):
    """A detached Ray actor per replica, which runs the backend on its node; reached with a
    token made for this gateway."""

    kind = "ray"
    local = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._token = secrets.token_urlsafe(32)
        self._actors: dict[tuple[str, int], _Actor] = {}
        #: Every actor name this gateway asked Ray for: at close, those still alive end too
        #: (a start cancelled half-way may have made one that `_actors` never held).
        self._names: set[str] = set()
        self._connecting: asyncio.Future[None] | None = None
        #: Actors being ended: a new placing of the replica waits, rather than find the dying
        #: actor by its name.
        self._ending: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._actor_class: Any = None

    async def place(
        self,
        config: ModelConfig,
        replica: int,
        custom: CustomBackend | None,
        withheld: Collection[str] = (),
    ) -> Placed:
        placement = config.ray_placement()
        assert placement is not None
        deadline = time.monotonic() + self.settings.backend_start_timeout
        where = f"replica {replica + 1} of model '{config.name}' on Ray"
        if custom is not None and custom.command is None:
            raise _failure(where, f"backend '{custom.name}' is an address, not a command to run")
        if custom is not None and placement.tls is not None:
            raise _failure(
                where, f"placement.ray.tls is for Hearth's own backends, not '{custom.name}'"
            )
        tls = None
        if placement.tls is not None:
            tls = await asyncio.to_thread(self._tls, placement.tls, where)
        await self._connect(where, deadline)
        spec = self._spec(config, replica, custom, withheld, placement)
        key = (config.name, replica)
        ending = self._ending.get(key)
        if ending is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(ending), _left(deadline))
        actor = self._actors.get(key)
        if actor is not None and actor.spec != spec:
            await self._end(actor)  # its YAML changed since it was placed
            actor = None
        if actor is None:
            actor = await self._create(spec, placement, where)
            self._actors[key] = actor
        info = await self._serve(actor, where, deadline)
        if spec != info["spec"]:
            # An actor of an earlier gateway, made from another YAML: made again from this one.
            log.info("%s: its actor was made from another YAML; making it again", actor.name)
            await self._end(actor)
            actor = await self._create(spec, placement, where)
            self._actors[key] = actor
            info = await self._serve(actor, where, deadline)
        actor.address, actor.restarts = info["address"], int(info["restarts"])
        node = f"{info['node_name']} (ray node {info['node_id'][:12]})"
        if info["restarts"]:
            log.info("%s runs on %s after %d restart(s)", actor.name, node, info["restarts"])
        return Placed(address=info["address"], token=self._token, tls=tls, node=node)

    def _tls(self, settings: RayTLS, where: str) -> BackendTLS:
        """How the gateway checks the backends' certificates (blocking: in a thread)."""
        roots = None
        if settings.ca is not None:
            path = CustomBackend.file_path(self.settings.models_dir, settings.ca)
            try:
                roots = path.read_bytes()
            except OSError as exc:
                raise _failure(where, f"cannot read placement.ray.tls.ca {path}: {exc}") from None
        else:
            roots = system_roots()
        return BackendTLS(root_certificates=roots, server_name=settings.server_name)

    async def moved(self, instance: BackendInstance) -> bool:
        """Its actor restarted or is gone, or nothing listens at its backend's address any
        more (the backend died; its actor is about to end and restart). A backend that is only
        slow to answer (busy, or paused) still accepts connections: it stays, out of rotation
        until it answers."""
        actor = self._actors.get(instance.key)
        if actor is None or actor.address != instance.address:
            return True
        info = await asyncio.to_thread(_actor_info, actor.handle._actor_id.hex())
        if info.get("State") != "ALIVE" or int(info.get("NumRestarts", 0)) != actor.restarts:
            return True
        host, _, port = instance.address.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), 1.0
            )
        except OSError:
            return True  # refused: nothing listens there
        except TimeoutError:
            return False
        writer.close()
        return False

    async def release(self, instance: BackendInstance) -> None:
        actor = self._actors.pop(instance.key, None)
        if actor is None:
            return
        key = instance.key
        ending = asyncio.ensure_future(self._end(actor))
        self._ending[key] = ending

        def ended(future: asyncio.Future[None]) -> None:
            if self._ending.get(key) is future:
                del self._ending[key]

        ending.add_done_callback(ended)
        await asyncio.shield(ending)

    async def close(self) -> None:
        pending = list(self._ending.values())
        await asyncio.gather(*pending, return_exceptions=True)
        actors, self._actors = list(self._actors.values()), {}
        await asyncio.gather(*(self._end(actor) for actor in actors), return_exceptions=True)
        if not ray.is_initialized():  # never joined (Ray would start a cluster of its own)
            return
        others = sorted(self._names - {actor.name for actor in actors})
        handles = await asyncio.gather(*(asyncio.to_thread(_named, n) for n in others))
        ends = [self._end(_Actor(name, h)) for name, h in zip(others, handles, strict=True) if h]
        await asyncio.gather(*ends, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(ray.shutdown)
        self._connecting = None

    # Connecting ------------------------------------------------------------------------------

    async def _connect(self, where: str, deadline: float) -> None:
        """Join the cluster once (ray.init blocks: in a thread, shared by every caller)."""
        address = self.settings.ray_address
        if not address:
            raise _failure(
                where, "HEARTH_RAY_ADDRESS is not set (the Ray cluster's address, host:port)"
            )
        if self._connecting is None or (
            self._connecting.done() and self._connecting.exception() is not None
        ):
            self._connecting = asyncio.ensure_future(asyncio.to_thread(self._init, address))
        try:
            await asyncio.wait_for(asyncio.shield(self._connecting), _left(deadline))
        except TimeoutError:
            raise _failure(where, f"cannot reach the Ray cluster at {address} yet") from None
        except Exception as exc:
            raise _failure(where, f"cannot join the Ray cluster at {address}: {exc}") from None

    def _init(self, address: str) -> None:
        if ray.is_initialized():
            return
        ray.init(
            address=address,
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        log.info("joined the Ray cluster at %s", address)

    # Actors ----------------------------------------------------------------------------------

    def _spec(
        self,
        config: ModelConfig,
        replica: int,
        custom: CustomBackend | None,
        withheld: Collection[str],
        placement: RayPlacement,
    ) -> ReplicaSpec:
        return ReplicaSpec(
            model=config.name,
            replica=replica,
            backend=config.backend,
            command=list(custom.command) if custom is not None and custom.command else None,
            command_env=dict(custom.env) if custom is not None else {},
            withheld=sorted(withheld),
            models_dir=str(self.settings.models_dir.resolve()),
            log_level=self.settings.log_level,
            start_timeout=self.settings.backend_start_timeout,
            tls_cert=self._node_path(placement.tls.cert) if placement.tls else None,
            tls_key=self._node_path(placement.tls.key) if placement.tls else None,
            placement=msgspec.to_builtins(placement),
        )

    def _node_path(self, value: str) -> str:
        """A file named in the YAML, as the nodes see it: absolute, or in the models dir."""
        models_dir = self.settings.models_dir.resolve()
        return str(CustomBackend.file_path(models_dir, value))

    async def _create(self, spec: ReplicaSpec, placement: RayPlacement, where: str) -> _Actor:
        name = actor_name(spec.model, spec.replica)
        # The actor's variables on its node: Ray's quiet settings (as this process has them)
        # and the offline switches.
        env = {**OFFLINE_VARIABLES, **{k: os.environ[k] for k in QUIET_RAY_VARIABLES}}
        options: dict[str, Any] = {
            "name": name,
            "namespace": NAMESPACE,
            "lifetime": "detached",
            "get_if_exists": True,
            "max_restarts": placement.max_restarts,
            # A call that meets a restarting actor waits for it (bounded by the restarts).
            "max_task_retries": placement.max_restarts,
            "num_cpus": placement.num_cpus,
            "num_gpus": placement.num_gpus,
            "runtime_env": {"env_vars": env},
        }
        if placement.resources:
            options["resources"] = dict(placement.resources)
        memory = placement.memory_bytes()
        if memory is not None:
            options["memory"] = memory

        self._names.add(name)

        def create() -> Any:
            if self._actor_class is None:
                self._actor_class = ray.remote(ReplicaActor)
            return self._actor_class.options(**options).remote(spec, self._token)

        try:
            handle = await asyncio.to_thread(create)
        except Exception as exc:  # options Ray refuses (a resource named CPU, say)
            raise _failure(where, f"Ray refused its actor: {exc}") from None
        return _Actor(name=name, handle=handle, spec=spec)

    async def _serve(self, actor: _Actor, where: str, deadline: float) -> dict[str, Any]:
        """The actor's backend's address, once it listens (waiting through its restarts)."""
        try:
            while True:
                try:
                    reply = await asyncio.wait_for(
                        _awaitable(actor.handle.serve.remote(self._token)), _left(deadline)
                    )
                    return dict(reply)
                except ray.exceptions.ActorUnavailableError:
                    await asyncio.sleep(0.2)  # restarting, or its node unreachable a while
        except TimeoutError:
            info = await asyncio.to_thread(_actor_info, actor.handle._actor_id.hex())
            raise _failure(where, self._late(actor, info)) from None
        except ray.exceptions.RayActorError as exc:
            # Dead after its restarts: the next placing makes a new actor (when the manager's
            # backoff after failures allows).
            self._forget(actor)
            info = await asyncio.to_thread(_actor_info, actor.handle._actor_id.hex())
            why, output = _death(info, exc)
            raise _failure(where, why, output) from None
        except ray.exceptions.RayError as exc:
            # An actor that cannot answer (one of another Hearth version, say): made afresh
            # at the next placing.
            self._forget(actor)
            await self._end(actor)
            raise _failure(where, f"its actor failed: {_first_line(exc)}") from None

    def _forget(self, actor: _Actor) -> None:
        if actor.spec is not None:
            key = (actor.spec.model, actor.spec.replica)
            if self._actors.get(key) is actor:
                del self._actors[key]

    def _late(self, actor: _Actor, info: dict[str, Any]) -> str:
        """Why an actor's backend is not listening after the start timeout, in words."""
        seconds = f"{self.settings.backend_start_timeout:g} s"
        state = str(info.get("State", "unknown"))
        if state == "ALIVE" or info.get("Pid"):  # on a node, slow to start its backend
            return f"its backend did not listen within {seconds} (its actor is still starting it)"
        placement = actor.spec.placement if actor.spec is not None else {}
        asks = {k: v for k, v in placement.items() if k != "max_restarts" and v}
        return (
            f"no Ray node with the resources it asks for ({asks}) took it within {seconds} "
            f"(its actor is {_words(state)}; Ray places it when such a node has room)"
        )

    async def _end(self, actor: _Actor) -> None:
        """End an actor for good: its backend first (it unloads on SIGTERM), then the actor,
        which Ray does not restart."""
        info = await asyncio.to_thread(_actor_info, actor.handle._actor_id.hex())
        if info.get("State") == "ALIVE":  # a pending or dead one has no backend to stop
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    _awaitable(actor.handle.stop.remote()), STOP_TIMEOUT_SECONDS + 5
                )
        try:
            await asyncio.to_thread(ray.kill, actor.handle, no_restart=True)
        except Exception as exc:
            log.warning("cannot end Ray actor %s: %s", actor.name, exc)
            return
        # Until Ray frees its name, a new actor of that name would be this one, dead.
        deadline = time.monotonic() + _NAME_RELEASE_SECONDS
        while time.monotonic() < deadline:
            if await asyncio.to_thread(_named, actor.name) is None:
                break
            await asyncio.sleep(0.05)
        log.info("%s: actor ended", actor.name)


async def _awaitable(reference: Any) -> Any:
    return await reference


def _named(name: str) -> Any:
    """The live actor that holds `name`, or None."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def _words(state: str) -> str:
    return state.lower().replace("_", " ")


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _death(info: dict[str, Any], exc: BaseException) -> tuple[str, str]:
    """Why an actor is dead, in a line (its restarts and the cause Ray recorded), and its
    backend's last output where the actor's start failed."""
    restarts = info.get("NumRestarts")
    after = f" after {restarts} restart(s)" if restarts else ""
    cause, output = _first_line(exc), ""
    text = str(exc)
    if "RuntimeError: " in text:  # the actor's own words: a backend that could not start
        cause, _, output = text.rsplit("RuntimeError: ", 1)[1].partition(OUTPUT_HEADING)
    return f"its Ray actor is dead{after}: {cause.strip()}", output.strip()


def _failure(where: str, why: str, output: str = "") -> OpenAIError:
    message = f"{where}: {why}"
    if output:
        message += f"{OUTPUT_HEADING}{output}"
    return OpenAIError(500, message, code="backend_start_failed", retry=False)
