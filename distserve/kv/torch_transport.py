"""KV pulls over torch.distributed point to point, for peers that share no memory (other
machines, or instances told to behave as if they were).

Every worker of a disaggregated deployment joins one KV transfer group (independent of each
instance's worker group), meeting at a TCP store the controller hosts. Requests go through
that store: a decode worker takes the next ticket of the prefill worker it pulls from (an
atomic `add`) and writes its request under that ticket (its rank, the blocks, and the layers
and heads it holds). A prefill worker serves its cache from a thread that waits for its
tickets in order, over a store connection of its own; it gathers the slices asked for and
sends them back over the data channel: a gloo group, with GPU tensors staged through host
memory; or, when every worker has a GPU of its own, NCCL, device to device (NCCL refuses two
ranks on one GPU). The decode worker scatters what it receives into its own blocks. The
server stops at a ticket its own worker writes with no request, so it is never inside a
collective library's receive when the process exits (a thread left in gloo's receive can
abort the process at exit).

The KV goes in chunks of at most `CHUNK_BYTES` through two staging buffers on each side,
kept for the worker's life: the server gathers chunk i+1 while chunk i is on the wire, the
puller scatters chunk i while chunk i+1 arrives. Fresh buffers per pull would cost a page
fault per 4 KiB (80 ms for a 94 MB pull on the 2-core CPU machine, more than the copy).
"""

from __future__ import annotations

import datetime
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from distserve.kv.cache import KVCache, KVCacheHandle
from distserve.kv.transfer import KVTransport, Overlap

if TYPE_CHECKING:
    from distserve.config import InstanceConfig

DATA_TAG = 12
REQUESTS = "distserve-kv-requests"
CHUNK_BYTES = 4 << 20  # measured best of 4 / 16 MiB on the CPU machine (benchmarks/kv_transfer.py)
TIMEOUT = datetime.timedelta(minutes=10)  # a pull is answered in far less
IDLE = datetime.timedelta(days=7)  # a serving thread waits for requests as long as it lives


@dataclass(frozen=True)
class KVGroupSpec:
    """Where the KV transfer group meets, and the rank of an instance's worker 0 in it."""

    store_host: str
    store_port: int
    world_size: int
    first_rank: int = 0
    data_backend: str = "gloo"  # what carries the KV: gloo (through host memory) or nccl


def data_backend(instances: list[InstanceConfig], backend: str, nccl_available: bool) -> str:
    """What should carry the KV of a deployment's instances: NCCL on GPUs when torch has it and
    no two workers share a GPU, else gloo. Ray gives each GPU worker a GPU of its own (one per
    bundle); local processes share them when there are more workers than GPUs."""
    if not instances or not instances[0].device.startswith("cuda") or not nccl_available:
        return "gloo"
    if backend == "ray":
        return "nccl"
    gpus = [gpu for config in instances for gpu in config.gpu_ids or [None]]
    return "nccl" if None not in gpus and len(set(gpus)) == len(gpus) else "gloo"


def request_key(server: int, ticket: int | str) -> str:
    """The store key of ticket `ticket` of the KV server of rank `server` ("tickets": its counter)."""
    return f"{REQUESTS}/{server}/{ticket}"


@dataclass
class KVGroup:
    """One worker's membership of the KV transfer group, as `rank`: requests go through
    `store`; the KV over `data` (`control`, gloo, or NCCL), in tensors on `device`."""

    spec: KVGroupSpec
    rank: int
    store: dist.TCPStore
    control: dist.ProcessGroupGloo
    data: dist.ProcessGroup
    device: torch.device

    def ask(self, server: int, request: list[int]) -> None:
        """Queue `request` for the KV server of rank `server` (an empty one stops it)."""
        ticket = self.store.add(request_key(server, "tickets"), 1)
        self.store.set(request_key(server, ticket), torch.tensor(request, dtype=torch.long).numpy().tobytes())

    def requests(self) -> Iterator[tuple[int, list[int]]]:
        """This rank's requests, in ticket order, as (requesting rank, request), over a store
        connection of its own (a wait holds its connection); ends at an empty request, or
        when the store is gone."""
        store = dist.TCPStore(self.spec.store_host, self.spec.store_port, is_master=False, timeout=IDLE)
        ticket = 1
        while True:
            key = request_key(self.rank, ticket)
            try:
                store.wait([key])
            except dist.DistStoreError:
                continue  # a week without requests
            except dist.DistError:
                return  # the store's host (the controller) is gone
            value = store.get(key)
            store.delete_key(key)
            ticket += 1
            if not value:
                return
            request = torch.frombuffer(bytearray(value), dtype=torch.long).tolist()
            yield request[0], request[1:]

    def close(self) -> None:
        """Break off the group."""
        if self.data is not self.control:
            self.data.abort()
        self.control.abort()


def join_kv_group(spec: KVGroupSpec, rank: int, host: str, device: str) -> KVGroup:
    """Join the deployment's KV transfer group as `rank`, listening on `host`; `device` holds
    this worker's cache."""
    store = dist.TCPStore(spec.store_host, spec.store_port, is_master=False, timeout=TIMEOUT)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    options._timeout = TIMEOUT
    control = dist.ProcessGroupGloo(dist.PrefixStore("distserve-kv", store), rank, spec.world_size, options)
    if spec.data_backend != "nccl":
        return KVGroup(spec, rank, store, control, control, torch.device("cpu"))
    nccl_options = dist.ProcessGroupNCCL.Options()
    nccl_options._timeout = TIMEOUT
    data = dist.ProcessGroupNCCL(dist.PrefixStore("distserve-kv-data", store), rank, spec.world_size, nccl_options)
    return KVGroup(spec, rank, store, control, data, torch.device(device))


def host_store(host: str) -> dist.TCPStore:
    """The store the KV group meets at (the controller holds it while the engine runs)."""
    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(minutes=10))


class Staging:
    """Two buffers on `device` that chunks of a pull go through, in turn; each grown to the
    largest chunk asked for, and kept."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers = [torch.empty(0, dtype=torch.uint8, device=device) for _ in range(2)]

    def buffer(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Buffer `index % 2`, as a contiguous tensor of `shape`."""
        nbytes = math.prod(shape) * dtype.itemsize
        k = index % 2
        if self.buffers[k].numel() < nbytes:
            self.buffers[k] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self.buffers[k][:nbytes].view(dtype).view(shape)


class KVServer:
    """Prefill side: answers pull requests for blocks of this worker's cache."""

    def __init__(self, group: KVGroup, cache: KVCache) -> None:
        self.group, self.cache = group, cache
        self.thread = threading.Thread(target=self._serve, name="distserve-kv-server", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        if self.cache.tensor.is_cuda:
            torch.cuda.set_device(self.cache.tensor.device)  # this thread's NCCL calls use its device
        staging = Staging(self.group.device)
        for peer, (layer_start, layer_end, head_start, head_end, per_chunk, *blocks) in self.group.requests():
            kv = self.cache.tensor[layer_start:layer_end, :, :, :, head_start:head_end]
            try:
                self._send(kv, torch.tensor(blocks, dtype=torch.long, device=kv.device).split(per_chunk), staging, peer)
            except RuntimeError:
                return  # the group was broken off

    def close(self) -> None:
        """Stop serving: a request with nothing in it ends the thread's wait."""
        try:
            self.group.ask(self.group.rank, [])
        except dist.DistError:
            return  # the store is gone, and with it the thread's wait
        self.thread.join(timeout=10)

    def _send(self, kv: torch.Tensor, chunks: tuple[torch.Tensor, ...], staging: Staging, peer: int) -> None:
        sends: list[dist.Work | None] = [None, None]  # the send in flight from each buffer
        with torch.inference_mode():
            for i, blocks in enumerate(chunks):
                if sends[i % 2] is not None:
                    sends[i % 2].wait()  # that buffer is free again
                shape = (*kv.shape[:2], len(blocks), *kv.shape[3:])
                buffer = staging.buffer(i, shape, kv.dtype)
                if buffer.device == kv.device:
                    torch.index_select(kv, 2, blocks, out=buffer)
                else:
                    buffer.copy_(kv.index_select(2, blocks))  # a GPU cache through host memory
                sends[i % 2] = self.group.data.send([buffer], peer, DATA_TAG)
        for work in sends:
            if work is not None:
                work.wait()


class TorchDistributedTransport(KVTransport):
    """Decode side: asks the source worker for the slices it needs and receives them."""

    name = "torch"

    def __init__(self, group: KVGroup, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.group, self.chunk_bytes = group, chunk_bytes
        self.staging = Staging(group.device)

    def copy(self, source: KVCacheHandle, ov: Overlap, src_blocks: list[int], dst: KVCache, dst_blocks: list[int]) -> int:
        if source.kv_rank is None:
            raise RuntimeError(f"{source.instance} is not in the KV transfer group")
        view = dst.tensor[ov.dst_layers, :, :, :, ov.dst_heads]
        block_bytes = view[:, :, :1].numel() * view.element_size()
        per_chunk = max(1, self.chunk_bytes // block_bytes)  # the server sends the chunks this asks for
        peer = source.kv_rank
        self.group.ask(peer, [self.group.rank, ov.src_layers.start, ov.src_layers.stop, ov.src_heads.start,
                              ov.src_heads.stop, per_chunk, *src_blocks])
        chunks = torch.tensor(dst_blocks, dtype=torch.long, device=view.device).split(per_chunk)

        def receive(i: int) -> tuple[torch.Tensor, dist.Work]:
            shape = (*view.shape[:2], len(chunks[i]), *view.shape[3:])
            buffer = self.staging.buffer(i, shape, view.dtype)
            return buffer, self.group.data.recv([buffer], peer, DATA_TAG)

        pending = [receive(i) for i in range(min(2, len(chunks)))]
        for i, blocks in enumerate(chunks):
            buffer, work = pending[i % 2]
            work.wait()
            view.index_copy_(2, blocks, buffer.to(view.device))
            if i + 2 < len(chunks):
                pending[i % 2] = receive(i + 2)
        if view.is_cuda:
            torch.cuda.current_stream(view.device).synchronize()  # NCCL's wait() only orders the stream
        return block_bytes * len(dst_blocks)
