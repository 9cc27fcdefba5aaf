"""The `local` backend: every instance in its own OS process on this machine.

Each instance process owns its CPU cores (or GPU), builds its `Instance`, and loops: take
the controller's messages (blocking only while idle), step, send the step's events. It
exits on `Shutdown`, when its parent dies, or after reporting an error.

Messages go to an instance through a queue only the controller writes; events come back
through a pipe only that instance writes. Nothing is shared between instances, so one killed
mid-send (kill -9 while holding a shared queue's lock would stall every other sender) breaks
only its own pipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from distserve.config import InstanceConfig, ModelConfig
from distserve.distributed.group import GroupSpec
from distserve.engine.backends.base import Backend, InstanceDied
from distserve.engine.instance_loop import OPENMP_SPIN, group_spec, instance_main, worker_main
from distserve.engine.messages import InstanceEvent, InstanceMessage, InstanceReady, Shutdown


def local_instance_main(
    model_config: ModelConfig, config: InstanceConfig, inbox: Any, events: Connection, parent: int, group: GroupSpec | None
) -> None:
    """An instance's driver process: its loop on its inbox and its events pipe, for as long as
    the controller process (`parent`) lives."""
    instance_main(model_config, config, inbox.get, events.send, lambda: _alive(parent), group)


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
    inbox: Any  # controller -> instance (a multiprocessing queue)
    events: Connection  # instance -> controller (the read end of its pipe)
    workers: list[BaseProcess]


class LocalBackend(Backend):
    def __init__(self) -> None:
        os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN)  # read when the fork server loads torch
        self._ctx = mp.get_context("forkserver")
        # instances fork from a server that has imported the engine once (a spawn re-imports
        # torch and transformers in every process: seconds per instance)
        self._ctx.set_forkserver_preload(["distserve.engine.backends.local", "distserve.engine.instance", "distserve.engine.worker"])
        self._open = True
        self._procs: dict[str, _Proc] = {}
        self._rendezvous = tempfile.mkdtemp(prefix="distserve-")  # file stores of worker groups
        self._model_config: ModelConfig | None = None
        self._starts = 0  # each start of an instance meets at a file store of its own

    def start(self, model_config: ModelConfig, instances: list[InstanceConfig], timeout: float) -> dict[str, InstanceReady]:
        self._model_config = model_config
        with main_module_hidden():
            self._start_processes(model_config, instances)
        return self.wait_ready(list(self._procs), timeout)

    def restart(self, config: InstanceConfig) -> None:
        old = self._procs.pop(config.name)
        processes = [old.process, *old.workers]
        for proc in processes:
            if proc.is_alive():
                proc.kill()
        for proc in processes:
            proc.join(5)
        old.inbox.close()
        old.inbox.cancel_join_thread()
        old.events.close()
        assert self._model_config is not None
        with main_module_hidden():
            self._start_processes(self._model_config, [config])

    def reclaim(self, ready: InstanceReady) -> None:
        from multiprocessing import resource_tracker

        for handle in ready.kv_handles:
            if handle.shm_name is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join("/dev/shm", handle.shm_name))
                # the segment's creator registered it with the tracker all our processes share
                resource_tracker.unregister(f"/{handle.shm_name}", "shared_memory")

    def _start_processes(self, model_config: ModelConfig, instances: list[InstanceConfig]) -> None:
        for config in instances:
            if config.take_turns:
                config = dataclasses.replace(config, turns_dir=self._rendezvous)
            inbox = self._ctx.Queue()
            events, sender = self._ctx.Pipe(duplex=False)
            self._starts += 1
            group = group_spec(config, f"file://{os.path.join(self._rendezvous, f'{config.name}-{self._starts}')}")
            process = self._ctx.Process(
                target=local_instance_main,
                args=(model_config, config.for_worker(0), inbox, sender, os.getpid(), group),
                name=f"distserve-{config.name}",
                daemon=True,
            )
            process.start()
            sender.close()  # the child's end: once the child is gone, reading says so
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
            self._procs[config.name] = _Proc(process, inbox, events, workers)

    def send(self, instance: str, messages: list[InstanceMessage]) -> None:
        self._procs[instance].inbox.put(messages)

    def recv(self, timeout: float) -> list[InstanceEvent]:
        if not self._open:
            raise RuntimeError("the engine was shut down")
        pipes = [p.events for p in self._procs.values() if not p.events.closed]
        if not pipes:
            time.sleep(timeout)
            return []
        events: list[InstanceEvent] = []
        for pipe in wait(pipes, timeout):
            try:
                while pipe.poll():
                    events.extend(pipe.recv())
            except (EOFError, OSError):  # the instance is gone; the liveness check says so
                pipe.close()
        return events

    def dead(self) -> list[InstanceDied]:
        """Instances whose driver or any worker is gone."""
        dead = []
        for name, p in self._procs.items():
            gone = [proc for proc in (p.process, *p.workers) if not proc.is_alive()]
            if gone:
                dead.append(InstanceDied(name, gone[0].pid or -1, gone[0].exitcode))
        return dead

    def shutdown(self, timeout: float = 10.0) -> None:
        if not self._open:
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
            p.events.close()
        self._procs.clear()
        self._open = False
        shutil.rmtree(self._rendezvous, ignore_errors=True)
