"""`distserve profile`: time this engine's prefill and decode steps over a grid of batches on
this machine, and fit the latency model the planner simulates with.

Decode steps are timed on sequences whose KV slots are allocated but not computed: a step
costs the same whatever numbers sit in the cache, and this skips prefilling long contexts.
Tokens are chosen greedily, as the benchmark's requests ask (`temperature` 0); sampling
with a temperature adds a few percent to a step.
"""

from __future__ import annotations

import collections
import gzip
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distserve.config import DeploymentConfig, resolve_instances
from distserve.engine.instance import Instance
from distserve.engine.instance_loop import build_instance
from distserve.engine.messages import AddRequest
from distserve.layers.linear import PANEL_ROWS, SMALL_BATCH
from distserve.planner.latency_model import FittedLatencyModel
from distserve.request import Request
from distserve.sampling_params import SamplingParams
from distserve.weights.source import load_model_config


@dataclass
class ProfileGrid:
    prefill_lens: tuple[int, ...] = (16, 64, 128, 256, 512, 1024, 2048)
    prefill_batches: tuple[int, ...] = (1, 2, 4, 8)
    max_prefill_tokens: int = 4096
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    decode_contexts: tuple[int, ...] = (32, 128, 512, 1024)
    repeats: int = 3

    @classmethod
    def quick(cls) -> ProfileGrid:
        return cls((16, 128, 512), (1, 2), 1024, (1, 4, 16), (32, 256), 2)


def _time_step(instance: Instance) -> float:
    start = time.perf_counter()
    instance.step()
    return time.perf_counter() - start


def profile_engine(
    model: str | None, threads: int, grid: ProfileGrid | None = None, max_model_len: int | None = None, seed: int = 0,
    quantization: str = "auto",
) -> FittedLatencyModel:
    grid = grid or ProfileGrid()
    torch.set_num_threads(threads)
    config = load_model_config(model, max_model_len=max_model_len)
    deployment = DeploymentConfig(model=model, mode="colocated", max_model_len=max_model_len, quantization=quantization)
    deployment.validate()
    longest = max(max(grid.decode_contexts) + 2, max(grid.prefill_lens))
    deployment.colocated.num_kv_blocks = (max(grid.decode_batches) * longest) // deployment.block_size + 64
    deployment.colocated.max_num_batched_tokens = max(grid.max_prefill_tokens, max(grid.prefill_lens))
    deployment.colocated.max_num_seqs = max(max(grid.decode_batches), max(grid.prefill_batches))
    instance = build_instance(config, resolve_instances(deployment, config)[0])
    rng = random.Random(seed)
    vocab = config.vocab_size
    ids = iter(range(1 << 30))

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    # warm up both paths
    instance.handle(AddRequest("warmup", tokens(64), SamplingParams(max_tokens=4, ignore_eos=True, temperature=0), time.time(),
        frozenset()))
    while instance.has_work():
        instance.step()

    prefill: list[tuple[list[int], float]] = []
    jobs = [(k, l) for l in grid.prefill_lens for k in grid.prefill_batches if k * l <= max(grid.max_prefill_tokens, l)]
    decode_jobs = [(b, c) for b in grid.decode_batches for c in grid.decode_contexts]
    # in random order: a machine whose speed drifts then blurs the fit instead of bending it
    rng.shuffle(jobs)
    rng.shuffle(decode_jobs)
    bar = tqdm(total=len(jobs) + len(decode_jobs), desc="profiling", unit="shape")
    for k, l in jobs:
        times = []
        for _ in range(grid.repeats):
            for _ in range(k):
                instance.handle(AddRequest(f"p{next(ids)}", tokens(l), SamplingParams(max_tokens=1, temperature=0), time.time(),
                    frozenset()))
            times.append(_time_step(instance))
            assert not instance.has_work(), "a profiled prefill batch did not fit one step"
        prefill.append(([l] * k, statistics.median(times)))
        bar.update(1)

    decode: list[tuple[list[int], float]] = []
    params = SamplingParams(max_tokens=1 << 20, ignore_eos=True, temperature=0)
    for batch, context in decode_jobs:
        scheduler, blocks = instance.scheduler, instance.blocks
        requests = []
        for _ in range(batch):
            r = Request(f"d{next(ids)}", tokens(context), params, time.time(), max_model_len=1 << 30)
            r.append_token(5)
            blocks.grow(r.block_table, r.num_tokens + grid.repeats + 1)
            r.num_computed_tokens = context
            scheduler.start_running(r)
            requests.append(r)
        times = [_time_step(instance) for _ in range(grid.repeats + 1)][1:]
        decode.append(([context + 1] * batch, statistics.median(times)))
        for r in requests:
            scheduler.abort(r.request_id)
        bar.update(1)
    bar.close()
    instance.close()
    meta = {"model": config.name, "threads": threads, "device": str(instance.executor.runner.device), "dtype": str(config.dtype),
            "quantization": quantization, "weight_bytes": instance.stats.weight_bytes}
    return fit_best(prefill, decode, meta)


def fit_best(
    prefill: list[tuple[list[int], float]], decode: list[tuple[list[int], float]], meta: dict[str, object]
) -> FittedLatencyModel:
    """The fit whose decode batch-size split fits best: none, or one of a few thresholds (the
    panel matmul kernel takes up to PANEL_ROWS rows, or without AVX-512 the streaming one up to
    SMALL_BATCH, and oneDNN the rest, so a step's cost per sequence changes there)."""
    thresholds = tuple(dict.fromkeys((None, SMALL_BATCH + 1, 8, 16, 32, PANEL_ROWS + 1)))
    candidates = [FittedLatencyModel.fit(prefill, decode, threshold, meta) for threshold in thresholds]
    return min(candidates, key=lambda m: m.fit_error["decode"] + m.fit_error["prefill"])


def read_step_log(path: str | Path) -> list[dict]:
    """The steps of one instance's log (`serve --step-log`), plain or gzipped (`.gz`)."""
    path = Path(path)
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines()]


def fit_step_logs(paths: list[str | Path], meta: dict[str, object] | None = None) -> FittedLatencyModel:
    """A latency model fitted to the steps serving instances logged (`serve --step-log`):
    the prefill-only steps (whole prompts) and the decode-only steps; the mixed steps of
    chunked prefill are left out."""
    prefill: list[tuple[list[int], float]] = []
    decode: list[tuple[list[int], float]] = []
    gaps: list[float] = []
    for path in paths:
        steps = read_step_log(path)
        for step in steps:
            if step["prefill"] and not step["decode"] and not any(step["prefill_context"]):
                prefill.append((step["prefill"], step["seconds"]))
            elif step["decode"] and not step["prefill"]:
                decode.append((step["decode"], step["seconds"]))
        gaps.extend(_busy_gaps(steps))
    if len(prefill) < 3 or len(decode) < 3:
        raise ValueError(f"{', '.join(map(str, paths))}: {len(prefill)} prefill and {len(decode)} decode steps; "
                         "a fit needs at least 3 of each (log both phases, e.g. one prefill and one decode instance's log).")
    model = fit_best(prefill, decode, {"source": "step logs", "files": [str(p) for p in paths], **(meta or {})})
    model.step_gap = statistics.fmean(gaps) if gaps else 0.0
    return model


def _busy_gaps(steps: list[dict]) -> list[float]:
    """The engine's own time between two steps of one instance while it had work: the gaps
    between consecutive decode steps whose every sequence carried on from the step before
    (one token longer). A request that joins may have waited for its KV pull or come after
    the instance idled: the simulator counts pulls and arrivals apart."""
    gaps = []
    for a, b in zip(steps, steps[1:]):
        if not a["decode"] or not b["decode"] or b["prefill"]:
            continue
        if collections.Counter(b["decode"]) - collections.Counter(c + 1 for c in a["decode"]):
            continue  # a sequence joined
        gap = b["start"] - (a["start"] + a["seconds"])
        if gap >= 0:
            gaps.append(gap)
    return gaps
