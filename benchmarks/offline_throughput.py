"""Offline throughput side by side: distserve vs transformers' `generate` vs vLLM's CPU build,
and distserve's decode step time against its hardware floor.

Workload: 64 prompts of 128-512 tokens (uniform, seeded), 128 output tokens each (EOS
ignored), float32, the same 2 cores for every system. Models: the built-in SmolLM2-135M
(its GGUF dequantized once into a Hugging Face folder so that every system reads the same
weights) and an OPT-125m-shaped random checkpoint.

    python -m benchmarks.offline_throughput [--vllm-python /tmp/vllm-venv/bin/python] [--skip-hf] [--workload chat]

vLLM runs in its own virtual environment (see ../shared/ENVIRONMENT.md for the recipe); it is
skipped, and said so, when that interpreter is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.checkpoints import opt125m_folder, smollm2_folder

RESULTS = Path("benchmarks/results")
# prompts, prompt lengths (uniform), output tokens
WORKLOADS = {
    "long": (64, 128, 512, 128),  # the offline workload
    "chat": (24, 40, 120, 273),  # chatbot lengths (ShareGPT means), all at once: a burst of the goodput benchmark
}
NUM_PROMPTS, MIN_LEN, MAX_LEN, OUTPUT_LEN = WORKLOADS["long"]

VLLM_SCRIPT = r'''
import json, sys, time
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    cfg = json.load(open(sys.argv[1]))
    llm = LLM(model=cfg["model"], dtype="float32", seed=0, max_model_len=cfg["max_model_len"], max_num_seqs=256)
    prompts = [{"prompt_token_ids": p} for p in cfg["prompts"]]
    params = SamplingParams(max_tokens=cfg["max_tokens"], temperature=0, ignore_eos=True)
    llm.generate(prompts[:4], params, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    json.dump({"seconds": seconds, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
               "tokens": [list(o.outputs[0].token_ids) for o in outputs]}, open(sys.argv[2], "w"))
'''


def make_prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (NUM_PROMPTS,), generator=g).tolist()
    return [torch.randint(100, vocab - 100, (n,), generator=g).tolist() for n in lengths]


def run_distserve(model: Path, prompts: list[list[int]]) -> dict:
    from distserve import LLM, SamplingParams

    params = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0, ignore_eos=True)
    with LLM(str(model), mode="colocated", kv_cache_gb=4.0, max_num_seqs=256) as llm:
        llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], params, use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "tokens": [o.outputs[0].token_ids for o in outputs]}


def run_transformers(model: Path, prompts: list[list[int]], batch_size: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    total, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, p in enumerate(batch):  # left padding, as generation needs
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=OUTPUT_LEN, min_new_tokens=OUTPUT_LEN,
                              do_sample=False, pad_token_id=0)
        total += (out.shape[1] - width) * len(batch)
    return {"seconds": time.perf_counter() - start, "output_tokens": total, "batch_size": batch_size}


def run_vllm(python: str, model: Path, prompts: list[list[int]]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script, cfg, out = Path(tmp) / "run.py", Path(tmp) / "cfg.json", Path(tmp) / "out.json"
        script.write_text(VLLM_SCRIPT)
        cfg.write_text(json.dumps({"model": str(model), "prompts": prompts, "max_tokens": OUTPUT_LEN, "max_model_len": 1024}))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CACHE_ROOT=tmp,
                   VLLM_LOGGING_LEVEL="WARNING", VLLM_TARGET_DEVICE="cpu")
        subprocess.run([python, str(script), str(cfg), str(out)], env=env, check=True, cwd=tmp)
        return json.loads(out.read_text())


def read_bandwidth(big: torch.Tensor, repeats: int) -> float:
    """Bytes per second of the fastest of `repeats` sums of a tensor far larger than the caches."""
    reads = []
    for _ in range(repeats):
        start = time.perf_counter()
        big.sum()
        reads.append(time.perf_counter() - start)
    return big.numel() * big.element_size() / min(reads)


def decode_floor(model: Path) -> dict:
    """distserve's decode step at batch 1 and 32 against max(bytes / bandwidth, FLOPs / FLOP/s).

    This machine's memory bandwidth moves by 10-20% from one second to the next, so the
    bandwidth is read again right before every timed step (fastest of 3 sums of 256 MB) and
    each step is set against its own floor; the ratio reported is the median of those."""
    from distserve.config import DeploymentConfig, resolve_instances
    from distserve.engine.instance_loop import build_instance
    from distserve.engine.messages import AddRequest
    from distserve.sampling_params import SamplingParams
    from distserve.weights.source import load_model_config

    torch.set_num_threads(2)
    big = torch.ones(64 << 20)  # 256 MB
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mms = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        mms.append(time.perf_counter() - start)
    flops = 2 * 2048**3 / min(mms)
    config = load_model_config(str(model))
    deployment = DeploymentConfig(model=str(model), mode="colocated")
    deployment.colocated.kv_cache_gb = 2.0
    instance = build_instance(config, resolve_instances(deployment, config)[0])
    # from the checkpoint (the runner may hold some weights twice, packed and plain): every
    # weight but the embedding, plus the LM head, which reads the whole (tied) embedding
    from safetensors import safe_open

    linear_params = 0
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            linear_params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "embed" not in k)
    weight_bytes = 4 * (linear_params + config.vocab_size * config.hidden_size)
    rows, bandwidths = [], []
    for batch in (1, 32):
        for i in range(batch):
            params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
            instance.handle(AddRequest(f"{batch}-{i}", list(range(100, 356)), params, time.time(), frozenset()))
        instance.step()  # the prefill
        steps, floors = [], []
        while instance.has_work():
            bandwidth = read_bandwidth(big, 3)
            start = time.perf_counter()
            instance.step()
            steps.append(time.perf_counter() - start)
            floors.append(max(weight_bytes / bandwidth, 2 * weight_bytes / 4 * batch / flops))
            bandwidths.append(bandwidth)
        ratios = [step / floor for step, floor in zip(steps[5:], floors[5:])]
        rows.append({"batch": batch, "step_ms": 1e3 * statistics.median(steps[5:]), "floor_ms": 1e3 * statistics.median(floors[5:]),
                     "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]})
    return {"read_bandwidth_gbps": statistics.median(bandwidths) / 1e9,
            "read_bandwidth_range_gbps": [min(bandwidths) / 1e9, max(bandwidths) / 1e9],
            "matmul_gflops": flops / 1e9, "weight_bytes": weight_bytes, "steps": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    parser.add_argument("--models", nargs="+", default=["smollm2", "opt125m"])
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "distserve-bench-models"))
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="long",
                        help="long: 64 prompts of 128-512 tokens, 128 out; chat: 24 prompts of 40-120 tokens, 273 out")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/offline_throughput[-WORKLOAD].json")
    args = parser.parse_args()
    global NUM_PROMPTS, MIN_LEN, MAX_LEN, OUTPUT_LEN
    NUM_PROMPTS, MIN_LEN, MAX_LEN, OUTPUT_LEN = WORKLOADS[args.workload]
    name = "offline_throughput.json" if args.workload == "long" else f"offline_throughput-{args.workload}.json"
    args.out = args.out or str(RESULTS / name)
    root = Path(args.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    report: dict = {"workload": {"prompts": NUM_PROMPTS, "prompt_len": [MIN_LEN, MAX_LEN], "output_len": OUTPUT_LEN}, "models": {}}
    for name in args.models:
        folder = smollm2_folder(root) if name == "smollm2" else opt125m_folder(root)
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        prompts = make_prompts(vocab)
        result: dict = {"distserve": run_distserve(folder, prompts)}
        if not args.skip_hf:
            result["transformers"] = run_transformers(folder, prompts, args.hf_batch_size)
        if Path(args.vllm_python).exists():
            result["vllm-cpu"] = run_vllm(args.vllm_python, folder, prompts)
            same = sum(a == b for a, b in zip(result["distserve"]["tokens"], result["vllm-cpu"]["tokens"]))
            result["vllm-cpu"]["same_greedy_tokens_as_distserve"] = f"{same}/{len(prompts)}"
        else:
            print(f"vLLM skipped: {args.vllm_python} not found")
        for system in result.values():
            system.pop("tokens", None)
            system["tokens_per_second"] = system["output_tokens"] / system["seconds"]
        result["decode_floor"] = decode_floor(folder)
        report["models"][name] = result
        print(f"\n== {name}")
        print(f"{'system':<14} {'seconds':>8} {'out tok/s':>10} {'vs distserve':>13}")
        base = result["distserve"]["tokens_per_second"]
        for system, r in result.items():
            if system != "decode_floor":
                print(f"{system:<14} {r['seconds']:>8.1f} {r['tokens_per_second']:>10.1f} {r['tokens_per_second'] / base:>12.2f}x")
        f = result["decode_floor"]
        low, high = f["read_bandwidth_range_gbps"]
        print(f"read bandwidth {f['read_bandwidth_gbps']:.1f} GB/s (median; {low:.1f}-{high:.1f}), "
              f"matmul {f['matmul_gflops']:.0f} GFLOP/s, weights {f['weight_bytes'] / 1e6:.0f} MB")
        for row in f["steps"]:
            print(f"decode step batch {row['batch']:>2}: {row['step_ms']:.1f} ms, floor {row['floor_ms']:.1f} ms "
                  f"({row['ratio']:.2f}x, each step against the bandwidth read just before it; "
                  f"{row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
