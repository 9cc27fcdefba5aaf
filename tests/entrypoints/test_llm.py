"""The offline API end to end (instances in their own processes)."""

from __future__ import annotations

import pytest

from distserve import LLM, SamplingParams
from tests.tiny_models import hf_greedy, load_reference, mixed_prompts

GREEDY = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)


def token_prompts(prompts: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in prompts]


@pytest.fixture(scope="module")
def llm(checkpoints):
    with LLM(str(checkpoints("llama-gqa")), mode="colocated", num_kv_blocks=256) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(checkpoints):
    return load_reference(checkpoints("llama-gqa"))


def assert_all_blocks_free(engine: LLM) -> None:
    stats = engine.get_stats()
    assert stats and all(s.kv_blocks_free == s.kv_blocks_total for s in stats), stats


def test_alone_and_in_a_batch_of_16_match_transformers(llm, reference) -> None:
    prompts = mixed_prompts(16, seed=3)
    batch = [o.outputs[0].token_ids for o in llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)]
    alone = llm.generate(token_prompts(prompts[5:6]), GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == batch[5]
    assert batch == [hf_greedy(reference, p, 64) for p in prompts]
    assert_all_blocks_free(llm)


def test_outputs_carry_text_metrics_and_finish_reason(llm) -> None:
    out = llm.generate("the café and", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    completion = out.outputs[0]
    assert out.finished and completion.finish_reason == "length" and len(completion.token_ids) == 5
    assert completion.text == llm.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    m = out.metrics
    assert 0 < m.ttft <= m.e2e_latency and m.tpot > 0
    assert m.arrival_time <= m.prefill_start_time <= m.prefill_end_time <= m.finished_time


def test_seeded_sampling_is_reproducible(llm) -> None:
    prompts = token_prompts(mixed_prompts(6, seed=4))
    params = [SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=100 + i, ignore_eos=True) for i in range(6)]
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = llm.generate(prompts[2], params[2], use_tqdm=False)[0].outputs[0].token_ids
    assert first == again and alone == first[2]
    other_seed = llm.generate(prompts[2], SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1, ignore_eos=True),
        use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != first[2]


def test_top_k_1_equals_greedy(llm) -> None:
    prompts = token_prompts(mixed_prompts(4, seed=5))
    greedy = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    top1 = SamplingParams(max_tokens=64, temperature=0.8, top_k=1, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, top1, use_tqdm=False)] == greedy


def test_stop_strings_and_stop_tokens(llm) -> None:
    prompt = token_prompts(mixed_prompts(1, seed=6))
    full = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    cut = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    token = full.token_ids[7]
    by_token = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[token]),
        use_tqdm=False)[0].outputs[0]
    assert by_token.token_ids == full.token_ids[: full.token_ids.index(token) + 1]
    assert (by_token.finish_reason, by_token.stop_reason) == ("stop", token)
    assert_all_blocks_free(llm)


def test_logprobs(llm) -> None:
    out = llm.generate("the", SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs):
        assert entry[token].rank == 1 and len(entry) == 3
        assert max(lp.logprob for lp in entry.values()) == entry[token].logprob
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_chat_uses_the_template(llm) -> None:
    messages = [{"role": "user", "content": "the café"}]
    out = llm.chat(messages, SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0]
    expected = llm.tokenizer("<|im_start|>user\nthe café<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert out.prompt_token_ids == expected


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ("", None, "empty"),
        ({"prompt_token_ids": [5] * 600}, None, "context"),
        ({"prompt_token_ids": [5, 100000]}, None, "vocabulary"),
        ({"nothing": 1}, None, "prompt_token_ids"),
    ],
)
def test_bad_input_is_a_clear_error(llm, prompt, params, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt, params, use_tqdm=False)
    assert_all_blocks_free(llm)


def test_mismatched_params_list_is_an_error(llm) -> None:
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate(["a", "b"], [SamplingParams(), SamplingParams(), SamplingParams()], use_tqdm=False)


def test_chunked_prefill_mode_gives_the_same_tokens(checkpoints, reference) -> None:
    prompts = mixed_prompts(16, seed=9)
    with LLM(str(checkpoints("llama-gqa")), mode="chunked", max_num_batched_tokens=16, num_kv_blocks=256) as engine:
        got = [o.outputs[0].token_ids for o in engine.generate(token_prompts(prompts), GREEDY, use_tqdm=False)]
        assert_all_blocks_free(engine)
    assert got == [hf_greedy(reference, p, 64) for p in prompts]


@pytest.mark.parametrize("mode", ["colocated", "chunked"])
def test_small_kv_budget_preempts_and_still_matches(checkpoints, reference, mode: str) -> None:
    prompts = mixed_prompts(16, seed=10)
    kwargs = dict(max_num_batched_tokens=32) if mode == "chunked" else {}
    with LLM(str(checkpoints("llama-gqa")), mode=mode, num_kv_blocks=14, **kwargs) as engine:
        got = [o.outputs[0].token_ids for o in engine.generate(token_prompts(prompts), GREEDY, use_tqdm=False)]
        stats = engine.get_stats()
    assert got == [hf_greedy(reference, p, 64) for p in prompts]
    assert stats[0].num_preemptions > 0
    assert stats[0].kv_blocks_free == stats[0].kv_blocks_total


def test_n_samples_share_the_prompt_and_each_is_a_seeded_request(llm) -> None:
    prompt = {"prompt_token_ids": mixed_prompts(1, seed=12, lengths=(40,))[0]}
    greedy = llm.generate(prompt, SamplingParams(n=4, max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in greedy.outputs] == [0, 1, 2, 3] and len({tuple(c.token_ids) for c in greedy.outputs}) == 1
    seeded = SamplingParams(n=4, max_tokens=12, temperature=1.0, top_p=0.9, seed=100, ignore_eos=True)
    samples = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs
    alone = [llm.generate(prompt, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=100 + i, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids for i in range(4)]
    assert [c.token_ids for c in samples] == alone and len({tuple(a) for a in alone}) > 1
    best = llm.generate(prompt, SamplingParams(n=2, best_of=4, max_tokens=12, temperature=1.0, seed=100, ignore_eos=True),
                        use_tqdm=False)[0].outputs
    assert len(best) == 2 and best[0].cumulative_logprob is None  # ranked by logprobs it did not ask for
    ranked = sorted(
        (llm.generate(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=100 + i, ignore_eos=True, logprobs=0),
                      use_tqdm=False)[0].outputs[0] for i in range(4)),
        key=lambda c: -c.cumulative_logprob,
    )
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    assert_all_blocks_free(llm)
