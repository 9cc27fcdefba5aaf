"""The workers of one instance, and how the driver (worker 0) drives the others.

Every worker holds its shard of the model and of the KV cache (`ModelRunner`) and, on a
decode instance, a transport to pull KV shards. The driver hosts the instance's scheduler;
each step it broadcasts a `WorkerStep` (the KV pulls to do, or the batch to run) to the other
workers, every worker runs its part, and the sampling worker (TP rank 0 of the last stage)
returns the samples to the driver. A single-worker instance skips all communication.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

import torch

from distserve.config import InstanceConfig, ModelConfig, Role
from distserve.distributed.group import (
    GroupSpec,
    all_gather_object,
    broadcast_object,
    destroy_worker_group,
    group_sum,
    init_worker_group,
    recv_object,
    send_object,
)
from distserve.engine.model_runner import ModelRunner
from distserve.engine.scheduler import ScheduledBatch
from distserve.kv.cache import KVCacheHandle
from distserve.kv.torch_transport import KVServer, TorchDistributedTransport, join_kv_group
from distserve.kv.transfer import CudaIpcTransport, KVPull, KVTransport, RoutingTransport, SharedMemoryTransport
from distserve.layers.sampler import SampleResult


@dataclass
class WorkerStep:
    pulls: list[KVPull] = field(default_factory=list)
    batch: ScheduledBatch | None = None
    connect: list[KVCacheHandle] = field(default_factory=list)  # sources to map ahead of pulls
    stop: bool = False


class Worker:
    """One worker's model shard, KV cache shard and transport, in its group."""

    def __init__(self, model_config: ModelConfig, config: InstanceConfig, group: GroupSpec | None, rank: int) -> None:
        self.config = config
        if config.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(config.device))  # NCCL works on the current device
        self.state = init_worker_group(group, rank)
        self.host = os.environ.get("DISTSERVE_HOST", "127.0.0.1")  # this machine, as peers reach it
        # what shares memory with this worker: its host, or its Ray node (a Ray node is a machine)
        self.machine = os.environ.get("DISTSERVE_MACHINE", self.host)
        shared = config.role is Role.PREFILL and config.kv_transport != "torch"
        self.runner = ModelRunner(model_config, config, shared_cache=shared)
        self.kv_group = self.kv_server = None
        kv_rank = None
        if config.kv_group is not None:
            kv_rank = config.kv_group.first_rank + rank
            self.kv_group = join_kv_group(config.kv_group, kv_rank, self.host, config.device)
            if config.role is Role.PREFILL:
                self.kv_server = KVServer(self.kv_group, self.runner.kv_cache)
        self.transport: KVTransport | None = None
        if config.role is Role.DECODE:
            remote = TorchDistributedTransport(self.kv_group) if self.kv_group is not None else None
            if config.kv_transport == "torch":
                if remote is None:
                    raise ValueError("kv_transport='torch' needs the KV transfer group (disaggregated mode)")
                self.transport = remote
            else:
                gpu = CudaIpcTransport() if config.device.startswith("cuda") else None
                self.transport = RoutingTransport(self.machine, SharedMemoryTransport(), remote, gpu)
        # every worker's cache handle, in rank order (what a decode instance pulls from)
        self.handles: list[KVCacheHandle] = all_gather_object(
            self.runner.kv_cache.handle(config.name, rank, self.host, kv_rank, self.machine)
        )
        self.sampler_rank = self.state.stage_rank(self.state.pp_size - 1, 0)

    @property
    def is_driver(self) -> bool:
        return self.state.rank == 0

    # -- what the instance asks of its driver (the `StepExecutor` it runs on) ------------------
    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def num_swap_blocks(self) -> int:
        """Blocks of swap space (0: none, preemption recomputes)."""
        return self.runner.num_swap_blocks if self.runner.swap_cache is not None else 0

    @property
    def load_seconds(self) -> float:
        return self.runner.load_seconds

    @property
    def weight_bytes(self) -> int:
        return self.runner.weight_bytes

    @property
    def can_rerun(self) -> bool:
        return self.state.world_size == 1

    # -- what every worker does with a step -------------------------------------------------
    def _run(self, step: WorkerStep) -> tuple[dict[str, int], list[SampleResult | None] | None]:
        moved: collections.Counter[str] = collections.Counter()
        if step.connect or step.pulls:
            assert self.transport is not None, f"{self.config.name} is not a decode instance"
        if step.connect:
            self.transport.connect(step.connect, self.runner.kv_cache.layout)
        if step.pulls:
            for pull in step.pulls:
                moved.update(self.transport.pull(pull.sources, pull.src_blocks, self.runner.kv_cache, pull.dst_blocks))
            moved = group_sum(moved)  # also waits until every worker has its shards
        samples = self.runner.execute(step.batch) if step.batch is not None else None
        if step.batch is not None and self.runner.is_sampler and not self.is_driver:
            send_object(samples, 0)
        return moved, samples

    def serve(self) -> None:
        """Non-driver workers: run the driver's steps until it says stop (or dies)."""
        assert not self.is_driver
        while True:
            step: WorkerStep = broadcast_object()
            if step.stop:
                return
            self._run(step)

    # -- the driver's side ------------------------------------------------------------------
    def _drive(self, step: WorkerStep) -> tuple[dict[str, int], list[SampleResult | None] | None]:
        if self.state.world_size > 1:
            broadcast_object(step)
        moved, samples = self._run(step)
        if step.batch is not None and self.sampler_rank != 0:
            samples = recv_object(self.sampler_rank)
        return moved, samples

    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        """Run a batch on every worker; the samples."""
        if self.state.world_size > 1:
            # other workers need only what the step computes; the preempted requests stay here
            batch = ScheduledBatch(batch.requests, batch.num_new_tokens, batch.swap_out, batch.swap_in)
        _, samples = self._drive(WorkerStep(batch=batch))
        assert samples is not None
        return samples

    def connect(self, sources: list[KVCacheHandle]) -> None:
        """Map the source caches every worker will pull from, now."""
        self._drive(WorkerStep(connect=sources))

    def pull(self, pulls: list[KVPull]) -> dict[str, int]:
        """Pull KV shards on every worker; the bytes all of them moved, by transport."""
        moved, _ = self._drive(WorkerStep(pulls=pulls))
        return moved

    def close(self) -> None:
        if self.is_driver and self.state.world_size > 1:
            try:
                broadcast_object(WorkerStep(stop=True))
            except RuntimeError:
                pass  # a worker is gone already
        if self.transport is not None:
            self.transport.close()
        if self.kv_server is not None:
            self.kv_server.close()
        if self.kv_group is not None:
            self.kv_group.close()
        self.runner.close()
        destroy_worker_group()
