"""The `local` backend: every instance in its own OS process on this machine.

Each instance process owns its CPU cores (or GPU), builds its `Instance`, and loops: take
the controller's messages (blocking only while idle), step, send the step's events. It
exits on `Shutdown`, when its parent dies, or after reporting an error.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from distserve.config import InstanceConfig, ModelConfig
from distserve.distributed.group import GroupSpec
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


def instance_main(
    model_config: ModelConfig, config: InstanceConfig, inbox: Any, outbox: Any, parent: int | None,
    group: GroupSpec | None = None,
) -> None:
    """Entry point of an instance process (its driver, worker 0); with a `parent` pid, it
    also ends when that process is gone."""
    configure_process(config)
    from distserve.engine.instance import Instance

    try:
        instance = Instance(model_config, config, group)
    except BaseException:
        outbox.put([InstanceFailed(config.name, traceback.format_exc())])
        return
    outbox.put([instance.ready_message(os.getpid())])
    try:
        serve_instance(instance, inbox.get, outbox.put, lambda: parent is None or _alive(parent))
    except BaseException:
        outbox.put([InstanceFailed(config.name, traceback.format_exc())])
    finally:
        instance.close()


def worker_main(model_config: ModelConfig, config: InstanceConfig, group: GroupSpec, rank: int) -> None:
    """Entry point of a worker process other than the driver: it serves the driver's steps.
    It ends when the driver says stop, or when the driver is gone (the group breaks)."""
    configure_process(config)
    from distserve.engine.worker import Worker

    worker = Worker(model_config, config, group, rank)
    try:
        worker.serve()
    except RuntimeError:
        pass  # the driver's end of the group closed: the instance is going away
    finally:
        worker.close()


def group_spec(config: InstanceConfig, rendezvous: str) -> GroupSpec | None:
    """How an instance's workers meet, or None for a single worker."""
    if config.num_workers == 1:
        return None
    backend = "nccl" if config.device.startswith("cuda") else "gloo"
    return GroupSpec(config.phase.tensor_parallel_size, config.phase.pipeline_parallel_size, rendezvous, backend)


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
    workers: list[BaseProcess]


class LocalBackend(Backend):
    def __init__(self) -> None:
        os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN)  # read when the fork server loads torch
        self._ctx = mp.get_context("forkserver")
        # instances fork from a server that has imported the engine once (a spawn re-imports
        # torch and transformers in every process: seconds per instance)
        self._ctx.set_forkserver_preload(["distserve.engine.backends.local", "distserve.engine.instance"])
        self._outbox = self._ctx.Queue()
        self._procs: dict[str, _Proc] = {}
        self._rendezvous = tempfile.mkdtemp(prefix="distserve-")  # file stores of worker groups

    def start(self, model_config: ModelConfig, instances: list[InstanceConfig], timeout: float) -> dict[str, InstanceReady]:
        for config in instances:
            inbox = self._ctx.Queue()
            group = group_spec(config, f"file://{os.path.join(self._rendezvous, config.name)}")
            process = self._ctx.Process(
                target=instance_main,
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
        for name, p in self._procs.items():
            if p.process.is_alive():
                try:
                    p.inbox.put(Shutdown())
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
