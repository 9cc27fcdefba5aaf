"""Every architecture variant gives transformers' exact greedy tokens (float32)."""

from __future__ import annotations

import pytest
import torch

from distserve.sampling_params import SamplingParams
from tests.tiny_models import VARIANTS, hf_greedy, load_reference, mixed_prompts, prompt_logits, run_in_process

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


@pytest.mark.parametrize("mode, phase", [("colocated", {}), ("chunked", {"max_num_batched_tokens": 96})])
@pytest.mark.parametrize("variant", ["opt-post-ln-proj", "llama-gqa"])
def test_long_prompts_match_transformers(checkpoints, variant: str, mode: str, phase: dict) -> None:
    """Prompts past 256 tokens, whose keys the prefill kernel copies out of the cache head by
    head before attending (whole, or in chunks after their cached part), beside short ones:
    transformers' greedy tokens, and its logits at every position of the longest prompt."""
    path = checkpoints(variant)
    prompts = mixed_prompts(4, seed=1, lengths=(300, 20, 257, 420))
    reference = load_reference(path)
    expected = [hf_greedy(reference, p, 8) for p in prompts]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    got, instance = run_in_process(path, prompts, params, mode=mode, num_kv_blocks=128, **phase)
    assert got == expected
    assert instance.blocks.num_free_blocks == instance.blocks.num_blocks
    with torch.inference_mode():
        hf_logits = reference(torch.tensor([prompts[-1]])).logits[0].float()
    torch.testing.assert_close(prompt_logits(instance, prompts[-1], phase.get("max_num_batched_tokens")), hf_logits,
                               atol=1e-4, rtol=1e-4)
