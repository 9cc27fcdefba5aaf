"""The simulator schedules as the engine does: the same requests through the real engine
(instances in their own processes, a real model) and through the simulator give the same
steps, step by step (which requests, how many tokens each), in every mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distserve import LLM, SamplingParams
from distserve.config import Policy, Role
from distserve.planner.latency_model import FittedLatencyModel
from distserve.planner.simulator import ClusterSpec, InstanceSpec, simulate
from tests.tiny_models import mixed_prompts

BS = 16
# any step times: with every request there at the start, the steps do not depend on them
LATENCY = FittedLatencyModel((0.05, 1e-5, 0.0), (0.01, 1e-6, 1e-4), (0.01, 1e-6, 1e-4))


def logged_steps(folder: Path, ids: dict[str, int]) -> dict[str, list[list[tuple[int, int]]]]:
    """Each instance's steps from its step log: (request index, tokens computed) per request."""
    return {
        log.stem: [[(ids[rid], n) for rid, n in json.loads(line)["requests"]] for line in log.read_text().splitlines()]
        for log in sorted(folder.glob("*.jsonl"))
    }


CASES = {
    # whole prompts batched with decodes; a small cache preempts (recompute) and re-admits
    "colocated": ({"num_kv_blocks": 12}, [InstanceSpec(Role.COLOCATED, LATENCY, 12 * BS, max_num_batched_tokens=2048)]),
    # prompt chunks and decodes under one 32-token budget; preemption too
    "chunked": ({"num_kv_blocks": 12, "max_num_batched_tokens": 32},
                [InstanceSpec(Role.COLOCATED, LATENCY, 12 * BS, max_num_batched_tokens=32, chunked=True)]),
    # every prompt in one prefill step (shortest first); a small decode cache swaps
    "disaggregated": ({"prefill": {"num_kv_blocks": 128, "max_num_batched_tokens": 4096, "policy": "sjf"},
                       "decode": {"num_kv_blocks": 10, "max_num_seqs": 6}},
                      [InstanceSpec(Role.PREFILL, LATENCY, 128 * BS, max_num_batched_tokens=4096, policy=Policy.SJF),
                       InstanceSpec(Role.DECODE, LATENCY, 10 * BS, max_num_seqs=6)]),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(CASES))
def test_simulator_steps_are_the_engines(checkpoints, tmp_path: Path, mode: str) -> None:
    settings, instances = CASES[mode]
    prompts = mixed_prompts(12, seed=8)
    outputs = [4 + 5 * (i % 5) for i in range(len(prompts))]
    real_log, sim_log = tmp_path / "real", tmp_path / "sim"
    with LLM(str(checkpoints("llama-gqa")), mode=mode, step_log=str(real_log), **settings) as llm:
        ids = llm.engine.add_requests([
            ({"prompt_token_ids": p}, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), None)
            for p, n in zip(prompts, outputs)
        ])
        finished = 0
        while finished < len(ids):
            finished += sum(o.finished for o in llm.engine.step(0.05))
        preemptions = {s.name: (s.num_recomputes, s.num_swaps) for s in llm.get_stats()}
    simulate(ClusterSpec(instances, step_log=str(sim_log)), [0.0] * len(prompts), [(len(p), n) for p, n in zip(prompts, outputs)])

    real = logged_steps(real_log, {rid: i for i, rid in enumerate(ids)})
    simulated = logged_steps(sim_log, {str(i): i for i in range(len(prompts))})
    assert sorted(real) == sorted(simulated)
    for name in real:
        assert simulated[name] == real[name], name
    # the case exercises what it is meant to: recompute preemption (colocated, chunked),
    # chunks sharing steps with decodes, swapping on the decode instance
    steps = [s for rows in real.values() for s in rows]
    assert len(steps) > 20
    if mode == "disaggregated":
        assert preemptions["decode-0"][1] > 0
    else:
        assert preemptions["colocated-0"][0] > 0
    if mode == "chunked":
        assert any(len(s) > 1 and {n for _, n in s} != {1} for s in steps)
