"""The `local` backend: every instance in its own OS process on this machine.

Each instance process owns its CPU cores (or GPU), builds its `Instance`, and loops: take
the controller's messages (blocking only while idle), step, send the step's events. It
exits on `Shutdown`, when its parent dies, or after reporting an error.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from distserve.config import InstanceConfig, ModelConfig
from distserve.distributed.group import GroupSpec
from distserve.engine.backends.base import Backend, InstanceDied
from distserve.engine.instance_loop import OPENMP_SPIN, group_spec, instance_main, worker_main
from distserve.engine.messages import InstanceEvent, InstanceMessage, InstanceReady, Shutdown


def local_instance_main(
    model_config: ModelConfig, config: InstanceConfig, inbox: Any, outbox: Any, parent: int, group: GroupSpec | None
) -> None:
    """An instance's driver process: its loop on the backend's queues, for as long as the
    controller process (`parent`) lives."""
    instance_main(model_config, config, inbox.get, outbox.put, lambda: _alive(parent), group)


@contextlib.contextmanager
def main_module_hidden() -> Iterator[None]:
    """Start processes without them importing the user's main module: multiprocessing runs a
    script's top level again in every process it starts (and in its fork server), so a script
    without an `if __name__ == "__main__":` guard would start its engine again in each. Our
    processes run distserve's own functions on distserve's own types: they need none of it."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _alive(pid: int) -> bool:
    """Whether the controller process still runs (instances fork from a server process, so
    the controller is not their parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class _Proc:
    process: BaseProcess
    inbox: Any
    workers: list[BaseProcess]


class LocalBackend(Backend):
    def __init__(self) -> None:
        os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN)  # read when the fork server loads torch
        self._ctx = mp.get_context("forkserver")
        # instances fork from a server that has imported the engine once (a spawn re-imports
        # torch and transformers in every process: seconds per instance)
        self._ctx.set_forkserver_preload(["distserve.engine.backends.local", "distserve.engine.instance", "distserve.engine.worker"])
        self._outbox = self._ctx.Queue()
        self._procs: dict[str, _Proc] = {}
        self._rendezvous = tempfile.mkdtemp(prefix="distserve-")  # file stores of worker groups

    def start(self, model_config: ModelConfig, instances: list[InstanceConfig], timeout: float) -> dict[str, InstanceReady]:
        with main_module_hidden():
            self._start_processes(model_config, instances)
        return self.wait_ready(list(self._procs), timeout)

    def _start_processes(self, model_config: ModelConfig, instances: list[InstanceConfig]) -> None:
        for config in instances:
            inbox = self._ctx.Queue()
            group = group_spec(config, f"file://{os.path.join(self._rendezvous, config.name)}")
            process = self._ctx.Process(
                target=local_instance_main,
                args=(model_config, config.for_worker(0), inbox, self._outbox, os.getpid(), group),
                name=f"distserve-{config.name}",
                daemon=True,
            )
            process.start()
            workers = []
            for rank in range(1, config.num_workers):
                worker = self._ctx.Process(
                    target=worker_main,
                    args=(model_config, config.for_worker(rank), group, rank),
                    name=f"distserve-{config.name}-worker{rank}",
                    daemon=True,
                )
                worker.start()
                workers.append(worker)
            self._procs[config.name] = _Proc(process, inbox, workers)

    def send(self, instance: str, messages: list[InstanceMessage]) -> None:
        self._procs[instance].inbox.put(messages)

    def recv(self, timeout: float) -> list[InstanceEvent]:
        if self._outbox is None:
            raise RuntimeError("the engine was shut down")
        events: list[InstanceEvent] = []
        try:
            events.extend(self._outbox.get(timeout=timeout) if timeout > 0 else self._outbox.get_nowait())
            while True:
                events.extend(self._outbox.get_nowait())
        except queue.Empty:
            pass
        return events

    def dead(self) -> list[InstanceDied]:
        """Instances whose driver or any worker is gone."""
        dead = []
        for name, p in self._procs.items():
            gone = [proc for proc in (p.process, *p.workers) if not proc.is_alive()]
            if gone:
                dead.append(InstanceDied(name, gone[0].pid or -1, gone[0].exitcode))
        return dead

    def pids(self) -> dict[str, int]:
        return {name: p.process.pid or -1 for name, p in self._procs.items()}

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._outbox is None:
            return
        for p in self._procs.values():
            if p.process.is_alive():
                try:
                    p.inbox.put([Shutdown()])
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + timeout
        processes = [proc for p in self._procs.values() for proc in (p.process, *p.workers)]
        for proc in processes:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in processes:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for p in self._procs.values():
            p.inbox.close()
            p.inbox.cancel_join_thread()
        self._outbox.close()
        self._outbox.cancel_join_thread()
        self._procs.clear()
        self._outbox = None  # release the queue's semaphores now, not at interpreter exit
        shutil.rmtree(self._rendezvous, ignore_errors=True)
