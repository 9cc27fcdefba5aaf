"""Decode attention alone: the native paged kernel over the attention of one of the offline
benchmark's shapes (SmolLM2's by default: 9 query / 3 KV heads, head dim 64, 30 layers), blocks
of 16 scattered over a cache on huge pages (as the engine's), by batch size, with the KV it
reads per second. With `--against REV` (a git revision), the kernels as they were there are
built too and the two alternate call by call (this machine's speed drifts); with
`--same-output`, their outputs must be equal bit for bit.

    python -m benchmarks.decode_attention [--shape smollm2|llama-gqa-150m|opt-200m]
                                          [--against REV [--same-output]] [--block-size 16] [--out FILE]

Prints a table and writes benchmarks/results/decode_attention-SHAPE.json (or FILE).
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.offline_throughput import WORK_DIR, shape_config
from benchmarks.report import report
from distserve.kernels import SOURCES, cpu_ops
from distserve.kv.cache import zeros_on_huge_pages
from distserve.weights.gguf import cache_root

RESULTS = Path("benchmarks/results")
BLOCK = 16
BATCHES = (1, 8, 16, 64)
REPEATS = 12


def build(revision: str):  # noqa: ANN201 - the compiled module
    """The kernels' sources as they were at `revision` (the files that existed), compiled."""
    from torch.utils.cpp_extension import load_inline

    sources = []
    for path in SOURCES:
        show = subprocess.run(["git", "show", f"{revision}:distserve/kernels/{path.name}"], capture_output=True, text=True)
        if show.returncode == 0:
            sources.append(show.stdout)
    folder = cache_root() / "kernels" / "benchmark-against"
    folder.mkdir(parents=True, exist_ok=True)
    return load_inline(name="distserve_cpu_ops_against", cpp_sources=["\n".join(sources)], functions=["paged_attention_decode"],
                       extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"], extra_ldflags=["-fopenmp"],
                       build_directory=str(folder), verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default=None, help="a git revision whose kernels to compare with")
    parser.add_argument("--same-output", action="store_true", help="require bit-equal outputs from the two")
    parser.add_argument("--block-size", type=int, default=BLOCK)
    parser.add_argument("--shape", default="smollm2", help="a shape of benchmarks/offline_throughput.py")
    parser.add_argument("--work-dir", default=str(WORK_DIR))
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/decode_attention-SHAPE.json")
    args = parser.parse_args()
    block = args.block_size
    model = shape_config(args.shape, Path(args.work_dir))
    heads, kv_heads, head_dim, layers = model.num_attention_heads, model.num_kv_heads, model.head_dim, model.num_layers
    torch.set_num_threads(2)
    kernels = {"current": cpu_ops()}
    if args.against:
        kernels["against"] = build(args.against)
    rng = random.Random(0)
    num_blocks = max(BATCHES) * -(-640 // block)
    cache, _mapping = zeros_on_huge_pages((layers, 2, num_blocks, block, kv_heads, head_dim), torch.float32)
    cache.normal_()
    rows = []
    for batch in BATCHES:
        lens = [rng.randrange(64, 600) for _ in range(batch)]
        free = list(range(num_blocks))
        rng.shuffle(free)  # as a cache looks after some churn
        tables = [[free.pop() for _ in range(-(-n // block))] for n in lens]
        width = max(map(len, tables))
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        seq_lens = torch.tensor(lens)
        q = torch.randn(batch, heads, head_dim)
        outs = {name: m.paged_attention_decode(q, cache[0, 0], cache[0, 1], block_tables, seq_lens, 0.125)
                for name, m in kernels.items()}
        if "against" in outs:
            if args.same_output:
                assert torch.equal(outs["current"], outs["against"]), "the two kernels disagree"
            torch.testing.assert_close(outs["current"], outs["against"], atol=1e-5, rtol=1e-4)
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for _ in range(REPEATS):
            for name, m in kernels.items():
                start = time.perf_counter()
                for layer in range(layers):
                    m.paged_attention_decode(q, cache[layer, 0], cache[layer, 1], block_tables, seq_lens, 0.125)
                times[name].append(time.perf_counter() - start)
        kv_bytes = sum(lens) * kv_heads * head_dim * 4 * 2 * layers
        row = {"batch": batch, "kv_mb": kv_bytes / 1e6}
        for name in kernels:
            seconds = statistics.median(times[name])
            row[f"{name}_ms"], row[f"{name}_gbps"] = 1e3 * seconds, kv_bytes / seconds / 1e9
        rows.append(row)
    columns = [("batch", "batch", "d"), ("KV MB", "kv_mb", ".0f")]
    for name in kernels:
        columns += [(f"{name} ms", f"{name}_ms", ".2f"), (f"{name} GB/s", f"{name}_gbps", ".1f")]
    report(rows, columns, args.out or RESULTS / f"decode_attention-{args.shape}.json",
           shape={"name": args.shape, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "layers": layers},
           against=args.against, block_size=block)


if __name__ == "__main__":
    main()
