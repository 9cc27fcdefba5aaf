"""Decode step time by batch size, three ways interleaved step by step in one process (so that
all see the same minutes of this machine):

- one call: each LLaMA layer as one native call, its matmuls on the panel kernel up to
  `PANEL_ROWS` rows and on oneDNN's packed weight above (the engine's path);
- one call, oneDNN: the same with every matmul on oneDNN (what the panel kernel gains);
- layer by layer: torch modules, the same matmuls.

This is what sets `FUSED_DECODE_BATCH`.

SmolLM2-135M float32, 2 threads, contexts drawn from 64-600 tokens, greedy.

    python -m benchmarks.decode_step

Prints a table and writes benchmarks/results/decode_step.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import distserve.models.base as base
from benchmarks.checkpoints import smollm2_folder
from benchmarks.report import report
from distserve.config import DeploymentConfig, resolve_instances
from distserve.engine.instance_loop import build_instance
from distserve.layers.linear import PANEL_ROWS
from distserve.request import Request
from distserve.sampling_params import SamplingParams
from distserve.weights.source import load_model_config

RESULTS = Path("benchmarks/results")
BATCHES = (1, 4, 8, 9, 12, 16, 24, 32, 48, 64, 96, 128)
STEPS = 36  # per batch size, the three paths in turn
PATHS = ("one call", "one call, oneDNN", "layer by layer")


def set_stream_rows(layers: list, rows: int) -> None:
    """The matmul rows up to which the one-call layers run the panel kernel (the third last of
    their shape arguments: stream rows, quantized stream rows, int8 activations)."""
    for layer in layers:
        layer.fused_shape = (*layer.fused_shape[:-3], rows, *layer.fused_shape[-2:])


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(2)
    model = str(smollm2_folder(Path("/tmp/distserve-bench-models")))
    config = load_model_config(model, max_model_len=2048)
    deployment = DeploymentConfig(model=model, mode="colocated", max_model_len=2048)
    deployment.colocated.num_kv_blocks = max(BATCHES) * 48
    instance = build_instance(config, resolve_instances(deployment, config)[0])
    rng, ids = random.Random(0), iter(range(1 << 30))
    params = SamplingParams(max_tokens=1 << 20, ignore_eos=True, temperature=0)
    limit = base.FUSED_DECODE_BATCH
    model = instance.executor.runner.model
    assert all(layer.prepare_fused_decode() for layer in model.model.layers), "SmolLM2 runs the one-call decode layer"
    layers = list(model.model.layers)
    rows = []
    for batch in tqdm(BATCHES, desc="batch sizes"):
        requests = []
        for _ in range(batch):
            context = rng.randrange(64, 600)
            r = Request(f"d{next(ids)}", [rng.randrange(3, 1000) for _ in range(context)], params, time.time(), max_model_len=1 << 30)
            r.append_token(5)
            instance.blocks.grow(r.block_table, r.num_tokens + STEPS + 1)
            r.num_computed_tokens = context
            instance.scheduler.start_running(r)
            requests.append(r)
        times: dict[str, list[float]] = {path: [] for path in PATHS}
        for i in range(STEPS):
            path = PATHS[(i + i // len(PATHS)) % len(PATHS)]  # each path in each place of the round in turn
            base.FUSED_DECODE_BATCH = 0 if path == "layer by layer" else 1 << 30
            set_stream_rows(layers, 0 if path == "one call, oneDNN" else PANEL_ROWS)
            start = time.perf_counter()
            instance.step()
            times[path].append(time.perf_counter() - start)
        ms = {path: 1e3 * statistics.median(times[path][1:]) for path in PATHS}
        rows.append({"batch": batch, "one_call_ms": ms["one call"], "one_call_onednn_ms": ms["one call, oneDNN"],
                     "layer_by_layer_ms": ms["layer by layer"], "ratio": ms["one call"] / ms["layer by layer"]})
        for r in requests:
            instance.scheduler.abort(r.request_id)
    base.FUSED_DECODE_BATCH = limit
    set_stream_rows(layers, PANEL_ROWS)
    instance.close()
    report(rows, [("batch", "batch", "d"), ("one call ms", "one_call_ms", ".1f"),
                  ("one call, oneDNN ms", "one_call_onednn_ms", ".1f"), ("layer by layer ms", "layer_by_layer_ms", ".1f"),
                  ("one call / layer by layer", "ratio", ".3f")],
           RESULTS / "decode_step.json", model="SmolLM2-135M", threads=2, fused_decode_batch=limit,
           panel_rows=PANEL_ROWS)


if __name__ == "__main__":
    main()
