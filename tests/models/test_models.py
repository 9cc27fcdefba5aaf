"""Every architecture variant gives transformers' exact greedy tokens (float32)."""

from __future__ import annotations

from types import SimpleNamespace

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


@pytest.mark.parametrize("variant", ["gpt2", "opt-post-ln-proj", "llama-gqa"])
def test_last_layer_computes_only_sampled_rows(checkpoints, variant: str) -> None:
    """With `sampled_only` the model's last layer computes the sampled rows alone (a whole
    prompt's last token, a decode) and none of a prompt chunk that does not end its prompt:
    the model returns those rows of the full computation, and writes the same KV cache."""
    _, instance = run_in_process(checkpoints(variant), [], SamplingParams(), num_kv_blocks=64)
    runner, layers = instance.executor.runner, instance.executor.runner.model.attention_layers()
    tokens = mixed_prompts(3, seed=2, lengths=(40, 17, 31))
    chunk, whole, decoding = (SimpleNamespace(num_computed_tokens=0, block_table=list(range(b, b + 3)), token_ids=t,
                                              num_tokens=len(t)) for b, t in zip((0, 3, 6), tokens))

    def run(requests, counts, sampled_only, cache=None):
        for layer, k, v in zip(layers, (cache or [])[::2], (cache or [])[1::2]):
            layer.k_cache.copy_(k)
            layer.v_cache.copy_(v)
        batch = SimpleNamespace(requests=requests, num_new_tokens=counts)
        input_ids, positions, meta, _, flat = runner.prepare(batch, sampled_only=sampled_only)
        with torch.inference_mode():
            hidden = runner.model(input_ids, positions, meta, None)
        return hidden, flat, [c.clone() for layer in layers for c in (layer.k_cache, layer.v_cache)]

    run([decoding], [30], False)  # the decoding sequence's first 30 tokens in the cache
    decoding.num_computed_tokens = 30
    before = [c.clone() for layer in layers for c in (layer.k_cache, layer.v_cache)]
    for requests, counts in (([chunk, whole, decoding], [20, 17, 1]), ([chunk], [20])):
        full, flat, full_cache = run(requests, counts, False, before)
        pruned, _, pruned_cache = run(requests, counts, True, before)
        assert all(torch.equal(a, b) for a, b in zip(full_cache, pruned_cache))
        if flat:  # the whole prompt's last token, then the decode
            assert len(flat) == 2 and pruned.shape[0] == 2
            torch.testing.assert_close(pruned, full[flat], atol=1e-5, rtol=1e-5)
        else:  # only the chunk: the step's last token stands in, and is not sampled
            assert pruned.shape[0] == 1
