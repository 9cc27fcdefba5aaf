"""The life of an instance's processes, the same under every backend.

    instance_main   worker 0 (the driver): pin cores, load its shard, build the `Instance`,
                    report ready, then `serve_instance` until Shutdown or the parent is gone
    serve_instance  take the controller's messages (blocking only while idle), step, send
                    the step's events
    worker_main     every other worker: serve the driver's steps until it stops

A backend starts these (`backends/local.py` as OS processes, `backends/ray.py` as Ray actors)
and carries the messages; `get` returns one list of messages, `put` takes one of events.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import queue
import traceback
from collections.abc import Callable

from distserve.config import InstanceConfig, ModelConfig
from distserve.distributed.group import GroupSpec
from distserve.engine.messages import (
    InstanceEvent,
    InstanceFailed,
    InstanceMessage,
    ResetPrefixCache,
    Shutdown,
    StatsRequest,
    StepOutput,
)
from distserve.engine.turns import CoreTurns

IDLE_WAIT = 0.05
# OpenMP worker threads spin this many turns (~8 ms here, libgomp's own default) for the next
# parallel region before sleeping: a step's ops follow each other within that, so its threads
# never sleep mid-step. 10,000,000 (~260 ms of a core after every step) decoded no faster (1
# and 16 sequences of SmolLM2, 64 of the LLaMA-GQA 150M shape, 3x1000-token prefills;
# alternating runs) and took a core from whichever instance steps next on shared cores.
OPENMP_SPIN = "300000"

Get = Callable[..., list[InstanceMessage]]  # get(timeout=seconds) -> messages, or queue.Empty
Put = Callable[[list[InstanceEvent]], None]


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a step frees for the next step.

    By default glibc serves allocations of 128 KiB and more (a step's activations: MBs each)
    with fresh mmaps and hands freed memory back to the OS, so every step touched new pages:
    ~30,000 page faults per second of prefill here, 5-10% of its time. With mmap off and
    trimming off, the process keeps its peak heap and reuses it (what tcmalloc, which vLLM
    recommends on CPU, does by itself). False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return all(mallopt(option, value) == 1 for option, value in
               ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 64 << 20)))


def lower_priority(nice: int) -> None:
    """Run every thread of this process at niceness `nice` (or its own, if higher); threads
    started later inherit it from the thread that starts them. Linux keeps a niceness per
    thread, so threads already running (an import may start some) are set one by one."""
    if not hasattr(os, "setpriority"):
        return
    tasks = "/proc/self/task"
    for tid in map(int, os.listdir(tasks)) if os.path.isdir(tasks) else [0]:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def configure_process(config: InstanceConfig) -> None:
    """Pin the process to its cores, lower its priority if asked, size torch's thread pool,
    keep freed memory."""
    import torch

    if config.cpu_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, config.cpu_cores)
    if config.phase.nice:
        lower_priority(config.phase.nice)
    torch.set_num_threads(config.num_threads)
    keep_freed_memory()


def group_spec(config: InstanceConfig, rendezvous: str) -> GroupSpec | None:
    """How an instance's workers meet, or None for a single worker."""
    if config.num_workers == 1:
        return None
    backend = "nccl" if config.device.startswith("cuda") else "gloo"
    return GroupSpec(config.phase.tensor_parallel_size, config.phase.pipeline_parallel_size, rendezvous, backend)


def build_instance(model_config: ModelConfig, config: InstanceConfig, group: GroupSpec | None = None):  # noqa: ANN201
    """An `Instance` driving this process's worker (rank 0 of `group`, or the only one)."""
    from distserve.engine.instance import Instance
    from distserve.engine.worker import Worker

    return Instance(config, Worker(model_config, config, group, rank=0), model_config.max_model_len)


def instance_main(
    model_config: ModelConfig, config: InstanceConfig, get: Get, put: Put, parent_alive: Callable[[], bool],
    group: GroupSpec | None = None,
) -> None:
    """Worker 0 of an instance: build it, say it is ready, serve it; any error is reported
    as `InstanceFailed` with its traceback."""
    configure_process(config)
    try:
        instance = build_instance(model_config, config, group)
    except BaseException:
        put([InstanceFailed(config.name, traceback.format_exc(), os.getpid())])
        return
    put([instance.ready_message(os.getpid())])
    turns = CoreTurns(config.turns_dir, prefill=config.role.takes_prompts) if config.turns_dir else None
    try:
        serve_instance(instance, get, put, parent_alive, turns)
    except BaseException:
        put([InstanceFailed(config.name, traceback.format_exc(), os.getpid())])
    finally:
        instance.close()
        if turns is not None:
            turns.close()


def worker_main(model_config: ModelConfig, config: InstanceConfig, group: GroupSpec, rank: int) -> None:
    """A worker other than the driver: it serves the driver's steps. It ends when the driver
    says stop, or when the driver is gone (the group breaks)."""
    configure_process(config)
    from distserve.engine.worker import Worker

    worker = Worker(model_config, config, group, rank)
    try:
        worker.serve()
    except RuntimeError:
        pass  # the driver's end of the group closed: the instance is going away
    finally:
        worker.close()


def serve_instance(  # noqa: ANN001 - an Instance
    instance, get: Get, put: Put, parent_alive: Callable[[], bool], turns: CoreTurns | None = None
) -> None:
    """The instance loop: messages, then a step (in its turn, where `turns` is given), then
    events out."""
    while True:
        messages: list[InstanceMessage] = []
        try:
            messages.extend(get(timeout=0 if instance.has_work() else IDLE_WAIT))
            while True:
                messages.extend(get(timeout=0))
        except queue.Empty:
            pass
        if not parent_alive():
            return
        events: list[InstanceEvent] = []
        for message in messages:
            if isinstance(message, Shutdown):
                return
            answer = instance.handle(message)
            if answer is not None:
                events.append(answer)
        with turns.turn() if turns is not None and instance.has_work() else contextlib.nullcontext():
            stepped = instance.step()
        events.extend(stepped)
        if messages and not any(isinstance(e, StepOutput) for e in stepped) and not any(
            isinstance(m, (StatsRequest, ResetPrefixCache)) for m in messages
        ):
            events.append(instance.current_stats())  # blocks may have been freed without a step
        if events:
            put(events)
