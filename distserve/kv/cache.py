"""The KV cache memory of one worker, and the handle a peer uses to reach it.

One tensor `[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]` (K and V of
every local layer). On CPU a prefill instance places it in named shared memory so that a
decode instance on the same machine can pull blocks straight out of it; on a GPU it exports
a CUDA IPC handle of it (torch's, as `torch.multiprocessing` shares CUDA tensors), through
which a decode worker on the same node maps it and copies device to device.
"""

from __future__ import annotations

import functools
import inspect
import mmap
import os
import uuid
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class KVLayout:
    """Which slice of the model's KV a worker holds: layers [layer_start, layer_end) and
    KV heads [head_start, head_end)."""

    num_blocks: int
    block_size: int
    layer_start: int
    layer_end: int
    head_start: int
    head_end: int
    head_dim: int
    dtype: torch.dtype

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_heads * self.head_dim * itemsize


@dataclass(frozen=True)
class KVCacheHandle:
    """How to reach a worker's KV cache from another process (picklable)."""

    instance: str
    rank: int
    layout: KVLayout
    shm_name: str | None  # named shared memory, for peers on this machine
    device: str
    host: str = "127.0.0.1"  # the address of the machine it lives on
    kv_rank: int | None = None  # its rank in the deployment's KV transfer group, if there is one
    cuda_ipc: tuple | None = None  # what rebuilds the cache tensor in a process of its node (GPU)
    machine: str = "127.0.0.1"  # which machine it shares memory with: its host, or its Ray node
    gpu: str | None = None  # the UUID of the GPU it is on
    pid: int = 0  # the process that holds it: a restarted instance's caches are new ones

    @property
    def key(self) -> tuple[str, int, str, int]:
        """Which cache this is: one worker of one instance, in one incarnation of its process."""
        return self.instance, self.rank, self.machine, self.pid

    @property
    def reachable_by_cuda_ipc(self) -> bool:
        """Whether this process can map the cache through CUDA IPC: it sees the cache's GPU (a
        Ray actor sees only the GPUs it was given)."""
        return self.cuda_ipc is not None and self.gpu is not None and visible_gpu(self.gpu) is not None


class KVCache:
    def __init__(self, layout: KVLayout, device: str, shared: bool) -> None:
        self.layout = layout
        self.device = device
        self._shm: shared_memory.SharedMemory | None = None
        if shared and device == "cpu":
            numel = 1
            for dim in layout.shape:
                numel *= dim
            nbytes = numel * torch.empty((), dtype=layout.dtype).element_size()
            self._shm = shared_memory.SharedMemory(create=True, size=max(nbytes, 1), name=f"ds-{uuid.uuid4().hex[:20]}")
            self.tensor = torch.frombuffer(self._shm.buf, dtype=layout.dtype, count=numel).view(layout.shape)
            # it reads as zeros already; writing them faults the pages in now, not during steps (left
            # to fault there, the demo's decode ran at 62-197 ms a token instead of 14-18)
            self.tensor.zero_()
        elif device == "cpu":
            self.tensor, self._pages = zeros_on_huge_pages(layout.shape, layout.dtype)
        else:
            self.tensor = torch.zeros(layout.shape, dtype=layout.dtype, device=device)
        self._cuda_ipc = cuda_ipc_handle(self.tensor) if shared and self.tensor.is_cuda else None

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of local layer `index`: [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.tensor[index, 0], self.tensor[index, 1]

    def handle(
        self, instance: str, rank: int, host: str = "127.0.0.1", kv_rank: int | None = None, machine: str | None = None
    ) -> KVCacheHandle:
        gpu = gpu_uuid(self.tensor.device.index) if self.tensor.is_cuda else None
        return KVCacheHandle(instance, rank, self.layout, self._shm.name if self._shm else None, self.device, host, kv_rank,
                             self._cuda_ipc, machine or host, gpu, os.getpid())

    def close(self) -> None:
        """Remove the shared-memory name; the memory goes when the last mapping does."""
        if self._shm is not None:
            self._shm.unlink()
            self._shm = None


HUGE_PAGE = 2 << 20


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, mmap.mmap]:
    """A zeroed CPU tensor in anonymous memory that the kernel is asked to back with 2 MiB pages
    (transparent huge pages, `madvise` mode): decode attention reads a sequence's blocks
    scattered over the cache, and with 4 KiB pages every few KiB read is a TLB miss and a
    restart of the hardware prefetcher (decode attention over an OPT-shaped cache ran ~20%
    faster on 2 MiB pages, docs/benchmarks.md). Returns the tensor and the mapping it lives in,
    which must outlive it. Where the kernel has no huge pages, the memory is ordinary pages."""
    numel = 1
    for dim in shape:
        numel *= dim
    nbytes = max(numel * torch.empty((), dtype=dtype).element_size(), 1)
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # whole huge pages, whatever the start
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    tensor = torch.frombuffer(buf, dtype=torch.uint8, count=size)
    offset = -tensor.data_ptr() % HUGE_PAGE  # the mapping starts on a 4 KiB page; the tensor on a 2 MiB one
    tensor = tensor[offset:offset + nbytes].view(dtype)[:numel].view(shape)
    tensor.zero_()  # fault the pages in now, huge where the kernel can
    return tensor, buf


def attach_shared(handle: KVCacheHandle) -> tuple[torch.Tensor, mmap.mmap]:
    """A peer's KV cache tensor, mapped from its named shared memory.

    Mapped directly rather than through `SharedMemory`, whose resource tracker would take
    the segment as this process's own (and unlink it when this process exits).
    """
    assert handle.shm_name is not None
    fd = os.open(os.path.join(SHM_DIR, handle.shm_name), os.O_RDWR)
    try:
        # populate the page tables now: a pull would otherwise take a page fault every 4 KiB
        buf = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)
    layout = handle.layout
    numel = 1
    for dim in layout.shape:
        numel *= dim
    tensor = torch.frombuffer(buf, dtype=layout.dtype, count=numel).view(layout.shape)
    return tensor, buf


def cuda_ipc_handle(tensor: torch.Tensor) -> tuple:
    """The arguments that rebuild `tensor` in another process of this node: its allocation's
    CUDA IPC handle, offsets, shape and dtype (what `torch.multiprocessing` pickles)."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(tensor)
    return args


def gpu_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


@functools.cache
def visible_gpu(uuid: str) -> int | None:
    """This process's index of the GPU `uuid`, or None when it cannot see that GPU."""
    return next((i for i in range(torch.cuda.device_count()) if gpu_uuid(i) == uuid), None)


def attach_cuda(handle: KVCacheHandle) -> torch.Tensor:
    """A peer's KV cache tensor on its GPU, mapped into this process through CUDA IPC.

    The handle numbers the GPU as the peer's process does; this process may number its GPUs
    otherwise (CUDA_VISIBLE_DEVICES), so the GPU is found here by its UUID."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    index = visible_gpu(handle.gpu) if handle.gpu is not None else None
    if handle.cuda_ipc is None or index is None:
        raise RuntimeError(f"the KV cache of {handle.instance} is on a GPU this process cannot see")
    args = inspect.signature(rebuild_cuda_tensor).bind(*handle.cuda_ipc)
    args.arguments["storage_device"] = index
    return rebuild_cuda_tensor(*args.args)
