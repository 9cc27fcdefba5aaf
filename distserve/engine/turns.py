"""Instances of different phases that share CPU cores take turns by step, prefill first.

When a prefill and a decode instance run on the same cores, letting the OS interleave them
costs prefill most: its matmuls are split over every core in OpenMP regions that wait for
their slowest thread, and a decode thread holding one core for a few milliseconds stalls the
whole region (a 680-token prefill beside six decoding streams took 2.8-5.0 s, ~1 s idle; in
turns 0.95-1.04 s). Taking turns gives each step all the cores: an instance runs a step only while
it holds the turn, and a decode step lets a prefill step that is waiting go first (TTFT
before TPOT, as a prefill-first scheduler orders a colocated step). A prompt waits at most
the decode step under way. The decode instance is woken when the prefill step ends, and with
one prefill instance gets the next turn, so steps alternate while both phases have work; with
several prefill instances, a decode step waits until none of them is waiting. Every instance
that takes turns takes the same one (two prefill instances on cores of their own, both
sharing with one decode instance, also exclude each other).

The turn is an `flock` on a file of the backend's run folder, so a process that dies holding
it (kill -9) releases it with its file descriptors: nothing can be left waiting on a dead
instance.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


class CoreTurns:
    """One instance's side of the turns in folder `folder` (the same folder for every
    instance on the shared cores)."""

    def __init__(self, folder: str, prefill: bool) -> None:
        self.prefill = prefill
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self._turn = os.open(os.path.join(folder, "turn.lock"), flags, 0o600)
        # held shared by every prefill step waiting or running: a decode step may go when it
        # can take it exclusively
        self._prefill = os.open(os.path.join(folder, "prefill.lock"), flags, 0o600)

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the shared cores for one step."""
        if self.prefill:
            fcntl.flock(self._prefill, fcntl.LOCK_SH)
        else:
            self._yield_to_prefill()
        fcntl.flock(self._turn, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._turn, fcntl.LOCK_UN)
            if self.prefill:
                fcntl.flock(self._prefill, fcntl.LOCK_UN)

    def _yield_to_prefill(self) -> None:
        """Wait while a prefill step waits for the turn or runs (blocked in the kernel, not
        polling, so nothing wakes on the prefill's cores meanwhile)."""
        fcntl.flock(self._prefill, fcntl.LOCK_EX)
        fcntl.flock(self._prefill, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._turn, self._prefill):
            with contextlib.suppress(OSError):
                os.close(fd)
