"""Moving a request's KV cache from a prefill instance's blocks to a decode instance's blocks.

The decode side pulls: it names the source worker's cache (a `KVCacheHandle`), the source
blocks and its own destination blocks. Prefill and decode may shard the cache differently
(other TP or PP); each destination worker copies, from every source worker, only the layers
and KV heads both hold (`overlap`). Transports differ in how they reach the source memory;
`SharedMemoryTransport` maps it from named shared memory on the same machine,
`CudaIpcTransport` from a CUDA IPC handle on the same node, and `torch_transport` asks the
source over torch.distributed.
"""

from __future__ import annotations

import abc
import collections
import mmap
from dataclasses import dataclass

import torch

from distserve.kv.cache import KVCache, KVCacheHandle, KVLayout, attach_cuda, attach_shared


@dataclass
class KVPull:
    """Pull `src_blocks` of a prefill instance (all its workers' handles) into `dst_blocks`:
    the KV of `num_tokens` tokens (the last block may be partly filled)."""

    sources: list[KVCacheHandle]
    src_blocks: list[int]
    dst_blocks: list[int]
    num_tokens: int


@dataclass(frozen=True)
class Overlap:
    """The layers and heads a source worker and a destination worker both hold, in each
    one's local indices."""

    src_layers: slice
    dst_layers: slice
    src_heads: slice
    dst_heads: slice


def overlap(src: KVLayout, dst: KVLayout) -> Overlap | None:
    layer_start, layer_end = max(src.layer_start, dst.layer_start), min(src.layer_end, dst.layer_end)
    head_start, head_end = max(src.head_start, dst.head_start), min(src.head_end, dst.head_end)
    if layer_start >= layer_end or head_start >= head_end:
        return None
    return Overlap(
        src_layers=slice(layer_start - src.layer_start, layer_end - src.layer_start),
        dst_layers=slice(layer_start - dst.layer_start, layer_end - dst.layer_start),
        src_heads=slice(head_start - src.head_start, head_end - src.head_start),
        dst_heads=slice(head_start - dst.head_start, head_end - dst.head_start),
    )


def needed_sources(sources: list[KVCacheHandle], dst: KVLayout) -> list[tuple[KVCacheHandle, Overlap]]:
    """The source workers a destination worker must pull from, with what to take of each.

    When KV heads are replicated over TP ranks, a head is taken from one rank only.
    """
    chosen: list[tuple[KVCacheHandle, Overlap]] = []
    covered: set[tuple[int, int]] = set()
    for handle in sources:
        ov = overlap(handle.layout, dst)
        if ov is None:
            continue
        key = (handle.layout.layer_start, handle.layout.head_start)
        if key in covered:
            continue
        covered.add(key)
        chosen.append((handle, ov))
    return chosen


def block_runs(src_blocks: list[int], dst_blocks: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the runs where both sides' block ids are consecutive."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_blocks, dst_blocks):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def copy_blocks(
    src: torch.Tensor, src_blocks: list[int], dst: torch.Tensor, dst_blocks: list[int], ov: Overlap
) -> int:
    """Copy blocks of the overlapping layers and heads, a run of consecutive blocks at a time
    (no intermediate buffer); returns the bytes moved."""
    src_view = src[ov.src_layers, :, :, :, ov.src_heads]
    dst_view = dst[ov.dst_layers, :, :, :, ov.dst_heads]
    moved = 0
    for s, d, n in block_runs(src_blocks, dst_blocks):
        chunk = src_view[:, :, s : s + n]
        dst_view[:, :, d : d + n].copy_(chunk)
        moved += chunk.numel() * chunk.element_size()
    return moved


class KVTransport(abc.ABC):
    """Pulls blocks of a peer's KV cache into this worker's cache."""

    name: str = "abstract"

    def pull(
        self, sources: list[KVCacheHandle], src_blocks: list[int], dst: KVCache, dst_blocks: list[int]
    ) -> dict[str, int]:
        """Copy `src_blocks` of the sources into `dst_blocks` of `dst`, taking from each source
        worker only the layers and heads this worker holds; returns the bytes each transport
        (by name) moved."""
        moved: collections.Counter[str] = collections.Counter()
        for handle, ov in needed_sources(sources, dst.layout):
            transport = self.route(handle)
            moved[transport.name] += transport.copy(handle, ov, src_blocks, dst, dst_blocks)
        return moved

    def route(self, source: KVCacheHandle) -> KVTransport:
        """The transport that reaches `source`: this one, unless it chooses among others."""
        return self

    @abc.abstractmethod
    def copy(self, source: KVCacheHandle, ov: Overlap, src_blocks: list[int], dst: KVCache, dst_blocks: list[int]) -> int:
        """Copy the overlap of one source worker's blocks; returns bytes moved."""

    def connect(self, sources: list[KVCacheHandle], dst: KVLayout) -> None:
        """Get ready to pull from the source workers this worker needs (map their memory); the
        sources are all there are now: what was reached of any other (a dead instance's cache)
        is let go."""
        needed = needed_sources(sources, dst)
        self.forget_others({handle.key for handle, _ in needed})
        for handle, _ in needed:
            self.attach(handle)

    def attach(self, source: KVCacheHandle) -> None:
        """Reach one source worker's cache ahead of its first pull, where that costs anything."""

    def forget_others(self, keys: set[tuple]) -> None:
        """Let go of what reaches any cache but these (`KVCacheHandle.key`)."""

    def close(self) -> None:
        """Let go of any peer memory this transport holds."""


class MappedTransport(KVTransport):
    """A transport that maps each source cache into this process once (`_map`), then copies
    runs of blocks straight out of it."""

    def __init__(self) -> None:
        self._peers: dict[tuple, tuple[torch.Tensor, object]] = {}  # KVCacheHandle.key -> what _map returned

    @abc.abstractmethod
    def _map(self, handle: KVCacheHandle) -> tuple[torch.Tensor, object]:
        """The source's cache tensor, and whatever must stay alive while it is used."""

    def _tensor(self, handle: KVCacheHandle) -> torch.Tensor:
        key = handle.key
        if key not in self._peers:
            self._peers[key] = self._map(handle)
        return self._peers[key][0]

    def attach(self, source: KVCacheHandle) -> None:
        self._tensor(source)

    def copy(self, source: KVCacheHandle, ov: Overlap, src_blocks: list[int], dst: KVCache, dst_blocks: list[int]) -> int:
        return copy_blocks(self._tensor(source), src_blocks, dst.tensor, dst_blocks, ov)

    def forget_others(self, keys: set[tuple]) -> None:
        for key in [k for k in self._peers if k not in keys]:
            del self._peers[key]  # unmapped when the last reference goes

    def close(self) -> None:
        self._peers.clear()


class SharedMemoryTransport(MappedTransport):
    """Same machine: the source cache is mapped from its named shared memory."""

    name = "shm"

    def _map(self, handle: KVCacheHandle) -> tuple[torch.Tensor, mmap.mmap]:
        assert handle.shm_name is not None, f"{handle.instance} has no shared-memory KV cache"
        return attach_shared(handle)


class CudaIpcTransport(MappedTransport):
    """Same node, on GPUs: the source cache is mapped through its CUDA IPC handle, and blocks
    are copied device to device (over NVLink or PCIe between two GPUs)."""

    name = "cuda-ipc"

    def _map(self, handle: KVCacheHandle) -> tuple[torch.Tensor, None]:
        return attach_cuda(handle), None

    def copy(self, source: KVCacheHandle, ov: Overlap, src_blocks: list[int], dst: KVCache, dst_blocks: list[int]) -> int:
        moved = super().copy(source, ov, src_blocks, dst, dst_blocks)
        # the source may reuse these blocks as soon as the pull is reported done
        torch.cuda.current_stream(dst.tensor.device).synchronize()
        return moved


class RoutingTransport(KVTransport):
    """Each source by the best way to reach it: CUDA IPC or shared memory when it is on this
    machine (`KVCacheHandle.machine`), exported that way and (CUDA IPC) on a GPU this process
    sees, else `remote` (torch.distributed point to point)."""

    name = "auto"

    def __init__(self, machine: str, local: KVTransport, remote: KVTransport | None, gpu: KVTransport | None = None) -> None:
        self.machine, self.local, self.remote, self.gpu = machine, local, remote, gpu

    def route(self, source: KVCacheHandle) -> KVTransport:
        if self.gpu is not None and source.machine == self.machine and source.reachable_by_cuda_ipc:
            return self.gpu
        if source.shm_name is not None and source.machine == self.machine:
            return self.local
        if self.remote is None:
            raise RuntimeError(f"KV of {source.instance} (on {source.host}) is out of reach: no shared memory with it "
                               "and no KV transfer group; use kv_transport='torch'.")
        return self.remote

    def attach(self, source: KVCacheHandle) -> None:
        self.route(source).attach(source)

    def forget_others(self, keys: set[tuple]) -> None:
        for transport in (self.local, self.remote, self.gpu):
            if transport is not None:
                transport.forget_others(keys)

    def copy(self, source: KVCacheHandle, ov: Overlap, src_blocks: list[int], dst: KVCache, dst_blocks: list[int]) -> int:
        return self.route(source).copy(source, ov, src_blocks, dst, dst_blocks)

    def close(self) -> None:
        self.local.close()
        for transport in (self.remote, self.gpu):
            if transport is not None:
                transport.close()
