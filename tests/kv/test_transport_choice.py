"""Which way a KV pull goes. A decode worker maps a source cache (shared memory, CUDA IPC) only
where it can, else pulls over torch.distributed; and there NCCL carries the KV between GPUs
only where every worker has a GPU of its own (NCCL refuses two ranks on one device), gloo
otherwise. The pulls themselves run end to end in tests/distributed (gloo) and
benchmarks/gpu_check.py (GPU)."""

from __future__ import annotations

import pytest
import torch

from distserve.config import InstanceConfig, PhaseConfig
from distserve.kv.cache import KVCacheHandle, KVLayout
from distserve.kv.torch_transport import data_backend
from distserve.kv.transfer import CudaIpcTransport, KVTransport, RoutingTransport, SharedMemoryTransport


def instance(name: str, role: str, device: str, gpu_ids: list[int] | None, tp: int = 1) -> InstanceConfig:
    return InstanceConfig(name=name, role=role, phase=PhaseConfig(tensor_parallel_size=tp), block_size=16, device=device,
                          num_threads=1, cpu_cores=None, seed=0, swap_space_gb=0.0, gpu_ids=gpu_ids)


def test_nccl_only_when_every_worker_has_its_own_gpu() -> None:
    two_gpus = [instance("prefill-0", "prefill", "cuda", [0]), instance("decode-0", "decode", "cuda", [1])]
    assert data_backend(two_gpus, "local", nccl_available=True) == "nccl"
    assert data_backend(two_gpus, "local", nccl_available=False) == "gloo"  # a torch built without NCCL
    # 1 prefill + 1 decode sharing one GPU, and TP 2 prefill + decode on 2 GPUs (the decode
    # worker shares GPU 0 with prefill worker 0)
    shared = [instance("prefill-0", "prefill", "cuda", [0]), instance("decode-0", "decode", "cuda", [0])]
    assert data_backend(shared, "local", nccl_available=True) == "gloo"
    wrapped = [instance("prefill-0", "prefill", "cuda", [0, 1], tp=2), instance("decode-0", "decode", "cuda", [0])]
    assert data_backend(wrapped, "local", nccl_available=True) == "gloo"
    # Ray gives each GPU worker a bundle with a GPU of its own, wherever it lands
    assert data_backend(shared, "ray", nccl_available=True) == "nccl"


def test_gloo_on_cpu() -> None:
    cpu = [instance("prefill-0", "prefill", "cpu", None), instance("decode-0", "decode", "cpu", None)]
    assert data_backend(cpu, "local", nccl_available=True) == "gloo"
    assert data_backend(cpu, "ray", nccl_available=True) == "gloo"


class Remote(KVTransport):
    """Stands in for the network transport: only its identity is checked."""

    name = "remote"

    def copy(self, source, ov, src_blocks, dst, dst_blocks) -> int:  # pragma: no cover - never called here
        raise AssertionError


def handle(machine: str, *, shm: str | None = None, ipc: tuple | None = None, gpu: str | None = None) -> KVCacheHandle:
    layout = KVLayout(num_blocks=4, block_size=16, layer_start=0, layer_end=2, head_start=0, head_end=2, head_dim=8,
                      dtype=torch.float32)
    return KVCacheHandle("prefill-0", 0, layout, shm, "cpu" if shm else "cuda:0", cuda_ipc=ipc, machine=machine, gpu=gpu)


def test_routing_maps_only_what_this_process_can_reach() -> None:
    local, gpu, remote = SharedMemoryTransport(), CudaIpcTransport(), Remote()
    router = RoutingTransport("node-a", local, remote, gpu)
    assert router.route(handle("node-a", shm="ds-x")) is local
    assert router.route(handle("node-b", shm="ds-x")) is remote  # another machine's shared memory
    # a GPU cache on this node, on a GPU this process does not see (as for Ray actors, which
    # see only their own GPU; and here, where torch sees none): over the network
    on_other_gpu = handle("node-a", ipc=("ipc-args",), gpu="GPU-00000000-0000-0000-0000-000000000000")
    assert router.route(on_other_gpu) is remote
    with pytest.raises(RuntimeError, match="kv_transport='torch'"):
        RoutingTransport("node-a", local, None, gpu).route(on_other_gpu)
