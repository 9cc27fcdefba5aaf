"""Disaggregated serving: prefill and decode instances in their own processes, KV pulled by
decode; the same tokens as colocated and as transformers, whatever the layout."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from distserve import LLM, EngineDeadError, RequestOutput, SamplingParams
from tests.tiny_models import hf_greedy, load_reference, mixed_prompts

GREEDY = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
LAYOUTS = {
    "colocated": dict(mode="colocated"),
    "1P1D": dict(mode="disaggregated"),
    "2P1D": dict(mode="disaggregated", num_prefill_instances=2),
    "1P2D": dict(mode="disaggregated", num_decode_instances=2),
}


def token_prompts(prompts: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in prompts]


@pytest.fixture(scope="module")
def expected(checkpoints) -> tuple[list[list[int]], list[list[int]]]:
    prompts = mixed_prompts(16, seed=21)
    reference = load_reference(checkpoints("llama-gqa"))
    return prompts, [hf_greedy(reference, p, 48) for p in prompts]


def all_free(engine: LLM) -> bool:
    return all(s.kv_blocks_free == s.kv_blocks_total for s in engine.get_stats())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_give_transformers_tokens(checkpoints, expected, layout: str) -> None:
    prompts, tokens = expected
    with LLM(str(checkpoints("llama-gqa")), num_kv_blocks=128, **LAYOUTS[layout]) as engine:
        outputs = engine.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        stats = engine.get_stats()
        assert all_free(engine)
    assert [o.outputs[0].token_ids for o in outputs] == tokens
    decode_stats = [s for s in stats if s.role == "decode"]
    if layout == "colocated":
        assert all(o.metrics.transfer_tokens == 0 for o in outputs)
        return
    for out, prompt in zip(outputs, prompts):
        m = out.metrics
        assert m.transfer_tokens == len(prompt) and m.transfer_bytes > 0
        assert m.prefill_instance.startswith("prefill-") and m.decode_instance.startswith("decode-")
        stamps = [m.arrival_time, m.prefill_queued_time, m.prefill_start_time, m.prefill_end_time,
                  m.migration_start_time, m.migration_end_time, m.decode_start_time, m.finished_time]
        assert stamps == sorted(stamps), stamps
        assert m.ttft > 0 and m.tpot > 0 and m.transfer_seconds >= 0
    assert sum(s.num_transfers for s in decode_stats) == len(prompts)
    assert sum(s.transferred_tokens for s in decode_stats) == sum(map(len, prompts))
    assert all(s.num_recomputes == 0 for s in decode_stats)
    if layout == "1P2D":
        assert all(s.num_transfers > 0 for s in decode_stats)  # both decode instances used


def test_requests_finishing_at_the_first_token_never_migrate(checkpoints) -> None:
    with LLM(str(checkpoints("llama-gqa")), mode="disaggregated", num_kv_blocks=64) as engine:
        outputs = engine.generate(token_prompts(mixed_prompts(4, seed=2)), SamplingParams(max_tokens=1), use_tqdm=False)
        stats = engine.get_stats()
        assert all_free(engine)
    assert all(len(o.outputs[0].token_ids) == 1 and o.metrics.transfer_tokens == 0 for o in outputs)
    assert sum(s.num_transfers for s in stats) == 0


def test_small_decode_budget_swaps_and_still_matches(checkpoints, expected) -> None:
    prompts, tokens = expected
    with LLM(str(checkpoints("llama-gqa")), mode="disaggregated", num_kv_blocks=128, decode={"num_kv_blocks": 10}) as engine:
        outputs = engine.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        decode = [s for s in engine.get_stats() if s.role == "decode"][0]
        assert all_free(engine)
    assert [o.outputs[0].token_ids for o in outputs] == tokens
    assert decode.num_swaps > 0 and decode.num_recomputes == 0


@pytest.fixture
def engine_1p1d(checkpoints):
    with LLM(str(checkpoints("llama-gqa")), mode="disaggregated", num_kv_blocks=64) as engine:
        yield engine


def pids(engine: LLM) -> dict[str, int]:
    return engine.engine.pids()


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_decode_instance_maps_the_prefill_cache_before_any_request(engine_1p1d) -> None:
    """The first pull pays no mapping: the decode process maps the prefill instance's
    shared-memory cache at start."""
    shm = engine_1p1d.engine._controller.ready["prefill-0"].kv_handles[0].shm_name
    assert shm is not None
    maps = Path(f"/proc/{pids(engine_1p1d)['decode-0']}/maps")
    wait_for(lambda: shm in maps.read_text())
    assert all(s.num_transfers == 0 for s in engine_1p1d.get_stats())


class Outputs:
    """The latest output of each request, as the engine steps."""

    def __init__(self, engine: LLM) -> None:
        self.engine = engine.engine
        self.latest: dict[str, RequestOutput] = {}

    def add(self, prompt: dict, params: SamplingParams) -> str:
        return self.engine.add_request(prompt, params)

    def poll_until(self, predicate, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            for out in self.engine.step(0.02):
                self.latest[out.request_id] = out

    def tokens(self, rid: str) -> int:
        return len(self.latest[rid].outputs[0].token_ids) if rid in self.latest else 0

    def finished(self, rid: str) -> bool:
        return rid in self.latest and self.latest[rid].finished


def instance_stats(engine: LLM, name: str):  # noqa: ANN201 - InstanceStats
    return next(s.stats for s in engine.engine.instance_status() if s.name == name)


@pytest.mark.parametrize("stage", ["queued", "awaiting_migration", "decoding"])
def test_abort_at_each_stage_frees_every_block(engine_1p1d, stage: str) -> None:
    engine, outputs = engine_1p1d, Outputs(engine_1p1d)
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    stopped = pids(engine)["prefill-0" if stage == "queued" else "decode-0"]
    rid = None
    try:
        if stage == "decoding":
            rid = outputs.add({"prompt_token_ids": [5] * 40}, long)
            outputs.poll_until(lambda: outputs.tokens(rid) >= 3)
        os.kill(stopped, signal.SIGSTOP)
        if stage != "decoding":
            rid = outputs.add({"prompt_token_ids": [5] * 40}, long)
        if stage == "awaiting_migration":  # prefilled, KV held, the pull not done yet
            outputs.poll_until(lambda: outputs.tokens(rid) == 1 and outputs.latest[rid].metrics.decode_instance is not None)
            outputs.poll_until(lambda: instance_stats(engine, "prefill-0").num_awaiting_pull == 1)
        engine.engine.abort(rid)
        outputs.poll_until(lambda: outputs.finished(rid))
        assert outputs.latest[rid].outputs[0].finish_reason == "abort"
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert all_free(engine)
    # the engine keeps serving afterwards
    assert engine.generate({"prompt_token_ids": [7, 8, 9]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_abort_at_random_times_leaves_every_block_free(engine_1p1d) -> None:
    outputs = Outputs(engine_1p1d)
    rids = [outputs.add({"prompt_token_ids": p}, GREEDY) for p in mixed_prompts(24, seed=5)]
    for i, rid in enumerate(rids):
        if i % 2 == 0:
            engine_1p1d.engine.abort(rid)
        outputs.poll_until(lambda: True)
        for out in engine_1p1d.engine.step(0.01):
            outputs.latest[out.request_id] = out
    outputs.poll_until(lambda: all(outputs.finished(rid) for rid in rids))
    assert all_free(engine_1p1d)


def test_a_killed_decode_instance_fails_its_requests_quickly(checkpoints) -> None:
    """With restarts off, a dead decode instance fails the requests it held at once, and the
    engine refuses new ones."""
    with LLM(str(checkpoints("llama-gqa")), mode="disaggregated", num_kv_blocks=64, max_restarts=0) as engine:
        outputs = Outputs(engine)
        rids = [outputs.add({"prompt_token_ids": [9] * 20}, SamplingParams(max_tokens=400, ignore_eos=True, temperature=0))
                for _ in range(4)]
        outputs.poll_until(lambda: all(outputs.tokens(rid) >= 2 for rid in rids))
        killed_at = time.monotonic()
        os.kill(pids(engine)["decode-0"], signal.SIGKILL)
        outputs.poll_until(lambda: all(outputs.finished(rid) for rid in rids), timeout=10)
        assert time.monotonic() - killed_at < 5
        assert all(outputs.latest[rid].error and "decode-0" in outputs.latest[rid].error for rid in rids)
        assert str(engine.engine.health()) == "unhealthy"
        with pytest.raises(EngineDeadError, match="decode"):
            engine.generate("more", SamplingParams(max_tokens=2), use_tqdm=False)


def test_prefilled_requests_fail_cleanly_when_no_decode_instance_is_alive(checkpoints) -> None:
    """The decode instance dies while prompts wait on the prefill instance: when each prefill
    finishes there is nowhere to send it; the request fails with a clear error, the prefill
    instance frees its blocks, and the other events of the batch are still handled."""
    with LLM(str(checkpoints("llama-gqa")), mode="disaggregated", num_kv_blocks=64, max_restarts=0) as engine:
        outputs = Outputs(engine)
        prefill = pids(engine)["prefill-0"]
        os.kill(prefill, signal.SIGSTOP)
        try:
            rids = [outputs.add({"prompt_token_ids": p}, GREEDY) for p in mixed_prompts(3, seed=2)]
            os.kill(pids(engine)["decode-0"], signal.SIGKILL)
            outputs.poll_until(lambda: not [s for s in engine.engine.instance_status() if s.name == "decode-0"][0].alive)
        finally:
            os.kill(prefill, signal.SIGCONT)
        outputs.poll_until(lambda: all(outputs.finished(rid) for rid in rids), timeout=10)
        for rid in rids:
            assert "no decode instance is alive" in outputs.latest[rid].error
        outputs.poll_until(lambda: (s := instance_stats(engine, "prefill-0")) is not None and s.kv_blocks_free == s.kv_blocks_total)
