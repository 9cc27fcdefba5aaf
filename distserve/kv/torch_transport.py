"""KV pulls over torch.distributed point to point, for peers that share no memory (other
machines, or instances told to behave as if they were).

Every worker of a disaggregated deployment joins one KV transfer group: a gloo process group
of its own (independent of each instance's worker group), meeting at a TCP store the
controller hosts. A prefill worker serves its cache from a thread: it waits for a request
from any decode worker (the blocks, and the layers and heads that worker holds), gathers
those slices and sends them back. The decode worker scatters what it receives into its own
blocks. Tensors on a GPU are staged through host memory.
"""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distserve.kv.cache import KVCache, KVCacheHandle
from distserve.kv.transfer import KVTransport, Overlap

REQUEST_TAG, DATA_TAG = 11, 12
TIMEOUT = datetime.timedelta(days=7)  # a serving thread waits for requests as long as it lives


@dataclass(frozen=True)
class KVGroupSpec:
    """Where the KV transfer group meets, and the rank of an instance's worker 0 in it."""

    store_host: str
    store_port: int
    world_size: int
    first_rank: int = 0


def join_kv_group(spec: KVGroupSpec, rank: int, host: str) -> dist.ProcessGroupGloo:
    """Join the deployment's KV transfer group as `rank`, listening on `host`."""
    store = dist.TCPStore(spec.store_host, spec.store_port, is_master=False, timeout=datetime.timedelta(minutes=10))
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    options._timeout = TIMEOUT
    return dist.ProcessGroupGloo(dist.PrefixStore("distserve-kv", store), rank, spec.world_size, options)


def host_store(host: str) -> dist.TCPStore:
    """The store the KV group meets at (the controller holds it while the engine runs)."""
    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(minutes=10))


class KVServer:
    """Prefill side: answers pull requests for blocks of this worker's cache."""

    def __init__(self, group: dist.ProcessGroupGloo, cache: KVCache) -> None:
        self.group, self.cache = group, cache
        self.thread = threading.Thread(target=self._serve, name="distserve-kv-server", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        header = torch.empty(5, dtype=torch.long)
        while True:
            try:
                work = self.group.recv_anysource([header], REQUEST_TAG)
                work.wait()
                peer = work._source_rank()
                count, layer_start, layer_end, head_start, head_end = header.tolist()
                blocks = torch.empty(count, dtype=torch.long)
                self.group.recv([blocks], peer, REQUEST_TAG).wait()
                with torch.inference_mode():
                    kv = self.cache.tensor[layer_start:layer_end, :, :, :, head_start:head_end]
                    data = kv.index_select(2, blocks.to(kv.device)).cpu().contiguous()
                self.group.send([data], peer, DATA_TAG).wait()
            except RuntimeError:
                return  # the group was shut down: this worker is stopping


class TorchDistributedTransport(KVTransport):
    """Decode side: asks the source worker for the slices it needs and receives them."""

    name = "torch"

    def __init__(self, group: dist.ProcessGroupGloo) -> None:
        self.group = group

    def copy(self, source: KVCacheHandle, ov: Overlap, src_blocks: list[int], dst: KVCache, dst_blocks: list[int]) -> int:
        if source.kv_rank is None:
            raise RuntimeError(f"{source.instance} is not in the KV transfer group")
        header = torch.tensor([len(src_blocks), ov.src_layers.start, ov.src_layers.stop, ov.src_heads.start,
                               ov.src_heads.stop], dtype=torch.long)
        self.group.send([header], source.kv_rank, REQUEST_TAG).wait()
        self.group.send([torch.tensor(src_blocks, dtype=torch.long)], source.kv_rank, REQUEST_TAG).wait()
        layout = dst.layout
        shape = (ov.dst_layers.stop - ov.dst_layers.start, 2, len(src_blocks), layout.block_size,
                 ov.dst_heads.stop - ov.dst_heads.start, layout.head_dim)
        data = torch.empty(shape, dtype=layout.dtype)
        self.group.recv([data], source.kv_rank, DATA_TAG).wait()
        view = dst.tensor[ov.dst_layers, :, :, :, ov.dst_heads]
        index = torch.tensor(dst_blocks, dtype=torch.long, device=view.device)
        view.index_copy_(2, index, data.to(view.device))
        return data.numel() * data.element_size()
