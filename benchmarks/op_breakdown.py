"""Where a step's time goes, op by op, each op against its own floor.

Prefill steps (prompts of 128-2048 tokens, 1-8 at a time) and decode steps (batch 1-256,
contexts 128-2048) of one model, run by the engine's own instance (`build_instance`, one
step at a time, both cores). Each step is timed whole on the engine's path (for decode, the
one-call LLaMA layer), then again layer by layer with a timer around every module, which
splits it into ops: the projections (qkv, o, gate_up, down), attention (with the KV cache
write), rotary embedding (what the attention module spends outside its children), norms,
the activation, residual adds, embedding, LM head, sampling, and the rest ("other":
preparing inputs, the scheduler).

Floors, measured here before the run: a matmul's FLOPs over the best fp32 matmul rate (MKL's
GEMM or oneDNN's packed linear) or its weight bytes over the read bandwidth, whichever is
longer; attention's FLOPs (causal) or its KV bytes; elementwise ops' bytes. "% of floor" is
floor / time (100% = at the hardware's limit).

    python -m benchmarks.op_breakdown [--shape llama-gqa-150m|opt-200m|...] [--quick]

OPT's out_proj, fc1 and fc2, and GPT-2's c_attn, c_proj, c_fc and c_proj, are counted as qkv_proj,
o_proj, gate_up_proj and down_proj (GPT-2's split of its QKV output as "rotary").

Then mixed steps: one prompt beside running decodes in one step (what colocated and chunked
steps do), against the prompt's step and the decodes' step run apart.

Prints one table per step and writes benchmarks/results/op_breakdown.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

import distserve.models.base as base
from benchmarks.offline_throughput import WORK_DIR, matmul_peak, shape_folder
from benchmarks.report import report
from distserve.config import DeploymentConfig, resolve_instances
from distserve.engine.instance_loop import build_instance, keep_freed_memory
from distserve.planner.hardware import model_shape
from distserve.request import Request
from distserve.sampling_params import SamplingParams
from distserve.weights.source import load_model_config

RESULTS = Path("benchmarks/results")
PREFILLS = [(128, 1), (128, 8), (512, 1), (512, 4), (1024, 1), (1024, 4), (2048, 1)]  # (prompt tokens, prompts)
MIXED = [(128, 32, 512), (512, 8, 512), (512, 32, 512), (512, 64, 512), (512, 32, 2048)]  # (prompt, decodes, context)
DECODES = [(1, 512), (8, 512), (32, 128), (32, 512), (32, 2048), (64, 128), (64, 512), (128, 128), (128, 512),
           (256, 128), (256, 512)]  # (batch, context)
QUICK_PREFILLS, QUICK_DECODES, QUICK_MIXED = [(512, 1)], [(32, 512)], [(512, 32, 512)]
REPEATS = 5
KV_CACHE_GB = 6.0
OPS = ("qkv_proj", "rotary", "attention", "o_proj", "norms", "gate_up_proj", "act", "down_proj", "residual",
       "embedding", "lm_head", "sampling", "other")
OPT_OPS = {"out_proj": "o_proj", "fc1": "gate_up_proj", "fc2": "down_proj"}  # OPT's modules under the ops' names
GPT2_OPS = {"attn.c_attn": "qkv_proj", "attn.c_proj": "o_proj", "mlp.c_fc": "gate_up_proj", "mlp.c_proj": "down_proj",
            "attn.attn": "attention", "mlp.act": "act"}  # GPT-2's, by their last two names


def read_bandwidth() -> float:
    """Bytes per second: the fastest of five sums of 256 MB."""
    big = torch.ones(64 << 20)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - start)
    return big.numel() * 4 / min(times)



def record(seconds: float, times: dict[str, float], whole: bool, totals: list[float], ops: dict[str, list[float]]) -> None:
    """One timed step: a whole step's seconds, or a layer-by-layer step's ops (the rest of its
    time under "other")."""
    if whole:
        totals.append(seconds)
        return
    times["other"] = seconds - sum(times.values())
    for op in OPS:
        ops[op].append(times.get(op, 0.0))

class ModuleTimer:
    """Wall time of every module of the model, by op, while `enabled` (steps are synchronous
    on CPU, so a module's time is its own)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.times: dict[str, float] = defaultdict(float)
        self.enabled = False
        self._starts: list[float] = []
        self._children: list[float] = []
        for name, module in model.named_modules():
            op = self._op(name)
            if op:
                module.register_forward_pre_hook(self._pre)
                module.register_forward_hook(self._post(op))

    @staticmethod
    def _op(name: str) -> str | None:
        last = name.rsplit(".", 1)[-1]
        if name.startswith("transformer."):  # GPT-2
            two = ".".join(name.rsplit(".", 2)[-2:])
            if two in GPT2_OPS:
                return GPT2_OPS[two]
            if last == "attn":
                return "rotary"  # GPT2Attention's own time: the split of the QKV output
            if last in ("ln_1", "ln_2", "ln_f"):
                return "norms"
            if last in ("wte", "wpe"):
                return "embedding"
            return "residual" if last.isdigit() else None
        if last in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "act"):
            return last
        if last in OPT_OPS:
            return OPT_OPS[last]
        if last in ("input_layernorm", "post_attention_layernorm", "norm", "self_attn_layer_norm", "final_layer_norm"):
            return "norms"
        if last == "attn":
            return "attention"
        if last == "self_attn":
            return "rotary"  # its own time, outside its children: the rotary embedding and the split
        if last in ("embed_tokens", "embed_positions"):
            return "embedding"
        if last.isdigit() and name.startswith("model.layers"):
            return "residual"  # a decoder layer's own time: the residual adds
        return None

    def _pre(self, module: torch.nn.Module, args: object) -> None:
        if self.enabled:
            self._starts.append(time.perf_counter())
            self._children.append(0.0)

    def _post(self, op: str):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: object, output: object) -> None:
            if not self.enabled:
                return
            elapsed = time.perf_counter() - self._starts.pop()
            children = self._children.pop()
            self.times[op] += elapsed - children  # self time
            if self._children:
                self._children[-1] += elapsed
        return hook


def _held(context: int, steps: int) -> int:
    """Tokens of KV a running request of `context` tokens (and the one it decodes next) holds
    room for, to take `steps` more steps."""
    return context + 1 + steps + 2


class Breakdown:
    def __init__(self, folder: Path, peak: float, bandwidth: float) -> None:
        torch.set_num_threads(2)
        keep_freed_memory()  # as every instance process does: steps reuse the heap, no page faults
        self.config = load_model_config(str(folder), max_model_len=4096)
        self.shape = model_shape(str(folder))
        deployment = DeploymentConfig(model=str(folder), mode="colocated", max_model_len=4096, enable_prefix_caching=False)
        deployment.colocated.kv_cache_gb = KV_CACHE_GB
        deployment.colocated.max_num_batched_tokens = 8192
        self.instance = build_instance(self.config, resolve_instances(deployment, self.config)[0])
        self.model = self.instance.executor.runner.model
        self.timer = ModuleTimer(self.model)
        self.peak, self.bandwidth = peak, bandwidth
        self.rng, self.ids = random.Random(0), iter(range(1 << 30))
        self._wrap_logits_and_sampling()

    def _wrap_logits_and_sampling(self) -> None:
        import distserve.engine.model_runner as runner

        model, timer = self.model, self.timer
        compute_logits, greedy_tokens, sample = model.compute_logits, model.greedy_tokens, runner.sample

        def timed(op: str, fn):  # noqa: ANN001, ANN202
            def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                if timer.enabled:
                    timer.times[op] += time.perf_counter() - start
                return out
            return call

        model.compute_logits = timed("lm_head", compute_logits)
        model.greedy_tokens = timed("lm_head", greedy_tokens)  # the screened head of greedy steps
        runner.sample = timed("sampling", sample)

    def _request(self, length: int, max_tokens: int) -> Request:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
        prompt = [self.rng.randrange(100, self.config.hf_config.vocab_size - 100) for _ in range(length)]
        return Request(f"r{next(self.ids)}", prompt, params, time.time(), max_model_len=1 << 30)

    def _timed_step(self, layer_by_layer: bool) -> tuple[float, dict[str, float]]:
        limit = base.FUSED_DECODE_BATCH
        base.FUSED_DECODE_BATCH = 0 if layer_by_layer else limit
        self.timer.times.clear()
        self.timer.enabled = layer_by_layer
        start = time.perf_counter()
        self.instance.step()
        seconds = time.perf_counter() - start
        self.timer.enabled = False
        base.FUSED_DECODE_BATCH = limit
        return seconds, dict(self.timer.times)

    def prefill(self, tokens: int, prompts: int) -> dict:
        totals, ops = [], defaultdict(list)
        for i in range(2 * REPEATS):
            for _ in range(prompts):
                self.instance.scheduler.add(self._request(tokens, 1))
            seconds, times = self._timed_step(layer_by_layer=i % 2 == 1)
            assert not self.instance.has_work(), "the prompts did not fit one step"
            record(seconds, times, whole=i % 2 == 0, totals=totals, ops=ops)
        return self._row("prefill", f"{prompts} x {tokens}", statistics.median(totals),
                         {op: statistics.median(v) for op, v in ops.items()}, tokens * prompts, prompts, tokens)

    def _fits(self, batch: int, context: int, steps: int, prompt: int = 0) -> bool:
        """Whether `_running(batch, context, steps)`'s blocks and a prompt of `prompt` tokens fit the KV cache."""
        blocks = self.instance.blocks
        return batch * blocks.blocks_for(_held(context, steps)) + blocks.blocks_for(prompt) <= blocks.num_free_blocks

    def _running(self, batch: int, context: int, steps: int) -> list[Request]:
        """`batch` requests decoding after `context` tokens, with blocks for `steps` more."""
        requests = []
        for _ in range(batch):
            r = self._request(context, 1 << 20)
            r.append_token(5)
            self.instance.blocks.grow(r.block_table, _held(context, steps))
            r.num_computed_tokens = context
            self.instance.scheduler.start_running(r)
            requests.append(r)
        return requests

    def decode(self, batch: int, context: int) -> dict | None:
        """The decode step's row; None where its KV does not fit the cache."""
        if not self._fits(batch, context, 2 * REPEATS):
            return None
        requests = self._running(batch, context, 2 * REPEATS)
        totals, ops = [], defaultdict(list)
        for i in range(2 * REPEATS + 1):
            seconds, times = self._timed_step(layer_by_layer=i % 2 == 0 and i > 0)
            if i == 0:
                continue  # warm-up
            record(seconds, times, whole=i % 2 == 1, totals=totals, ops=ops)
        for r in requests:
            self.instance.scheduler.abort(r.request_id)
        return self._row("decode", f"{batch} x {context}", statistics.median(totals),
                         {op: statistics.median(v) for op, v in ops.items()}, batch, batch, context + REPEATS)

    def mixed(self, tokens: int, batch: int, context: int) -> dict | None:
        """A step of one prompt of `tokens` tokens beside `batch` running decodes, against the
        prompt's step alone plus the decodes' step alone (medians, the three kinds of step
        alternating; a first round of each is warm-up); None where their KV does not fit the cache."""
        if not self._fits(batch, context, 2 * REPEATS + 2, tokens):
            return None
        requests = self._running(batch, context, 2 * REPEATS + 2)
        together, decodes, prompt = [], [], []
        scheduler = self.instance.scheduler
        for i in range(REPEATS + 1):
            scheduler.add(self._request(tokens, 1))  # done after its first token
            step_together = self._timed_step(layer_by_layer=False)[0]
            assert not scheduler.waiting and len(scheduler.running) == batch, "the prompt did not join the decodes"
            step_decodes = self._timed_step(layer_by_layer=False)[0]
            if i:  # the first round is warm-up
                together.append(step_together)
                decodes.append(step_decodes)
        for r in requests:
            scheduler.abort(r.request_id)
        for i in range(REPEATS + 1):
            scheduler.add(self._request(tokens, 1))
            step_prompt = self._timed_step(layer_by_layer=False)[0]
            if i:
                prompt.append(step_prompt)
        assert not self.instance.has_work()
        row = {"case": f"{tokens} + {batch} x {context}", "together_ms": 1e3 * statistics.median(together),
               "prompt_ms": 1e3 * statistics.median(prompt), "decodes_ms": 1e3 * statistics.median(decodes)}
        row["apart_ms"] = row["prompt_ms"] + row["decodes_ms"]
        row["together_over_apart"] = row["together_ms"] / row["apart_ms"]
        return row

    def _floors(self, tokens: int, sequences: int, context: int, phase: str) -> dict[str, float]:
        """Each op's floor in seconds for a step of `tokens` tokens over `sequences` sequences
        (prefill: each `context` tokens, attending causally; decode: one token over `context`)."""
        shape = self.shape
        hidden, layers, heads, kv_heads = shape.hidden_size, shape.num_layers, shape.num_heads, shape.num_kv_heads
        head_dim, inter, vocab = shape.head_dim, shape.intermediate_size, shape.vocab_size
        gated = shape.gated_mlp  # LLaMA's gate and up projections; OPT's and GPT-2's one up projection

        def matmul(n_in: int, n_out: int, rows: int) -> float:
            flops = 2 * rows * n_in * n_out
            moved = 4 * (n_in * n_out + rows * (n_in + n_out))
            return max(flops / self.peak, moved / self.bandwidth)

        def elementwise(floats: int) -> float:
            return 4 * floats / self.bandwidth

        if phase == "prefill":
            attn_flops = 4 * heads * head_dim * sequences * context * (context + 1) / 2
            kv_bytes = 2 * 4 * kv_heads * head_dim * tokens * 2  # written, then read back
        else:
            attn_flops = 4 * heads * head_dim * sequences * context
            kv_bytes = 2 * 4 * kv_heads * head_dim * sequences * context
        qkv_out = (heads + 2 * kv_heads) * head_dim
        return {
            "qkv_proj": layers * matmul(hidden, qkv_out, tokens),
            "rotary": layers * elementwise(2 * tokens * (heads + kv_heads) * head_dim) if gated else 0.0,
            "attention": layers * max(attn_flops / self.peak, kv_bytes / self.bandwidth),
            "o_proj": layers * matmul(heads * head_dim, hidden, tokens),
            "norms": (2 * layers + 1) * elementwise(2 * tokens * hidden),
            "gate_up_proj": layers * matmul(hidden, (2 if gated else 1) * inter, tokens),
            "act": layers * elementwise((3 if gated else 2) * tokens * inter),
            "down_proj": layers * matmul(inter, hidden, tokens),
            "residual": layers * elementwise(6 * tokens * hidden),
            "embedding": elementwise(2 * tokens * hidden),
            "lm_head": matmul(hidden, vocab, sequences),
            "sampling": elementwise(sequences * vocab),
            "other": 0.0,
        }

    def _row(self, phase: str, case: str, total: float, ops: dict[str, float], tokens: int, sequences: int,
             context: int) -> dict:
        floors = self._floors(tokens, sequences, context, phase)
        floor = sum(floors.values())
        row = {"phase": phase, "case": case, "step_ms": 1e3 * total, "layer_by_layer_ms": 1e3 * sum(ops.values()),
               "floor_ms": 1e3 * floor, "share_of_floor": floor / total, "ops": {}}
        for op in OPS:
            row["ops"][op] = {"ms": 1e3 * ops.get(op, 0.0), "floor_ms": 1e3 * floors[op]}
        return row


def print_ops(row: dict) -> None:
    print(f"\n{row['phase']} {row['case']}: step {row['step_ms']:.1f} ms (layer by layer {row['layer_by_layer_ms']:.1f}), "
          f"floor {row['floor_ms']:.1f} ms = {row['share_of_floor']:.0%}")
    for op, v in row["ops"].items():
        share = f"{v['floor_ms'] / v['ms']:.0%}" if v["ms"] > 0 and v["floor_ms"] > 0 else "-"
        print(f"  {op:<13} {v['ms']:8.2f} ms  floor {v['floor_ms']:8.2f} ms  {share:>5}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-gqa-150m", help="a shape of benchmarks/offline_throughput.py")
    parser.add_argument("--quick", action="store_true", help="one prefill and one decode case")
    parser.add_argument("--work-dir", default=str(WORK_DIR))
    parser.add_argument("--out", default=str(RESULTS / "op_breakdown.json"))
    args = parser.parse_args()
    root = Path(args.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    folder = shape_folder(args.shape, root)
    peak, bandwidth = matmul_peak(), read_bandwidth()
    print(f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    bench = Breakdown(folder, peak, bandwidth)
    prefills, decodes, mixed = (QUICK_PREFILLS, QUICK_DECODES, QUICK_MIXED) if args.quick else (PREFILLS, DECODES, MIXED)
    rows = []
    for tokens, prompts in tqdm(prefills, desc="prefill steps"):
        rows.append(bench.prefill(tokens, prompts))
        print_ops(rows[-1])
    for batch, context in tqdm(decodes, desc="decode steps"):
        row = bench.decode(batch, context)
        if row is None:
            print(f"\ndecode {batch} x {context}: skipped, more KV than the {KV_CACHE_GB:g} GiB cache holds")
            continue
        rows.append(row)
        print_ops(row)
    mixed_rows = []
    for case in tqdm(mixed, desc="mixed steps"):
        row = bench.mixed(*case)
        if row is None:
            print(f"\nmixed {case}: skipped, more KV than the {KV_CACHE_GB:g} GiB cache holds")
            continue
        mixed_rows.append(row)
    print("\nmixed steps: a prompt beside running decodes, against the two steps apart")
    for row in mixed_rows:
        print(f"  {row['case']:<18} together {row['together_ms']:8.1f} ms  apart {row['apart_ms']:8.1f} ms "
              f"(prompt {row['prompt_ms']:.1f} + decodes {row['decodes_ms']:.1f})  {row['together_over_apart']:.2f}x")
    report(rows, [("phase", "phase", "s"), ("case", "case", "s"), ("step ms", "step_ms", ".1f"),
                  ("floor ms", "floor_ms", ".1f"), ("% of floor", "share_of_floor", ".0%")],
           args.out, shape=args.shape, matmul_peak_gflops=peak / 1e9, read_bandwidth_gbps=bandwidth / 1e9, threads=2,
           mixed=mixed_rows)


if __name__ == "__main__":
    main()
