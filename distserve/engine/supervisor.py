"""Which instances run, which are being started again, which stay down, and so how healthy
the engine is.

    running ──dies──> restarting ──ready──> running
                          │  (dies again: counts against the budget too)
                          └──budget spent──> down

An instance that dies is started again as long as it has died fewer than `max_restarts`
times in the last `window` seconds; past that it stays down. The engine is healthy when every
instance runs, degraded while any is restarting or down but every role still has one
running or coming back, and unhealthy when some role has none.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from distserve.config import NamedEnum, Role


class InstanceState(NamedEnum):
    RUNNING = "running"
    RESTARTING = "restarting"
    DOWN = "down"


class Health(NamedEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


class Supervisor:
    def __init__(
        self, roles: dict[str, Role], max_restarts: int, window: float, can_restart: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.roles = roles
        self.max_restarts = max_restarts if can_restart else 0
        self.window = window
        self.clock = clock
        self.state = {name: InstanceState.RUNNING for name in roles}
        self.restarts = {name: 0 for name in roles}  # over the engine's life
        self._recent: dict[str, deque[float]] = {name: deque() for name in roles}

    def died(self, name: str) -> bool:
        """Note a death; whether the instance is to be started again (within the budget)."""
        now = self.clock()
        recent = self._recent[name]
        while recent and now - recent[0] > self.window:
            recent.popleft()
        if len(recent) < self.max_restarts:
            recent.append(now)
            self.restarts[name] += 1
            self.state[name] = InstanceState.RESTARTING
            return True
        self.state[name] = InstanceState.DOWN
        return False

    def ready(self, name: str) -> None:
        self.state[name] = InstanceState.RUNNING

    def running(self, name: str) -> bool:
        return self.state[name] is InstanceState.RUNNING

    def coming_back(self, role: Role) -> bool:
        """Whether an instance of `role` is being started again (work for it can wait)."""
        return any(s is InstanceState.RESTARTING for n, s in self.state.items() if self.roles[n] is role)

    def serving(self, role: Role) -> bool:
        """Whether an instance of `role` runs or is coming back."""
        return any(s is not InstanceState.DOWN for n, s in self.state.items() if self.roles[n] is role)

    def health(self) -> Health:
        if not all(self.serving(role) for role in set(self.roles.values())):
            return Health.UNHEALTHY
        if all(s is InstanceState.RUNNING for s in self.state.values()):
            return Health.HEALTHY
        return Health.DEGRADED
