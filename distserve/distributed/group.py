"""The worker group of one instance: tp_size x pp_size processes joined by torch.distributed.

Rank r is pipeline stage r // tp_size, tensor-parallel rank r % tp_size; rank 0 (stage 0,
TP rank 0) is the driver that hosts the instance's scheduler. Activations and all-reduces go
over the data backend (gloo on CPU, NCCL on GPU); commands and samples go over a gloo group
whatever the data backend (vLLM keeps such a CPU group too).
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from distserve.distributed.parallel_state import ParallelState, get_parallel_state, set_parallel_state

# Idle workers wait in a broadcast for the next step: far longer than any idle period. A
# worker whose driver dies does not wait this long: the closed connection ends the wait.
GROUP_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class GroupSpec:
    """How the workers of one instance meet (picklable, handed to every worker)."""

    tp_size: int
    pp_size: int
    init_method: str  # file:///path (one machine) or tcp://host:port
    backend: str  # gloo | nccl

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_loopback(init_method: str) -> bool:
    url = urlparse(init_method)
    if url.scheme == "file":
        return True
    try:
        return ipaddress.ip_address(socket.gethostbyname(url.hostname or "")).is_loopback
    except (OSError, ValueError):
        return False


def init_worker_group(spec: GroupSpec | None, rank: int) -> ParallelState:
    """Join the instance's group as `rank` and build its TP groups; sets the parallel state
    layers read when they are built."""
    if spec is None or spec.world_size == 1:
        state = ParallelState()
        set_parallel_state(state)
        return state
    if _is_loopback(spec.init_method):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo's own sockets on 127.0.0.1
    dist.init_process_group(spec.backend, init_method=spec.init_method, rank=rank, world_size=spec.world_size,
                            timeout=GROUP_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT) if spec.backend != "gloo" else dist.group.WORLD
    tp_rank, pp_rank = rank % spec.tp_size, rank // spec.tp_size
    tp_group = None
    for stage in range(spec.pp_size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(stage * spec.tp_size, (stage + 1) * spec.tp_size)), timeout=GROUP_TIMEOUT)
        if stage == pp_rank:
            tp_group = group
    state = ParallelState(tp_rank=tp_rank, tp_size=spec.tp_size, pp_rank=pp_rank, pp_size=spec.pp_size,
                          tp_group=tp_group, rank=rank, world_size=spec.world_size, control_group=control)
    set_parallel_state(state)
    return state


def destroy_worker_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    set_parallel_state(ParallelState())


# -- control messages (over the gloo group) --------------------------------------------------
def broadcast_object(obj: Any = None) -> Any:
    """The driver's `obj` on every rank."""
    state = get_parallel_state()
    if state.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=state.control_group)
    return box[0]


def send_object(obj: Any, dst: int) -> None:
    dist.send_object_list([obj], dst=dst, group=get_parallel_state().control_group)


def recv_object(src: int) -> Any:
    box: list[Any] = [None]
    dist.recv_object_list(box, src=src, group=get_parallel_state().control_group)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    state = get_parallel_state()
    if state.world_size == 1:
        return [obj]
    out: list[Any] = [None] * state.world_size
    dist.all_gather_object(out, obj, group=state.control_group)
    return out


def group_min(value: int) -> int:
    """The smallest of every rank's `value` (e.g. the KV blocks every worker can hold)."""
    return min(all_gather_object(value))


def group_sum(counts: dict[str, int]) -> dict[str, int]:
    """Every rank's `counts` added up key by key; also a barrier."""
    total: collections.Counter = collections.Counter()
    for part in all_gather_object(counts):
        total.update(part)
    return dict(total)


# -- activations between pipeline stages (over the data backend) --------------------------------
def send_to_next_stage(x: torch.Tensor) -> dist.Work:
    state = get_parallel_state()
    return dist.isend(x.contiguous(), state.stage_rank(state.pp_rank + 1))


def recv_from_prev_stage(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    state = get_parallel_state()
    x = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(x, state.stage_rank(state.pp_rank - 1))
    return x
