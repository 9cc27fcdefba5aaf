"""Prefill attention alone, one layer of one of the offline benchmark's shapes, one causal
prompt at a time: distserve's native kernel over its paged cache (blocks of 16, scattered,
the query a strided view of a QKV projection, as in the engine), torch's SDPA (its CPU flash
attention) over the same keys laid out contiguously, and, when its environment is there,
vLLM's CPU attention kernel (`cpu_attention_with_kv_cache`, its `vec` path for float32, blocks
of 128, the cache written by its own `cpu_attn_reshape_and_cache`). Every output is checked
against SDPA's. Both processes draw the same inputs (same seed, same torch); the rounds
alternate between distserve's process and vLLM's (this machine's speed drifts), and a
system's time for a length is its fastest call.

    python -m benchmarks.prefill_attention [--shape llama-gqa-150m|smollm2|opt-200m]
        [--lengths 512 1024 2048] [--rounds 3] [--vllm-python PATH] [--out FILE]

Prints a table (ms and GFLOP/s of the causal half) and writes
benchmarks/results/prefill_attention-SHAPE.json (or FILE).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.offline_throughput import WORK_DIR, shape_config
from benchmarks.report import report
from distserve.kernels import cpu_ops
from distserve.layers.attention import PREFILL_PACK_BYTES

RESULTS = Path("benchmarks/results")
BLOCK = 16
REPEATS = 5

def inputs(heads: int, kv_heads: int, head_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A prompt's q (a view of its QKV projection's rows), k and v, the same in either process."""
    g = torch.Generator().manual_seed(length)
    qkv = torch.randn(length, (heads + 2 * kv_heads) * head_dim, generator=g)
    q = qkv[:, : heads * head_dim]
    k, v = qkv[:, heads * head_dim :].view(length, 2, kv_heads, head_dim).unbind(1)
    return q, k, v


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    length = q.shape[0]
    out = F.scaled_dot_product_attention(q.reshape(length, heads, head_dim).transpose(0, 1), k.transpose(0, 1),
                                         v.transpose(0, 1), is_causal=True, enable_gqa=True)
    return out.transpose(0, 1).reshape(length, heads * head_dim)


def fastest(call: Callable[[], object], repeats: int) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


# run by vLLM's interpreter, after the three functions above (their source) and its imports
VLLM = """
heads, kv_heads, head_dim, repeats, *lengths = map(int, sys.argv[1:])
torch.set_num_threads(2)
block, results = 128, {}
for length in lengths:
    q, k, v = inputs(heads, kv_heads, head_dim, length)
    blocks = -(-length // block)
    cache = torch.zeros(blocks, kv_heads, 2 * block, head_dim)
    key_cache, value_cache = cache.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k.contiguous(), v.contiguous(), key_cache, value_cache, torch.arange(length), "vec")
    starts, lens = torch.tensor([0, length], dtype=torch.int32), torch.tensor([length], dtype=torch.int32)
    table = torch.arange(blocks, dtype=torch.int32)[None]
    metadata = ops.cpu_attn_get_scheduler_metadata(num_reqs=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        seq_lens=lens, dtype=torch.float32, query_start_loc=starts, causal=True, sliding_window_size=-1, isa="vec",
        enable_kv_split=False)
    query, out = q.view(length, heads, head_dim), torch.empty(length, heads, head_dim)
    def call():
        ops.cpu_attention_with_kv_cache(query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=starts, seq_lens=lens, scale=head_dim ** -0.5, causal=True, alibi_slopes=None,
            sliding_window=-1, block_table=table, softcap=0.0, scheduler_metadata=metadata, s_aux=None)
    seconds = fastest(call, repeats)
    error = (out.reshape(length, -1) - sdpa(q, k, v, heads, head_dim)).abs().max().item()
    results[length] = {"seconds": seconds, "max_error": error}
print("\\n" + json.dumps(results))
"""


def distserve_and_sdpa(heads: int, kv_heads: int, head_dim: int, length: int) -> dict[str, dict[str, float]]:
    ops = cpu_ops()
    q, k, v = inputs(heads, kv_heads, head_dim, length)
    blocks = -(-length // BLOCK)
    table = torch.randperm(2 * blocks, generator=torch.Generator().manual_seed(0))[:blocks]  # scattered
    cache = torch.zeros(2, 2 * blocks, BLOCK, kv_heads, head_dim)
    slots = torch.arange(length)
    cache[0, table[slots // BLOCK], slots % BLOCK] = k
    cache[1, table[slots // BLOCK], slots % BLOCK] = v
    out = torch.empty(length, heads * head_dim)
    starts, lens = torch.tensor([0, length]), torch.tensor([length])

    def call() -> None:
        ops.prefill_attention(q, cache[0], cache[1], table[None], starts, lens, heads, head_dim ** -0.5, out,
                              PREFILL_PACK_BYTES)

    seconds = fastest(call, REPEATS)
    expected = sdpa(q, k, v, heads, head_dim)
    qh, kh, vh = (x.reshape(length, -1, head_dim).transpose(0, 1).contiguous() for x in (q, k, v))  # [heads, length, dim]
    sdpa_seconds = fastest(lambda: F.scaled_dot_product_attention(qh[None], kh[None], vh[None], is_causal=True, enable_gqa=True),
                           REPEATS)
    return {"distserve": {"seconds": seconds, "max_error": (out - expected).abs().max().item()},
            "sdpa": {"seconds": sdpa_seconds, "max_error": 0.0}}


def vllm_round(python: str, heads: int, kv_heads: int, head_dim: int, lengths: list[int]) -> dict[int, dict[str, float]]:
    with tempfile.TemporaryDirectory() as cache_root:
        head = ["from __future__ import annotations", "import json, sys, time", "import torch",
                "import torch.nn.functional as F", "from vllm import _custom_ops as ops"]
        script = "\n".join([*head, *(inspect.getsource(f) for f in (inputs, sdpa, fastest)), VLLM])
        done = subprocess.run([python, "-c", script, *map(str, (heads, kv_heads, head_dim, REPEATS, *lengths))],
                              capture_output=True, text=True,
                              env=dict(os.environ, VLLM_CACHE_ROOT=cache_root, VLLM_TARGET_DEVICE="cpu"))
    if done.returncode != 0:
        raise RuntimeError(f"vLLM's kernel failed: {done.stderr[-2000:]}")
    return {int(n): r for n, r in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-gqa-150m", help="a shape of benchmarks/offline_throughput.py")
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    parser.add_argument("--work-dir", default=str(WORK_DIR))
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/prefill_attention-SHAPE.json")
    args = parser.parse_args()
    model = shape_config(args.shape, Path(args.work_dir))
    heads, kv_heads, head_dim = model.num_attention_heads, model.num_kv_heads, model.head_dim
    torch.set_num_threads(2)
    with_vllm = Path(args.vllm_python).exists()
    if not with_vllm:
        print(f"no vLLM at {args.vllm_python}: distserve and SDPA only")
    best: dict[tuple[str, int], dict[str, float]] = {}

    def keep(system: str, length: int, result: dict[str, float]) -> None:
        if (system, length) not in best or result["seconds"] < best[system, length]["seconds"]:
            best[system, length] = result

    for _ in range(args.rounds):
        for length in args.lengths:
            for system, result in distserve_and_sdpa(heads, kv_heads, head_dim, length).items():
                keep(system, length, result)
        if with_vllm:
            for length, result in vllm_round(args.vllm_python, heads, kv_heads, head_dim, args.lengths).items():
                keep("vllm", length, result)
    rows = []
    for (system, length), result in sorted(best.items(), key=lambda item: (item[0][1], item[0][0])):
        flops = 4 * heads * head_dim * length * (length + 1) / 2  # QK^T and PV over the causal half
        rows.append({"length": length, "system": system, "ms": 1e3 * result["seconds"],
                     "gflops": flops / result["seconds"] / 1e9, "max_error": result["max_error"]})
    columns = [("length", "length", "d"), ("system", "system", "s"), ("ms", "ms", ".2f"), ("GFLOP/s", "gflops", ".0f"),
               ("max error vs SDPA", "max_error", ".1e")]
    report(rows, columns, args.out or RESULTS / f"prefill_attention-{args.shape}.json",
           shape=args.shape, heads=heads, kv_heads=kv_heads, head_dim=head_dim, threads=2)


if __name__ == "__main__":
    main()
