"""Quantized weights against float32, llama.cpp and vLLM, on the built-in SmolLM2-135M GGUF
(Q4_1 matrices, a Q8_0 embedding that is also the LM head), 2 threads.

1. Single stream: one request (a 32-token prompt, 256 greedy tokens, EOS ignored) at a time:
   distserve keeping the GGUF quantized, distserve with it dequantized to float32
   (`--quantization none`), and llama.cpp (llama-cpp-python) reading the same file. Engines
   stay loaded in processes of their own and run in turn, round after round; the figure is
   ms per output token over the whole request.
2. Decode step by batch size (1, 8, 32, 128; contexts of 64-400 tokens): the GGUF kept
   quantized, dequantized to float32, and that float32 quantized at load to int8 and to int4,
   four instances in one process taking steps in turn.
3. Offline, the chat family of benchmarks/offline_throughput.py (64 requests, prompts 16-160,
   answers 128-512): quantized against float32 against vLLM's CPU build (float32 folder).

    python -m benchmarks.quantized [--rounds 3] [--llama-cpp-python /tmp/llamacpp-venv/bin/python]

Prints the tables and writes them to benchmarks/results/quantized/. llama.cpp and vLLM run from
virtual environments of their own (../shared/ENVIRONMENT.md) and are skipped, and said so,
when missing.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.checkpoints import smollm2_folder
from benchmarks.offline_throughput import FAMILIES, WORK_DIR, Worker
from benchmarks.report import report
from distserve.config import DeploymentConfig, resolve_instances
from distserve.engine.instance_loop import build_instance
from distserve.request import Request
from distserve.sampling_params import SamplingParams
from distserve.weights.source import builtin_model_path, load_model_config

RESULTS = Path("benchmarks/results/quantized")
BATCHES = (1, 8, 32, 128)
STEPS = 24  # per batch size and variant
VARIANTS = {"gguf q4_1": "auto", "float32": "none", "int8": "int8", "int4": "int4"}


def decode_steps(gguf: str) -> tuple[list[dict], dict[str, int]]:
    """Median decode step (ms) of each variant at each batch size, stepping in turn."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    config = load_model_config(gguf, max_model_len=2048)
    instances = {}
    for name, quantization in VARIANTS.items():
        deployment = DeploymentConfig(model=gguf, mode="colocated", max_model_len=2048, quantization=quantization)
        deployment.colocated.num_kv_blocks = max(BATCHES) * (400 + STEPS + 16) // 16
        instances[name] = build_instance(config, resolve_instances(deployment, config)[0])
    params = SamplingParams(max_tokens=1 << 20, ignore_eos=True, temperature=0)
    rows = []
    for batch in tqdm(BATCHES, desc="decode steps"):
        rng = random.Random(batch)
        contexts = [[rng.randrange(3, 1000) for _ in range(rng.randrange(64, 400))] for _ in range(batch)]
        for name, instance in instances.items():
            for i, prompt in enumerate(contexts):
                r = Request(f"{name}-{batch}-{i}", prompt, params, time.time(), max_model_len=1 << 30)
                r.append_token(5)
                instance.blocks.grow(r.block_table, r.num_tokens + STEPS + 1)
                r.num_computed_tokens = len(prompt)
                instance.scheduler.start_running(r)
        times: dict[str, list[float]] = {name: [] for name in instances}
        for step in range(STEPS):
            names = list(instances)
            for name in names[step % len(names):] + names[: step % len(names)]:
                start = time.perf_counter()
                instances[name].step()
                times[name].append(time.perf_counter() - start)
        row: dict = {"batch": batch}
        for name, instance in instances.items():
            row[f"{name}_ms"] = 1e3 * statistics.median(times[name][1:])
            for request in list(instance.scheduler.running):
                instance.scheduler.abort(request.request_id)
        rows.append(row)
    weight_bytes = {name: instance.stats.weight_bytes for name, instance in instances.items()}
    for instance in instances.values():
        instance.close()
    return rows, weight_bytes


def workload(vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(32)]], [256]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llama-cpp-python", default="/tmp/llamacpp-venv/bin/python")
    parser.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    parser.add_argument("--work-dir", default=str(WORK_DIR))
    parser.add_argument("--skip", nargs="*", default=[], choices=["single", "steps", "offline"])
    args = parser.parse_args()
    gguf = builtin_model_path()
    folder = smollm2_folder(Path(args.work_dir))
    meta = {"model": "SmolLM2-135M-Instruct Q4_1 GGUF", "threads": len(os.sched_getaffinity(0))}
    env = dict(os.environ, PYTHONPATH=str(Path.cwd()))
    workers: dict[str, Worker] = {}
    with tempfile.TemporaryDirectory() as tmp:
        vllm_env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CACHE_ROOT=tmp,
                        VLLM_LOGGING_LEVEL="WARNING", VLLM_TARGET_DEVICE="cpu")
        try:
            if {"single", "offline"} - set(args.skip):
                workers["distserve q4_1"] = Worker("distserve", sys.executable, Path(gguf), 4096, env)
                workers["distserve float32"] = Worker("distserve:none", sys.executable, Path(gguf), 4096, env)
            if "single" not in args.skip:
                single = dict(workers)
                if Path(args.llama_cpp_python).exists():
                    single["llama.cpp"] = Worker("llama.cpp", args.llama_cpp_python, Path(gguf), 4096, env)
                else:
                    print(f"llama.cpp skipped: {args.llama_cpp_python} not found")
                seconds: dict[str, list[float]] = {name: [] for name in single}
                tokens: dict[str, list[int]] = {}
                prompts, max_tokens = workload(49152, 0)
                for r in tqdm(range(args.rounds), desc="single stream"):
                    names = list(single)
                    for name in names[r % len(names):] + names[: r % len(names)]:
                        result = single[name].run(prompts, max_tokens)
                        seconds[name].append(result["seconds"])
                        tokens[name] = result["tokens"][0]
                rows = [{"system": name, "ms_per_token": 1e3 * statistics.median(times) / max_tokens[0],
                         "same_tokens_as_quantized": sum(a == b for a, b in zip(tokens[name], tokens["distserve q4_1"]))
                         / max_tokens[0]} for name, times in seconds.items()]
                report(rows, [("system", "system", "s"), ("ms / token", "ms_per_token", ".2f"),
                              ("same tokens as distserve q4_1", "same_tokens_as_quantized", ".0%")],
                       RESULTS / "single_stream.json", **meta, rounds=args.rounds, prompt_tokens=32, output_tokens=256)
                if "llama.cpp" in single:
                    single.pop("llama.cpp").close()
            if "offline" not in args.skip:
                if Path(args.vllm_python).exists():
                    workers["vllm float32"] = Worker("vllm", args.vllm_python, folder, 4096, vllm_env)
                else:
                    print(f"vLLM skipped: {args.vllm_python} not found")
                prompts, max_tokens = FAMILIES["chat"].draw(49152, seed=0)
                seconds = {name: [] for name in workers}
                for r in tqdm(range(args.rounds), desc="offline chat"):
                    names = list(workers)
                    for name in names[r % len(names):] + names[: r % len(names)]:
                        seconds[name].append(workers[name].run(prompts, max_tokens)["seconds"])
                rows = [{"system": name, "seconds": statistics.median(times),
                         "output_tok_s": sum(max_tokens) / statistics.median(times)} for name, times in seconds.items()]
                report(rows, [("system", "system", "s"), ("seconds", "seconds", ".1f"),
                              ("output tok/s", "output_tok_s", ".0f")], RESULTS / "offline_chat.json", **meta,
                       rounds=args.rounds, family=vars(FAMILIES["chat"]))
        finally:
            for worker in workers.values():
                worker.close()
    if "steps" not in args.skip:
        rows, weight_bytes = decode_steps(gguf)
        print("weight bytes:", {name: f"{b / 1e6:.0f} MB" for name, b in weight_bytes.items()})
        report(rows, [("batch", "batch", "d"), *[(f"{n} ms", f"{n}_ms", ".1f") for n in VARIANTS]],
               RESULTS / "decode_steps.json", **meta, weight_bytes=weight_bytes, steps=STEPS)


if __name__ == "__main__":
    main()
