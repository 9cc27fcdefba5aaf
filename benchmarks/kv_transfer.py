"""KV transfer cost of disaggregated serving on this machine.

For prompts of 128, 512 and 2048 tokens, runs the built-in model disaggregated (1 prefill + 1
decode instance, one core each) and reports per request: KV bytes moved, the pull's time
and effective bandwidth, a plain memcpy of the same bytes, and the transfer's share of the
request's end-to-end latency; once per transport: shared memory (one machine) and
torch.distributed point to point over gloo (what instances on two machines use; here over
loopback).

    python -m benchmarks.kv_transfer [--model M] [--requests 8] [--max-tokens 64] [--transports shm torch]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.report import report
from distserve import LLM, SamplingParams

LENGTHS = (128, 512, 2048)


def memcpy_seconds(num_bytes: int, repeats: int = 20) -> float:
    """Median time of copying `num_bytes` from one buffer to another (one thread, like the pull)."""
    torch.set_num_threads(1)
    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=8, help="requests per prompt length")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--transports", nargs="+", default=["shm", "torch"], choices=["shm", "torch"])
    parser.add_argument("--out", default="benchmarks/results/kv_transfer.json")
    args = parser.parse_args()

    rows = []
    for transport in args.transports:
        rows.extend(measure(args, transport))
    report(rows, [("transport", "transport", ""), ("prompt", "prompt_tokens", "d"), ("KV bytes", "kv_bytes", ","),
                  ("pull ms", "transfer_ms_median", ".2f"), ("pull GB/s", "bandwidth_gbps", ".2f"), ("memcpy ms", "memcpy_ms", ".2f"),
                  ("memcpy GB/s", "memcpy_gbps", ".2f"), ("e2e ms", "e2e_ms_median", ".0f"), ("share %", "transfer_share_pct", ".3f")],
           args.out, model=args.model or "SmolLM2-135M-Instruct", max_tokens=args.max_tokens)


def measure(args: argparse.Namespace, transport: str) -> list[dict]:
    rows = []
    with LLM(args.model, mode="disaggregated", decode={"kv_cache_gb": 2.0}, prefill={"kv_cache_gb": 2.0},
             kv_transport=transport) as llm:
        vocab = llm.engine.model_config.vocab_size
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        llm.generate({"prompt_token_ids": [100] * 16}, params, use_tqdm=False)  # warm up both instances
        for length in LENGTHS:
            g = torch.Generator().manual_seed(length)
            prompts = [{"prompt_token_ids": torch.randint(100, vocab, (length,), generator=g).tolist()} for _ in range(args.requests)]
            outputs = []
            for prompt in prompts:  # one at a time: the transfer alone, not queued behind others
                outputs.extend(llm.generate(prompt, params, use_tqdm=False))
            seconds = [o.metrics.transfer_seconds for o in outputs]
            num_bytes = outputs[0].metrics.transfer_bytes
            copy = memcpy_seconds(num_bytes)
            share = [o.metrics.transfer_seconds / o.metrics.e2e_latency for o in outputs]
            rows.append({
                "transport": transport,
                "prompt_tokens": length,
                "kv_bytes": num_bytes,
                "transfer_ms_median": 1e3 * statistics.median(seconds),
                "transfer_ms_max": 1e3 * max(seconds),
                "bandwidth_gbps": num_bytes / statistics.median(seconds) / 1e9,
                "memcpy_ms": 1e3 * copy,
                "memcpy_gbps": num_bytes / copy / 1e9,
                "e2e_ms_median": 1e3 * statistics.median(o.metrics.e2e_latency for o in outputs),
                "transfer_share_pct": 100 * statistics.median(share),
            })
    return rows


if __name__ == "__main__":
    main()
