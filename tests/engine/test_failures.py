"""One request's data never takes an instance down: a step that fails is run again a request
at a time, and only the request that fails alone fails."""

from __future__ import annotations

import math
import time

from distserve.config import DeploymentConfig, resolve_instances
from distserve.engine.instance_loop import build_instance
from distserve.engine.messages import AddRequest, RequestFailed, StepOutput
from distserve.sampling_params import SamplingParams
from distserve.weights.source import load_model_config
from tests.tiny_models import mixed_prompts, run_in_process

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_a_request_that_breaks_a_step_fails_alone(checkpoints) -> None:
    path = str(checkpoints("llama-gqa"))
    prompts = mixed_prompts(4, seed=9)
    model = load_model_config(path)
    instance = build_instance(model, resolve_instances(DeploymentConfig(model=path, mode="colocated", max_model_len=512), model)[0])
    # what a front that skipped validation could send: NaN makes the sampling distribution NaN
    bad = SamplingParams(max_tokens=12, temperature=0.7, ignore_eos=True)
    bad.temperature = math.nan
    for i, prompt in enumerate(prompts):
        instance.handle(AddRequest(str(i), prompt, bad if i == 2 else GREEDY, time.time(), frozenset()))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    failed: list[RequestFailed] = []
    while instance.has_work():
        for event in instance.step():
            if isinstance(event, StepOutput):
                for token in event.tokens:
                    tokens[token.request_id].append(token.token_id)
            elif isinstance(event, RequestFailed):
                failed.append(event)
    assert [f.request_id for f in failed] == ["2"] and "NaN" in failed[0].error
    assert tokens["2"] == []
    alone, _ = run_in_process(path, [p for i, p in enumerate(prompts) if i != 2], GREEDY)
    assert [tokens[str(i)] for i in (0, 1, 3)] == alone
    assert instance.blocks.num_free_blocks == instance.blocks.num_blocks
    instance.close()
