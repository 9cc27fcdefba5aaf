"""Prefix caching end to end: the same greedy tokens with the cache on and off (and as
transformers gives them) in every mode; a repeated prompt computes only its last block; a
decode instance pulls only what it lacks; eviction and aborts leave every block free."""

from __future__ import annotations

import json

import pytest

from distserve import LLM, SamplingParams
from distserve.config import Role
from distserve.engine.router import InstanceLoad, Router, RoutingPolicy
from tests.engine.test_disaggregated import Outputs, pids  # noqa: F401 - Outputs drives the engine
from tests.tiny_models import hf_greedy, load_reference, mixed_prompts

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
BS = 16


def shared_prefix_prompts() -> list[list[int]]:
    """A 40-token system prompt with short questions, and a second turn that extends a first."""
    system, questions = mixed_prompts(1, seed=21, lengths=(40,))[0], mixed_prompts(5, seed=22, lengths=(3, 9, 17))
    first = system + questions[0]
    return [system + q for q in questions] + [first + mixed_prompts(1, seed=23, lengths=(30,))[0]]


def tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]


def all_free(llm: LLM) -> bool:
    return all(s.kv_blocks_free == s.kv_blocks_total for s in llm.get_stats())


@pytest.fixture(scope="module")
def reference(checkpoints):
    model = load_reference(checkpoints("llama-gqa"))
    return [hf_greedy(model, p, GREEDY.max_tokens) for p in shared_prefix_prompts()]


@pytest.mark.parametrize("mode, kwargs", [
    ("colocated", {}),
    ("chunked", {"max_num_batched_tokens": 24}),
    ("disaggregated", {}),
    ("disaggregated", {"prefill": {"tensor_parallel_size": 2}}),
])
def test_cache_on_gives_the_tokens_of_cache_off(checkpoints, reference, mode: str, kwargs: dict) -> None:
    prompts = shared_prefix_prompts()
    path = str(checkpoints("llama-gqa"))
    with LLM(path, mode=mode, num_kv_blocks=96, **kwargs) as llm:
        together = tokens(llm, prompts)  # one batch: the prefix is shared within a step
        one_by_one = [tokens(llm, [p])[0] for p in prompts]  # each after the last: from the cache
        stats = llm.get_stats()
        assert all_free(llm)
    assert together == one_by_one == reference
    assert sum(s.prefix_cache_hits for s in stats) > 0
    with LLM(path, mode=mode, num_kv_blocks=96, enable_prefix_caching=False, **kwargs) as llm:
        assert tokens(llm, prompts) == reference
        assert sum(s.prefix_cache_hits + s.prefix_cache_queries for s in llm.get_stats()) == 0


def test_a_repeated_prompt_computes_only_its_last_block(checkpoints, tmp_path) -> None:
    prompt = mixed_prompts(1, seed=5, lengths=(50,))[0]  # 3 full blocks and 2 tokens
    with LLM(str(checkpoints("llama-gqa")), num_kv_blocks=64, step_log=str(tmp_path)) as llm:
        first = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
        second = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
        stats = llm.get_stats()[0]
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert (first.metrics.num_cached_tokens, second.metrics.num_cached_tokens) == (0, 48)
    prefills = [json.loads(line)["prefill"] for line in (tmp_path / "colocated-0.jsonl").read_text().splitlines()]
    assert [p for p in prefills if p] == [[50], [2]]  # the second computes 2 tokens
    assert stats.prefix_cache_hits == 48 and stats.prefix_cache_queries == 49 + 49


def test_reset_prefix_cache_forgets_every_cached_block(checkpoints) -> None:
    prompt = mixed_prompts(1, seed=5, lengths=(50,))[0]
    with LLM(str(checkpoints("llama-gqa")), num_kv_blocks=64) as llm:
        first = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
        assert llm.get_stats()[0].prefix_cache_blocks > 0
        assert llm.reset_prefix_cache()
        stats = llm.get_stats()[0]
        assert stats.prefix_cache_blocks == 0 and stats.kv_blocks_free == stats.kv_blocks_total
        again = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
    assert again.metrics.num_cached_tokens == 0 and again.outputs[0].token_ids == first.outputs[0].token_ids


def second_turn(llm: LLM) -> tuple[list[int], object, object]:
    """A first turn, then a second whose prompt extends it: (second prompt, both outputs)."""
    first = shared_prefix_prompts()[0]
    one = llm.generate({"prompt_token_ids": first}, GREEDY, use_tqdm=False)[0]
    turn = first + one.outputs[0].token_ids + [7, 8, 9]
    return turn, one, llm.generate({"prompt_token_ids": turn}, GREEDY, use_tqdm=False)[0]


def test_the_decode_instance_pulls_only_what_it_lacks(checkpoints) -> None:
    """A second turn extends the first: routed to the decode instance that served the first
    (it holds that turn's prompt and answer in its own cache), it pulls only the rest."""
    with LLM(str(checkpoints("llama-gqa")), mode="disaggregated", num_kv_blocks=96, conditional_prefill_tokens=0) as llm:
        turn, one, two = second_turn(llm)
        assert all_free(llm)
    assert one.metrics.transfer_blocks_reused == 0 and one.metrics.transfer_blocks_pulled == -(-one.metrics.num_prompt_tokens // BS)
    # the first turn's prompt and all but the last token of its answer were computed on the
    # decode instance, so its full blocks are there
    reused = (one.metrics.num_prompt_tokens + GREEDY.max_tokens - 1) // BS
    assert two.metrics.transfer_blocks_reused == reused
    assert two.metrics.transfer_blocks_pulled == -(-len(turn) // BS) - reused
    assert two.outputs[0].token_ids == hf_greedy(load_reference(checkpoints("llama-gqa")), turn, GREEDY.max_tokens)


def test_a_short_uncached_suffix_is_prefilled_on_the_decode_instance(checkpoints) -> None:
    """Conditional disaggregation: the decode instance holds all but a few tokens of the
    second turn, so it prefills them itself; nothing moves between instances."""
    with LLM(str(checkpoints("llama-gqa")), mode="disaggregated", num_kv_blocks=96, conditional_prefill_tokens=32) as llm:
        turn, one, two = second_turn(llm)
        assert all_free(llm)
    assert one.metrics.prefill_instance == "prefill-0"
    assert two.metrics.prefill_instance == "decode-0" and two.metrics.decode_instance is None
    assert two.metrics.transfer_blocks_pulled == 0 and two.metrics.num_cached_tokens >= len(turn) - 32
    assert two.outputs[0].token_ids == hf_greedy(load_reference(checkpoints("llama-gqa")), turn, GREEDY.max_tokens)


@pytest.mark.parametrize("message, queued, shared, where", [
    (100, 0, False, "decode-0"), (250, 0, False, "decode-0"), (400, 0, False, "prefill-0"),
    (400, 10_000, False, "decode-0"), (600, 0, False, "prefill-0"),
    (400, 0, True, "decode-0"), (600, 0, True, "decode-0"),
])
def test_a_next_turn_goes_where_its_uncached_work_is_least(message: int, queued: int, shared: bool, where: str) -> None:
    """The decode instance holds turn one's prompt and 300-token answer, the prefill instance
    the prompt only. A next turn's message up to the limit (128) is prefilled on the decode
    instance; a longer one up to 4x the limit too, as the prefill instance would compute the
    answer again besides, unless the prefill instance would have less than twice its work ahead
    (a 400-token message: 404 against 708), or the message is over 4x the limit. Where the
    phases share cores (`shared`: they prefill equally fast), it goes to the decode instance
    whenever that computes fewer tokens (a 600-token message: 604 against 908)."""
    prefill = InstanceLoad("prefill-0", Role.PREFILL, 1000, BS)
    decode = InstanceLoad("decode-0", Role.DECODE, 1000, BS)
    router = Router([prefill, decode], RoutingPolicy.CACHE_AWARE, conditional_prefill_tokens=128, shared_cores=shared)
    first = list(range(1000, 1200))
    conversation = first + list(range(5000, 5300))
    prefill.remember(router.hashes(first))
    decode.remember(router.hashes(conversation))
    prefill.queued_tokens = queued
    turn = conversation + list(range(9000, 9000 + message))
    assert router.route_prompt("r", turn, router.hashes(turn)).name == where


def test_eviction_under_pressure_stays_exact_and_leaks_nothing(checkpoints) -> None:
    prompts = [p + q for p in mixed_prompts(6, seed=31, lengths=(33, 40)) for q in mixed_prompts(2, seed=32, lengths=(5,))]
    model = load_reference(checkpoints("llama-gqa"))
    with LLM(str(checkpoints("llama-gqa")), num_kv_blocks=12, max_num_seqs=4) as llm:
        got = tokens(llm, prompts)
        stats = llm.get_stats()[0]
        assert all_free(llm)
    assert got == [hf_greedy(model, p, GREEDY.max_tokens) for p in prompts]
    assert stats.prefix_cache_hits > 0 and stats.num_preemptions > 0


def test_aborting_a_request_that_shares_blocks_frees_only_its_references(checkpoints) -> None:
    prompt = mixed_prompts(1, seed=41, lengths=(48,))[0]
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    with LLM(str(checkpoints("llama-gqa")), num_kv_blocks=64) as llm:
        outputs = Outputs(llm)
        keep, drop = outputs.add({"prompt_token_ids": prompt}, long), outputs.add({"prompt_token_ids": prompt}, long)
        outputs.poll_until(lambda: outputs.tokens(keep) >= 3 and outputs.tokens(drop) >= 3)
        llm.engine.abort(drop)
        outputs.poll_until(lambda: outputs.finished(keep))
        assert outputs.latest[drop].outputs[0].finish_reason == "abort"
        assert outputs.latest[keep].outputs[0].token_ids == tokens(llm, [prompt], long)[0]
        assert all_free(llm)


@pytest.mark.parametrize("policy", ["cache-aware", "least-loaded"])
def test_cache_aware_routing_sends_a_shared_prefix_where_it_is_cached(checkpoints, policy: str) -> None:
    """Two colocated instances; the first holds a system prompt's blocks and decodes a long
    request. The same system prompt's next questions go where it is cached (cache-aware), or
    to the instance with fewer requests, which computes it again (least-loaded)."""
    first, *questions = shared_prefix_prompts()[:5]
    long = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
    with LLM(str(checkpoints("llama-gqa")), num_instances=2, num_kv_blocks=64, routing_policy=policy) as llm:
        warm = llm.generate({"prompt_token_ids": first}, GREEDY, use_tqdm=False)[0]
        outputs = Outputs(llm)
        busy = outputs.add({"prompt_token_ids": mixed_prompts(1, seed=50, lengths=(20,))[0]}, long)
        outputs.poll_until(lambda: outputs.tokens(busy) >= 2)
        outs = [llm.generate({"prompt_token_ids": q}, GREEDY, use_tqdm=False)[0] for q in questions]
        llm.engine.abort(busy)
    assert outputs.latest[busy].metrics.prefill_instance == warm.metrics.prefill_instance  # both idle: the first
    where = {o.metrics.prefill_instance for o in outs}
    if policy == "cache-aware":
        assert where == {warm.metrics.prefill_instance} and all(o.metrics.num_cached_tokens >= 32 for o in outs)
    else:
        assert warm.metrics.prefill_instance not in where and outs[0].metrics.num_cached_tokens == 0
