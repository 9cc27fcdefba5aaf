"""Offline throughput side by side: distserve against vLLM's CPU build (and, when asked,
transformers' `generate`), on three workload families and several model shapes.

Families (seeded, greedy, EOS ignored, every request's output length drawn uniformly):
- chat: short prompts, long answers (decode-heavy);
- summarization: long prompts, short answers (prefill-heavy);
- mixed: the two mixed, prompts 32-1024 and answers 32-256 tokens.

Shapes: the built-in SmolLM2-135M (its GGUF dequantized to a float32 folder, so every system
reads the same weights) and random-weight checkpoints of an OPT shape, a LLaMA-GQA shape, and
on request a GPT-2 shape (`gpt2-160m`), LLaMA shapes with heads of 128 (`llama-hd128-200m`, GQA;
`llama-mha-hd128`, LLaMA-2's layout without GQA) and Qwen2-0.5B's shape (`qwen2-0.5b`: q/k/v biases, 151,936-token tied vocabulary).

Every system stays loaded in a process of its own (benchmarks/offline_worker.py, run by its
own interpreter) while the families run round by round, the systems' order rotating each
round: this machine's speed drifts by 10-20% within minutes, so only runs close in time
compare. A row's ratio is the median of the rounds' ratios (each round's vLLM seconds over
distserve's); its compute floor is the workload's FLOPs (projections, attention, LM head)
over the best fp32 matmul rate measured here (MKL and oneDNN's packed linear), and the
share is floor / seconds.

    python -m benchmarks.offline_throughput [--shapes smollm2 opt-200m llama-gqa-150m]
        [--families chat summarization mixed] [--rounds 3] [--systems distserve vllm]
        [--family NAME=REQUESTS:PROMPT_MIN-PROMPT_MAX:OUTPUT_MIN-OUTPUT_MAX ...]

`--family` adds a family of your own (and runs it), e.g. `--family tiny=256:8-64:8-64`.

Prints a table and writes benchmarks/results/offline_throughput.json. vLLM runs in its
own virtual environment (../shared/ENVIRONMENT.md); it is skipped, and said so, when
`--vllm-python` is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.checkpoints import random_checkpoint, smollm2_folder
from benchmarks.report import report
from distserve.config import ModelConfig
from distserve.planner.hardware import ModelShape, model_shape
from distserve.weights.source import load_model_config

RESULTS = Path("benchmarks/results")
WORK_DIR = Path(tempfile.gettempdir()) / "distserve-bench-models"  # where the shapes' checkpoints are written
WORKER = Path(__file__).with_name("offline_worker.py")


@dataclass(frozen=True)
class Family:
    requests: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]

    def draw(self, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
        rng = random.Random(seed)
        prompts = [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(*self.prompt_len))]
                   for _ in range(self.requests)]
        return prompts, [rng.randint(*self.output_len) for _ in range(self.requests)]


FAMILIES = {
    "chat": Family(64, (16, 160), (128, 512)),
    "summarization": Family(24, (512, 2048), (16, 64)),
    "mixed": Family(96, (32, 1024), (32, 256)),
}


def parse_family(spec: str) -> tuple[str, Family]:
    """NAME=REQUESTS:PROMPT_MIN-PROMPT_MAX:OUTPUT_MIN-OUTPUT_MAX as (name, Family)."""
    match = re.fullmatch(r"([\w.-]+)=(\d+):(\d+)-(\d+):(\d+)-(\d+)", spec)
    if not match:
        raise argparse.ArgumentTypeError(f"--family {spec!r}: write NAME=REQUESTS:PROMPT_MIN-PROMPT_MAX:OUTPUT_MIN-OUTPUT_MAX, "
                                         "e.g. tiny=256:8-64:8-64")
    name, requests, p_lo, p_hi, o_lo, o_hi = match.groups()
    family = Family(int(requests), (int(p_lo), int(p_hi)), (int(o_lo), int(o_hi)))
    ranges_ok = all(1 <= lo <= hi for lo, hi in (family.prompt_len, family.output_len))
    if family.requests < 1 or not ranges_ok:
        raise argparse.ArgumentTypeError(f"--family {spec!r}: counts must be >= 1 and each range MIN <= MAX")
    return name, family


def shape_folder(name: str, root: Path) -> Path:
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    if name == "smollm2":
        return smollm2_folder(root)
    if name == "opt-200m":  # wider than OPT-125m: hidden 1024, 16 heads, 12 layers
        config = OPTConfig(hidden_size=1024, ffn_dim=4096, num_hidden_layers=12, num_attention_heads=16,
                           vocab_size=50272, max_position_embeddings=4096, word_embed_proj_dim=1024)
    elif name == "llama-gqa-150m":  # 16 layers, 12 query heads over 4 KV heads, untied head
        config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
                             num_key_value_heads=4, vocab_size=49152, max_position_embeddings=4096,
                             tie_word_embeddings=False)
    elif name == "llama-hd128-200m":  # 12 layers, 8 query heads of 128 over 2 KV heads
        config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=8,
                             num_key_value_heads=2, vocab_size=49152, max_position_embeddings=4096,
                             tie_word_embeddings=False)
    elif name == "llama-mha-hd128":  # LLaMA-2's layout, smaller: 12 layers, 8 heads of 128, no GQA
        config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=8,
                             num_key_value_heads=8, vocab_size=49152, max_position_embeddings=4096,
                             tie_word_embeddings=False)
    elif name == "qwen2-0.5b":  # Qwen2-0.5B's shape: 24 layers, 14 query heads over 2 KV heads, q/k/v biases
        config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                             tie_word_embeddings=True)
    elif name == "gpt2-160m":  # GPT-2 small widened: hidden 896, 14 heads, 14 layers, gelu_new
        config = GPT2Config(n_embd=896, n_layer=14, n_head=14, vocab_size=50257, n_positions=4096)
    else:
        raise ValueError(f"unknown shape {name!r}")
    return random_checkpoint(root, name, config)


def shape_config(name: str, root: Path) -> ModelConfig:
    """The model config of shape `name` (its checkpoint written under `root` first if needed)."""
    return load_model_config(str(shape_folder(name, root)))


def workload_flops(shape: ModelShape, prompts: list[list[int]], max_tokens: list[int]) -> float:
    """FLOPs of running the workload once: every token through every projection, attention
    over its context (causal), and the LM head for the last prompt token and every output
    token but the last."""
    hidden, layers, per_layer = shape.hidden_size, shape.num_layers, shape.layer_params()
    heads, head_dim = shape.num_heads, shape.head_dim
    attn_width = heads * head_dim  # QK^T and PV: 2 FLOPs per multiply-add, two products
    total = 0.0
    for prompt, out in zip(prompts, max_tokens):
        tokens = len(prompt) + out - 1  # the last output token is sampled, never fed back
        total += 2 * per_layer * layers * tokens
        contexts = tokens * (tokens + 1) / 2  # token t attends over t + 1 positions
        total += 4 * attn_width * layers * contexts
        total += 2 * hidden * shape.vocab_size * out
    return total


def matmul_peak() -> float:
    """The best fp32 matmul rate measured here (FLOP/s): MKL's GEMM and oneDNN's packed linear."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (1024, 768, 2048), (1024, 2048, 768)):
        a, w = torch.randn(m, k), torch.randn(n, k)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 32) if torch.backends.mkldnn.is_available() else None
        runs = [lambda a=a, w=w: a @ w.t()]
        if packed is not None:
            runs.append(lambda a=a, p=packed: torch.ops.mkldnn._linear_pointwise(a, p, None, "none", [], ""))
        for run in runs:
            run()
            times = []
            for _ in range(8):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            best = max(best, 2 * m * k * n / min(times))
    return best


class Worker:
    """An engine loaded in its own process (benchmarks/offline_worker.py)."""

    def __init__(self, system: str, python: str, model: Path, max_model_len: int, env: dict[str, str]) -> None:
        self.system = system
        self.proc = subprocess.Popen([python, str(WORKER), system, str(model), str(max_model_len)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"{self.system} worker exited ({self.proc.wait()})")

    def run(self, prompts: list[list[int]], max_tokens: list[int]) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_workers(systems: list[str], model: Path, vllm_python: str, tmp: str) -> list[Worker]:
    env = dict(os.environ, PYTHONPATH=str(Path.cwd()))
    vllm_env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CACHE_ROOT=tmp,
                    VLLM_LOGGING_LEVEL="WARNING", VLLM_TARGET_DEVICE="cpu")
    workers = []
    for system in systems:
        python = vllm_python if system == "vllm" else sys.executable
        workers.append(Worker(system, python, model, 4096, vllm_env if system == "vllm" else env))
    return workers


def run_shape(shape: str, root: Path, families: list[str], systems: list[str], rounds: int, vllm_python: str,
              peak: float) -> list[dict]:
    folder = shape_folder(shape, root)
    dims = model_shape(str(folder))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workers = start_workers(systems, folder, vllm_python, tmp)
        try:
            for family in families:
                prompts, max_tokens = FAMILIES[family].draw(dims.vocab_size, seed=list(FAMILIES).index(family))
                seconds: dict[str, list[float]] = {w.system: [] for w in workers}
                tokens: dict[str, list[list[int]]] = {}
                for r in tqdm(range(rounds), desc=f"{shape} {family}", unit="round"):
                    order = workers[r % len(workers):] + workers[: r % len(workers)]
                    for worker in order:
                        if worker.system == "transformers" and seconds["transformers"]:
                            continue  # far slower than the others: one round says enough
                        result = worker.run(prompts, max_tokens)
                        seconds[worker.system].append(result["seconds"])
                        tokens[worker.system] = result["tokens"]
                flops = workload_flops(dims, prompts, max_tokens)
                row = {"shape": shape, "family": family, "requests": len(prompts),
                       "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(max_tokens),
                       "floor_s": flops / peak}
                base = seconds["distserve"]
                for system, times in seconds.items():
                    row[f"{system}_s"] = statistics.median(times)
                    row[f"{system}_rounds_s"] = times
                    row[f"{system}_floor_share"] = row["floor_s"] / statistics.median(times)
                    if system != "distserve":
                        paired = [t / b for t, b in zip(times, base)]
                        row[f"vs_{system}"] = statistics.median(paired)
                        same = sum(a == b for a, b in zip(tokens["distserve"], tokens[system]))
                        row[f"same_greedy_{system}"] = same / len(prompts)
                rows.append(row)
        finally:
            for worker in workers:
                worker.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    parser.add_argument("--shapes", nargs="+", default=["smollm2", "opt-200m", "llama-gqa-150m"])
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES),
                        help="built-in families to run (default: all of them, or none when --family is given)")
    parser.add_argument("--family", type=parse_family, action="append", default=[], dest="custom",
                        help="a family of your own, NAME=REQUESTS:PROMPT_MIN-PROMPT_MAX:OUTPUT_MIN-OUTPUT_MAX (repeatable)")
    parser.add_argument("--systems", nargs="+", choices=["distserve", "vllm", "transformers"], default=["distserve", "vllm"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", default=str(WORK_DIR))
    parser.add_argument("--out", default=str(RESULTS / "offline_throughput.json"))
    args = parser.parse_args()
    FAMILIES.update(args.custom)
    if args.families is None:
        args.families = [] if args.custom else list(FAMILIES)
    args.families += [name for name, _ in args.custom if name not in args.families]
    systems = [s for s in args.systems if s != "vllm" or Path(args.vllm_python).exists()]
    if "vllm" in args.systems and "vllm" not in systems:
        print(f"vLLM skipped: {args.vllm_python} not found")
    if "distserve" not in systems:
        systems.insert(0, "distserve")
    root = Path(args.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak()
    print(f"fp32 matmul peak here: {peak / 1e9:.0f} GFLOP/s")
    rows = []
    for shape in args.shapes:
        rows += run_shape(shape, root, args.families, systems, args.rounds, args.vllm_python, peak)
    columns = [("shape", "shape", "s"), ("family", "family", "s"), ("floor s", "floor_s", ".1f")]
    for system in systems:
        columns += [(f"{system} s", f"{system}_s", ".1f"), (f"{system} % floor", f"{system}_floor_share", ".1%")]
    for system in systems[1:]:
        columns += [(f"{system}/distserve time", f"vs_{system}", ".2f"), (f"same greedy as {system}", f"same_greedy_{system}", ".0%")]
    report(rows, columns, args.out, matmul_peak_gflops=peak / 1e9, threads=len(os.sched_getaffinity(0)),
           families={name: vars(f) for name, f in FAMILIES.items()}, rounds=args.rounds)


if __name__ == "__main__":
    main()
