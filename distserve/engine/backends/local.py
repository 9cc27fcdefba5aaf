"""The `local` backend: every instance in its own OS process on this machine.

Each instance process owns its CPU cores (or GPU), builds its `Instance`, and loops: take
the controller's messages (blocking only while idle), step, send the step's events. It
exits on `Shutdown`, when its parent dies, or after reporting an error.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from distserve.config import InstanceConfig, ModelConfig
from distserve.engine.backends.base import Backend, InstanceDied
from distserve.engine.messages import InstanceFailed, InstanceReady, Shutdown, StatsRequest, StepOutput

IDLE_WAIT = 0.05
# OpenMP worker threads spin this long for the next parallel region before sleeping: a
# decode step runs hundreds of small ops between matmuls, and waking sleeping threads for
# each matmul cost ~15% of a step here. Idle instances still go to sleep.
OPENMP_SPIN = "10000000"


def configure_process(config: InstanceConfig) -> None:
    """Pin the process to its cores and size torch's thread pool."""
    import torch

    if config.cpu_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, config.cpu_cores)
    torch.set_num_threads(config.num_threads)


def instance_main(model_config: ModelConfig, config: InstanceConfig, inbox: Any, outbox: Any, parent: int) -> None:
    """Entry point of an instance process."""
    configure_process(config)
    from distserve.engine.instance import Instance

    try:
        instance = Instance(model_config, config)
    except BaseException:
        outbox.put([InstanceFailed(config.name, traceback.format_exc())])
        return
    outbox.put([instance.ready_message(os.getpid())])
    try:
        serve_instance(instance, inbox.get, outbox.put, lambda: _alive(parent))
    except BaseException:
        outbox.put([InstanceFailed(config.name, traceback.format_exc())])
    finally:
        instance.close()


def _alive(pid: int) -> bool:
    """Whether the controller process still runs (instances fork from a server process, so
    the controller is not their parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def serve_instance(instance: Any, get: Any, put: Any, parent_alive: Any) -> None:
    """The instance loop, shared by every backend: messages, then a step, then events out."""
    while True:
        messages = []
        try:
            messages.append(get(timeout=0 if instance.has_work() else IDLE_WAIT))
            while True:
                messages.append(get(timeout=0))
        except queue.Empty:
            pass
        if not parent_alive():
            return
        events: list[Any] = []
        for message in messages:
            if isinstance(message, Shutdown):
                return
            if isinstance(message, StatsRequest):
                events.append(instance.current_stats())
            else:
                events.extend(instance.handle(message))
        stepped = instance.step()
        events.extend(stepped)
        if messages and not any(isinstance(e, StepOutput) for e in stepped):
            events.append(instance.current_stats())  # blocks may have been freed without a step
        if events:
            put(events)


@dataclass
class _Proc:
    process: BaseProcess
    inbox: Any


class LocalBackend(Backend):
    def __init__(self) -> None:
        os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN)  # read when the fork server loads torch
        self._ctx = mp.get_context("forkserver")
        # instances fork from a server that has imported the engine once (a spawn re-imports
        # torch and transformers in every process: seconds per instance)
        self._ctx.set_forkserver_preload(["distserve.engine.backends.local", "distserve.engine.instance"])
        self._outbox = self._ctx.Queue()
        self._procs: dict[str, _Proc] = {}

    def start(self, model_config: ModelConfig, instances: list[InstanceConfig], timeout: float) -> dict[str, InstanceReady]:
        for config in instances:
            inbox = self._ctx.Queue()
            process = self._ctx.Process(
                target=instance_main,
                args=(model_config, config, inbox, self._outbox, os.getpid()),
                name=f"distserve-{config.name}",
                daemon=True,
            )
            process.start()
            self._procs[config.name] = _Proc(process, inbox)
        return self.wait_ready(list(self._procs), timeout)

    def send(self, instance: str, message: object) -> None:
        self._procs[instance].inbox.put(message)

    def recv(self, timeout: float) -> list[object]:
        if self._outbox is None:
            raise RuntimeError("the engine was shut down")
        events: list[object] = []
        try:
            events.extend(self._outbox.get(timeout=timeout) if timeout > 0 else self._outbox.get_nowait())
            while True:
                events.extend(self._outbox.get_nowait())
        except queue.Empty:
            pass
        return events

    def dead(self) -> list[InstanceDied]:
        return [
            InstanceDied(name, p.process.pid or -1, p.process.exitcode)
            for name, p in self._procs.items()
            if not p.process.is_alive()
        ]

    def pids(self) -> dict[str, int]:
        return {name: p.process.pid or -1 for name, p in self._procs.items()}

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._outbox is None:
            return
        for name, p in self._procs.items():
            if p.process.is_alive():
                try:
                    p.inbox.put(Shutdown())
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + timeout
        for p in self._procs.values():
            p.process.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs.values():
            if p.process.is_alive():
                p.process.kill()
                p.process.join(5)
        for p in self._procs.values():
            p.inbox.close()
            p.inbox.cancel_join_thread()
        self._outbox.close()
        self._outbox.cancel_join_thread()
        self._procs.clear()
        self._outbox = None  # release the queue's semaphores now, not at interpreter exit
