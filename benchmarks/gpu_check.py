"""The CUDA path, checked in one short run on a GPU (issue: "run the CUDA path once").

1. A Llama-shaped random checkpoint (1B-class: hidden 2048, 16 layers, GQA 32/8 heads) in
   fp16 and fp32. transformers' greedy tokens on the GPU against distserve's, colocated and
   disaggregated (1 prefill + 1 decode instance sharing the GPU): fp32 must match token for
   token; fp16 is reported as the share of tokens equal before the first difference (two
   kernel sets round fp16 differently, and random weights leave near ties).
2. distserve colocated == disaggregated in fp16 (the same kernels: must be equal).
3. KV pull bandwidth of the disaggregated run (CUDA IPC between the two processes) against a
   device-to-device copy of the same bytes.
4. The KV over torch.distributed (`kv_transport="torch"`), as between machines: fp16 tokens
   must equal the colocated run's. On one GPU it goes over gloo through host memory; with two
   or more GPUs the prefill and decode workers get a GPU each and it goes over NCCL.

    python -m benchmarks.gpu_check [--out benchmarks/results/gpu_check.json]

Exits 1 when a must-match check fails. Needs a GPU; about 3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.checkpoints import random_checkpoint
from distserve import LLM, SamplingParams

VOCAB = 49152  # SmolLM2's tokenizer, which the random checkpoint reads its prompts with
NUM_PROMPTS, PROMPT_LENS, NEW_TOKENS = 8, (17, 64, 130, 300, 511, 700, 1023, 1500), 48


def checkpoint(folder: Path, dtype: torch.dtype) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=VOCAB, max_position_embeddings=4096,
                         rope_theta=500000.0, torch_dtype=dtype, initializer_range=0.05)
    return random_checkpoint(folder, str(dtype).split(".")[-1], config, dtype)


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS[:NUM_PROMPTS]]


def hf_tokens(path: Path, dtype: torch.dtype, batch: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    out = []
    with torch.inference_mode():
        for p in batch:
            ids = torch.tensor([p], device="cuda")
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 min_new_tokens=NEW_TOKENS, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    del model
    torch.cuda.empty_cache()
    return out


def distserve_run(path: Path, dtype: str, mode: str, batch: list[list[int]], **kw) -> tuple[list[list[int]], list]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    with LLM(str(path), mode=mode, dtype=dtype, device="cuda", kv_cache_gb=4.0, **kw) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        stats = llm.get_stats()
        assert all(s.kv_blocks_free == s.kv_blocks_total for s in stats), "KV blocks left allocated"
    return [o.outputs[0].token_ids for o in outputs], [o.metrics for o in outputs]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = 0
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        same += n
    return same / sum(len(x) for x in a)


def pull_figures(metrics: list, prefix: str) -> dict:
    """Bytes, bandwidth and transports of the requests' KV pulls."""
    moved = [(m.transfer_bytes, m.transfer_seconds) for m in metrics if m.transfer_seconds > 0]
    total_bytes, total_seconds = sum(b for b, _ in moved), sum(s for _, s in moved)
    return {f"{prefix}_gbps": total_bytes / total_seconds / 1e9 if total_seconds else None,
            f"{prefix}_bytes": total_bytes,
            f"{prefix}_transports": sorted({m.transfer_transport for m in metrics})}


def d2d_bandwidth(num_bytes: int) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return num_bytes * 10 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs a GPU"
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, name in ((torch.float32, "float32"), (torch.float16, "float16")):
            path = checkpoint(Path(tmp), dtype)
            batch = prompts(VOCAB)
            reference = hf_tokens(path, dtype, batch)
            colocated, _ = distserve_run(path, name, "colocated", batch)
            disaggregated, metrics = distserve_run(path, name, "disaggregated", batch)
            row = {
                "colocated_vs_transformers": agreement(colocated, reference),
                "disaggregated_vs_transformers": agreement(disaggregated, reference),
                "colocated_equals_disaggregated": colocated == disaggregated,
            }
            row.update(pull_figures(metrics, "kv_pull"))
            row["d2d_copy_gbps"] = d2d_bandwidth(max(row["kv_pull_bytes"] // max(1, len(metrics)), 1 << 20)) / 1e9
            if name == "float16":
                over_torch, metrics = distserve_run(path, name, "disaggregated", batch, kv_transport="torch")
                row["torch_transport_equals_colocated"] = over_torch == colocated
                row["gpus"] = torch.cuda.device_count()  # 1: gloo through host memory; 2+: NCCL (`data_backend`)
                row.update(pull_figures(metrics, "torch_pull"))
                if not row["torch_transport_equals_colocated"]:
                    failures.append("float16: the KV over torch.distributed changed the tokens")
            report[name] = row
            print(name, json.dumps(row))
            if not row["colocated_equals_disaggregated"]:
                failures.append(f"{name}: colocated and disaggregated differ")
            if name == "float32" and row["colocated_vs_transformers"] < 1.0:
                failures.append(f"float32: distserve differs from transformers ({row['colocated_vs_transformers']:.1%} equal)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**report, "failures": failures}, indent=2))
    print(f"wrote {args.out}")
    if failures:
        print("FAILED:", *failures, sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
