"""Sampling cost per decode step, side by side: distserve's sampler against transformers' way
(its logits warpers, then `torch.multinomial`, as `generate(do_sample=True)` runs them) and
against the exponential race distserve used before (one Exponential(1) draw per vocabulary
entry, `argmax(probs / E)`).

The logits are SmolLM2-135M-Instruct's own (vocabulary 49,152) at the last token of ShareGPT
prompts, so the distributions are as peaked as a real model's. 2 threads, float32.

    python -m benchmarks.sampler

Prints a table and writes benchmarks/results/sampler.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.checkpoints import smollm2_folder
from benchmarks.report import report
from distserve.layers.sampler import SamplingBatch, sample
from distserve.sampling_params import SamplingParams

RESULTS = Path("benchmarks/results")
BATCHES = (1, 16, 64)
SETTINGS = {
    "temperature 1": dict(temperature=1.0),
    "temperature 0.8, top_p 0.95": dict(temperature=0.8, top_p=0.95),
    "temperature 0.8, top_k 50": dict(temperature=0.8, top_k=50),
}


def model_logits(count: int) -> torch.Tensor:
    """Last-token logits of SmolLM2 on `count` ShareGPT prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distserve.bench.workloads import WorkloadSpec, load_workload

    folder = smollm2_folder(Path("/tmp/distserve-bench-models"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    requests = load_workload(WorkloadSpec("sharegpt", num_requests=count, max_prompt_len=256, max_model_len=1024), tokenizer)
    rows = []
    with torch.inference_mode():
        for r in tqdm(requests, desc="logits", unit="prompt"):
            rows.append(model(torch.tensor([r.prompt_token_ids])).logits[0, -1])
    return torch.stack(rows)


def transformers_sample(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    scores = warpers(None, logits)
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


def exponential_race(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """The previous sampler's draw (its top-k and top-p by whole-row sorts)."""
    logits = logits / temperature
    if top_k:
        kth = logits.sort(dim=-1, descending=True).values[:, top_k - 1 : top_k]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        values, order = probs.sort(dim=-1, descending=True)
        drop = (values.cumsum(dim=-1) - values) >= top_p
        probs = probs.scatter(1, order, values.masked_fill(drop, 0.0))
    return (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)


def timed(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(2)
    logits = model_logits(max(BATCHES))
    rows = []
    generator = torch.Generator().manual_seed(0)
    for name, kwargs in SETTINGS.items():
        for batch in BATCHES:
            x = logits[:batch].contiguous()
            params = SamplingParams(**kwargs)
            sampling = SamplingBatch([params] * batch, [[] for _ in range(batch)], [[] for _ in range(batch)])
            rows.append({
                "setting": name,
                "batch": batch,
                "distserve_ms": 1e3 * timed(lambda x=x, sampling=sampling: sample(x, sampling, generator)),
                "transformers_ms": 1e3 * timed(lambda x=x, kwargs=kwargs: transformers_sample(x, **kwargs)),
                "exponential_race_ms": 1e3 * timed(lambda x=x, kwargs=kwargs: exponential_race(x, **kwargs)),
            })
    report(rows, [("setting", "setting", "<30"), ("batch", "batch", "d"), ("distserve ms", "distserve_ms", ".2f"),
                  ("transformers ms", "transformers_ms", ".2f"), ("previous (exp. race) ms", "exponential_race_ms", ".2f")],
           RESULTS / "sampler.json", vocab=logits.shape[1], threads=2)


if __name__ == "__main__":
    main()
