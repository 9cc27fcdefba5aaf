"""The torch.distributed KV pull between two processes that share no memory: a prefill-side
server process and this process pulling, in chunks through the staging buffers, only the
layers and heads the destination holds and only the blocks asked for."""

from __future__ import annotations

import multiprocessing
import threading

import torch

from distserve.kv.cache import KVCache, KVCacheHandle, KVLayout
from distserve.kv.torch_transport import KVGroupSpec, KVServer, TorchDistributedTransport, host_store, join_kv_group
from distserve.kv.transfer import overlap

SOURCE = KVLayout(num_blocks=16, block_size=4, layer_start=0, layer_end=4, head_start=0, head_end=4, head_dim=8,
                  dtype=torch.float32)
# a decode worker of another layout: pipeline stage of layers 1-3, tensor-parallel shard of heads 2-3
DESTINATION = KVLayout(num_blocks=16, block_size=4, layer_start=1, layer_end=4, head_start=2, head_end=4, head_dim=8,
                       dtype=torch.float32)


def source_kv() -> torch.Tensor:
    return torch.randn(SOURCE.shape, generator=torch.Generator().manual_seed(3))


def serve(spec: KVGroupSpec, stop: multiprocessing.synchronize.Event) -> None:
    errors: list[threading.ExceptHookArgs] = []
    threading.excepthook = errors.append
    group = join_kv_group(spec, 0, "127.0.0.1", "cpu")
    cache = KVCache(SOURCE, "cpu", shared=False)
    cache.tensor.copy_(source_kv())
    server = KVServer(group, cache)
    stop.wait(120)
    server.close()
    assert not server.thread.is_alive() and not errors  # the serving thread ended by returning
    group.close()


def test_pull_in_chunks_takes_only_the_overlap() -> None:
    store = host_store("127.0.0.1")
    spec = KVGroupSpec("127.0.0.1", store.port, world_size=2)
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    server = ctx.Process(target=serve, args=(spec, stop))
    server.start()
    group = join_kv_group(spec, 1, "127.0.0.1", "cpu")
    try:
        ov = overlap(SOURCE, DESTINATION)
        assert ov is not None
        block_bytes = 3 * 2 * 4 * 2 * 8 * 4  # layers x K,V x block size x heads x head dim x fp32
        transport = TorchDistributedTransport(group, chunk_bytes=2 * block_bytes)  # 2 blocks a chunk
        source = KVCacheHandle("prefill-0", 0, SOURCE, None, "cpu", kv_rank=0)
        expected = source_kv()
        # 1, 2, 3 and 5 chunks (odd counts end on either staging buffer), blocks in any order
        for src_blocks, dst_blocks in (([5], [9]), ([0, 1, 2, 3], [4, 5, 6, 7]), ([15, 3, 8, 1, 0], [0, 1, 2, 3, 11]),
                                       ([7, 6, 5, 4, 12, 13, 14, 2, 9], [15, 14, 13, 12, 1, 2, 3, 8, 10])):
            dst = KVCache(DESTINATION, "cpu", shared=False)
            moved = transport.copy(source, ov, src_blocks, dst, dst_blocks)
            assert moved == len(src_blocks) * block_bytes
            want = torch.zeros(DESTINATION.shape)
            want[:, :, dst_blocks] = expected[ov.src_layers, :, src_blocks][..., ov.src_heads, :]
            assert torch.equal(dst.tensor, want)  # the blocks asked for, and nothing else written
    finally:
        group.close()
        stop.set()
        server.join(30)
    assert server.exitcode == 0
