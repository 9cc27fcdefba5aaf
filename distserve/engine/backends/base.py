"""What a backend does: start instances somewhere, carry messages both ways, watch for death."""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass

from distserve.config import InstanceConfig, ModelConfig
from distserve.engine.messages import InstanceEvent, InstanceFailed, InstanceMessage, InstanceReady


@dataclass
class InstanceDied:
    name: str
    pid: int
    exitcode: int | None


class InstanceStartError(RuntimeError):
    """An instance could not start (its error is in the message)."""


class Backend(abc.ABC):
    @abc.abstractmethod
    def start(
        self, model_config: ModelConfig, instances: list[InstanceConfig], timeout: float
    ) -> dict[str, InstanceReady]:
        """Start every instance and wait until each has loaded its model."""

    @abc.abstractmethod
    def send(self, instance: str, messages: list[InstanceMessage]) -> None:
        """Queue messages for an instance, in one delivery (never blocks)."""

    @abc.abstractmethod
    def recv(self, timeout: float) -> list[InstanceEvent]:
        """Events from any instance, waiting up to `timeout` seconds for the first."""

    @abc.abstractmethod
    def dead(self) -> list[InstanceDied]:
        """Instances whose process (or actor) is gone (without blocking)."""

    def restart(self, config: InstanceConfig) -> None:
        """Start a dead instance again with its configuration (what is left of its processes
        is stopped first); its InstanceReady, or InstanceFailed, comes through `recv`."""
        raise NotImplementedError(f"the {type(self).__name__} cannot restart an instance")

    def reclaim(self, ready: InstanceReady) -> None:
        """Free what a dead instance left behind on this machine (a shared-memory KV cache
        whose process could not remove it)."""

    @abc.abstractmethod
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every instance and release what the backend holds."""

    def advertise_host(self) -> str:
        """The address workers reach this (the controller's) machine at."""
        return "127.0.0.1"

    def wait_ready(self, names: list[str], timeout: float) -> dict[str, InstanceReady]:
        ready: dict[str, InstanceReady] = {}
        deadline = time.monotonic() + timeout
        while len(ready) < len(names):
            for event in self.recv(0.2):
                if isinstance(event, InstanceReady):
                    ready[event.name] = event
                elif isinstance(event, InstanceFailed):
                    self.shutdown()
                    raise InstanceStartError(f"instance {event.name} failed to start:\n{event.error}")
            dead = [d for d in self.dead() if d.name not in ready]
            if dead:
                self.shutdown()
                raise InstanceStartError(
                    f"instance {dead[0].name} (pid {dead[0].pid}) exited with code {dead[0].exitcode} while starting"
                )
            if time.monotonic() > deadline:
                self.shutdown()
                raise InstanceStartError(f"instances did not start within {timeout:.0f} s")
        return ready
