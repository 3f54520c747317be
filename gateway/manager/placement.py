"""Where a model's backends run: one interface, a placer per kind of `placement:`.

- `local`: processes of the gateway's, on this machine (their memory and cores are the budget's)
- `static`: addresses that something else keeps running (Kubernetes, compose, systemd); the
  gateway only loads the model into them, checks them and routes to them
- `ray`: detached actors on a Ray cluster (`gateway.manager.ray_placer`, the `ray` extra)

A placer puts one replica's backend somewhere and says how to reach it (`Placed`); the manager
does the rest the same way whatever the placer: health-wait, load, route, health-check, stop.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Collection
from typing import ClassVar

from gateway.config import CustomBackend, ModelConfig
from gateway.errors import OpenAIError
from gateway.manager.instance import BackendInstance, Placed
from gateway.manager.process import Launcher, remote_credentials, terminate
from gateway.settings import Settings

#: Seconds a remote backend gets to unload its model when the gateway lets it go.
RELEASE_TIMEOUT_SECONDS = 5.0


class Placer(abc.ABC):
    """Puts a model's replicas' backends somewhere and ends what it started."""

    #: The `placement:` kind it serves.
    kind: ClassVar[str]
    #: Its backends are processes on this machine: their memory and cores count in the budget.
    local: ClassVar[bool] = False

    @abc.abstractmethod
    async def place(
        self,
        config: ModelConfig,
        replica: int,
        custom: CustomBackend | None,
        withheld: Collection[str] = (),
    ) -> Placed:
        """Start (or find) replica `replica` of `config`'s model: addressable, maybe not yet
        healthy. `custom`: its backends.yaml entry, for a custom backend. `withheld`: the
        gateway's variables no process it starts may get. Raises OpenAIError
        (`backend_start_failed`) when it cannot."""

    async def moved(self, instance: BackendInstance) -> bool:
        """Whether a replica that failed a health check is gone from where it was placed (a
        restarted Ray actor runs a new backend elsewhere): then the manager places it again,
        rather than keep checking the old address until it answers."""
        return False

    async def release(self, instance: BackendInstance) -> None:
        """End what `place` started. By default the backend is someone else's: its model is
        unloaded, and it stays up."""
        # Briefly: a backend that cannot be reached must not hold up a stop or a failed start.
        with contextlib.suppress(OpenAIError, TimeoutError):
            await asyncio.wait_for(instance.client.unload(), RELEASE_TIMEOUT_SECONDS)

    async def close(self) -> None:  # noqa: B027 (most placers have nothing left to end)
        """The gateway is stopping: end whatever is left."""


class LocalPlacer(Placer):
    """A process per replica on this machine, on a private unix socket, dying with the
    gateway (or the backends.yaml `address:` of a custom backend someone else runs)."""

    kind = "local"
    local = True

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher

    async def place(
        self,
        config: ModelConfig,
        replica: int,
        custom: CustomBackend | None,
        withheld: Collection[str] = (),
    ) -> Placed:
        if custom is not None and custom.address is not None:
            models_dir = self.launcher.settings.models_dir
            token, tls = await asyncio.to_thread(remote_credentials, custom, models_dir)
            return Placed(address=custom.address, token=token, tls=tls, node=custom.address)
        return await self.launcher.spawn_process(config, custom, withheld)

    async def release(self, instance: BackendInstance) -> None:
        if instance.process is None:  # a backends.yaml address: someone else's
            await super().release(instance)
            return
        await terminate(instance.process)
        self.launcher.processes.discard(instance.process)


class StaticPlacer(Placer):
    """Replica i is `placement.static.addresses[i]`, kept running by something else; reached
    with the placement's token and TLS."""

    kind = "static"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def place(
        self,
        config: ModelConfig,
        replica: int,
        custom: CustomBackend | None,
        withheld: Collection[str] = (),
    ) -> Placed:
        static = config.static_placement()
        assert static is not None
        address = static.addresses[replica]
        where = f"{config.source}: placement.static"
        token, tls = await asyncio.to_thread(
            remote_credentials, static, self.settings.models_dir, where
        )
        return Placed(address=address, token=token, tls=tls, node=address)
