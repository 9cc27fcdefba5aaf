"""This worker's place in its instance: tensor-parallel and pipeline-parallel rank and groups.

Layers read it when they are built (to size their shard) and when they run (to all-reduce or
all-gather). A single-worker instance keeps the default: rank 0 of size 1, no communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: dist.ProcessGroup | None = None
    # the instance's whole worker group: its rank (pp_rank * tp_size + tp_rank), and a gloo
    # group for control messages (batches, samples), whatever the data backend
    rank: int = 0
    world_size: int = 1
    control_group: dist.ProcessGroup | None = None

    def stage_rank(self, pp_rank: int, tp_rank: int | None = None) -> int:
        """The group rank of a worker of stage `pp_rank` (same TP rank as this one by default)."""
        return pp_rank * self.tp_size + (self.tp_rank if tp_rank is None else tp_rank)


_state = ParallelState()


def set_parallel_state(state: ParallelState) -> None:
    global _state
    _state = state


def get_parallel_state() -> ParallelState:
    return _state


def get_tp_rank() -> int:
    return _state.tp_rank


def get_tp_size() -> int:
    return _state.tp_size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over the tensor-parallel group (in place)."""
    if _state.tp_size > 1:
        dist.all_reduce(x, group=_state.tp_group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The tensor-parallel shards of `x` concatenated along `dim`, in rank order."""
    if _state.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_state.tp_group)
    return torch.cat(parts, dim=dim)


def get_pp_rank() -> int:
    return _state.pp_rank


def get_pp_size() -> int:
    return _state.pp_size


def pp_layer_range(num_layers: int, pp_rank: int | None = None, pp_size: int | None = None) -> tuple[int, int]:
    """Layers [start, end) that a pipeline stage runs: an even split, the first stages
    taking one more when the layers do not divide."""
    rank = _state.pp_rank if pp_rank is None else pp_rank
    size = _state.pp_size if pp_size is None else pp_size
    if size > num_layers:
        raise ValueError(f"pipeline parallel size {size} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
