"""Every architecture variant gives transformers' exact greedy tokens (float32)."""

from __future__ import annotations

import pytest

from distserve.sampling_params import SamplingParams
from tests.tiny_models import VARIANTS, hf_greedy, load_reference, mixed_prompts, run_in_process

NEW_TOKENS = 64


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers(checkpoints, variant: str) -> None:
    path = checkpoints(variant)
    prompts = mixed_prompts(8)
    reference = load_reference(path)
    expected = [hf_greedy(reference, p, NEW_TOKENS) for p in prompts]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    got, instance = run_in_process(path, prompts, params, num_kv_blocks=128)
    assert got == expected
    assert instance.blocks.num_free_blocks == instance.blocks.num_blocks


@pytest.mark.parametrize("variant", ["gpt2", "opt-post-ln-proj", "llama-gqa"])
def test_chunked_prefill_matches_transformers(checkpoints, variant: str) -> None:
    path = checkpoints(variant)
    prompts = mixed_prompts(8)
    reference = load_reference(path)
    expected = [hf_greedy(reference, p, 32) for p in prompts]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    got, instance = run_in_process(path, prompts, params, mode="chunked", num_kv_blocks=128, max_num_batched_tokens=13)
    assert got == expected
    assert instance.blocks.num_free_blocks == instance.blocks.num_blocks
