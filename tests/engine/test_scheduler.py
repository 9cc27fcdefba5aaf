"""Scheduling policies, budgets, back pressure and preemption, on requests without a model."""

from __future__ import annotations

from distserve.config import InstanceConfig, PhaseConfig
from distserve.engine.scheduler import Scheduler
from distserve.kv.block_manager import BlockManager
from distserve.layers.sampler import SampleResult
from distserve.request import Request, RequestStatus
from distserve.sampling_params import SamplingParams

BS = 4


def make(role: str = "colocated", blocks: int = 64, chunked: bool = False, swap: int = 0, **phase: object) -> Scheduler:
    config = InstanceConfig(
        name=f"{role}-0", role=role, phase=PhaseConfig(**phase), block_size=BS, device="cpu",
        num_threads=1, cpu_cores=None, seed=0, swap_space_gb=0, chunked_prefill=chunked,
    )
    return Scheduler(config, BlockManager(blocks, BS), BlockManager(swap, BS) if swap else None)


def req(rid: str, n: int, max_tokens: int = 100) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True), 0.0)


def run(s: Scheduler, token: int = 7) -> list[tuple[str, int]]:
    batch = s.schedule()
    samples = [
        SampleResult(token) if r.num_computed_tokens + n == r.num_tokens else None
        for r, n in zip(batch.requests, batch.num_new_tokens)
    ]
    s.update(batch, samples)
    return [(r.request_id, n) for r, n in zip(batch.requests, batch.num_new_tokens)]


def test_colocated_runs_new_prompts_with_the_decodes() -> None:
    s = make()
    s.add(req("a", 5))
    assert run(s) == [("a", 5)]
    s.add(req("b", 3))
    assert run(s) == [("a", 1), ("b", 3)]  # the decode goes on while the new prompt prefills
    assert run(s) == [("a", 1), ("b", 1)]


def test_batch_limits_bound_a_step() -> None:
    s = make(max_num_seqs=2, max_num_batched_tokens=10)
    for rid, n in (("a", 4), ("b", 4), ("c", 1)):
        s.add(req(rid, n))
    assert run(s) == [("a", 4), ("b", 4)]  # max_num_seqs
    s2 = make(max_num_batched_tokens=10)
    for rid, n in (("a", 6), ("b", 6)):
        s2.add(req(rid, n))
    assert run(s2) == [("a", 6)]  # the token budget


def test_chunked_prefill_shares_the_budget_with_decodes() -> None:
    s = make(chunked=True, max_num_batched_tokens=8)
    s.add(req("a", 3))
    assert run(s) == [("a", 3)]
    s.add(req("long", 20))
    assert run(s) == [("a", 1), ("long", 7)]
    assert run(s) == [("a", 1), ("long", 7)]
    assert run(s) == [("a", 1), ("long", 6)]
    assert run(s) == [("a", 1), ("long", 1)]


def test_shortest_prompt_first_for_prefill() -> None:
    s = make(role="prefill", policy="sjf", max_num_seqs=1)
    for rid, n in (("long", 12), ("short", 2), ("mid", 5)):
        s.add(req(rid, n))
    assert [run(s)[0][0] for _ in range(3)] == ["short", "mid", "long"]


def test_prefill_holds_blocks_until_pulled_and_applies_back_pressure() -> None:
    s = make(role="prefill", blocks=4)
    s.add(req("a", 8))
    s.add(req("b", 8))
    assert run(s) == [("a", 8), ("b", 8)]
    assert set(s.awaiting_pull) == {"a", "b"} and s.blocks.num_free_blocks == 0
    s.add(req("c", 4))
    assert run(s) == []  # no room until a pull releases blocks
    s.release("a")
    assert run(s) == [("c", 4)]


def test_decode_admits_a_migration_only_with_room() -> None:
    s = make(role="decode", blocks=4)
    first = req("a", 11)
    first.append_token(5)
    s.add_migration(first)
    second = req("b", 11)
    second.append_token(5)
    s.add_migration(second)
    admitted = s.admit_migrations()
    assert [r.request_id for r in admitted] == ["a"] and len(first.block_table) == 3
    assert s.admit_migrations() == [] and [r.request_id for r in s.migrations] == ["b"]


def test_recompute_preemption_frees_the_latest_request() -> None:
    s = make(blocks=3)
    s.add(req("a", 4))
    s.add(req("b", 4))
    run(s)
    # both need a second block for their next token; only one is free
    assert run(s) == [("a", 1)]
    b = s.find("b")
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert s.num_recomputes == 1


def test_swap_preemption_moves_blocks_out_and_back() -> None:
    s = make(blocks=3, swap=8, preemption_mode="swap")
    s.add(req("a", 4, max_tokens=2))
    s.add(req("b", 4))
    run(s)
    batch = s.schedule()
    assert batch.swap_out and s.find("b").status == RequestStatus.SWAPPED
    s.update(batch, [SampleResult(7)] * len(batch))  # a finishes, freeing its blocks
    batch = s.schedule()
    assert batch.swap_in and [r.request_id for r in batch.requests] == ["b"]


def test_abort_frees_blocks_wherever_the_request_is() -> None:
    s = make(role="prefill", blocks=8)
    s.add(req("held", 8))
    run(s)
    s.add(req("queued", 4))
    for rid in ("held", "queued"):
        assert s.abort(rid) is not None
    assert s.blocks.num_free_blocks == 8 and not s.has_work() and not s.awaiting_pull


def test_a_prompt_longer_than_the_budget_runs_as_the_only_prompt() -> None:
    s = make(max_num_batched_tokens=8)
    s.add(req("long", 20))
    s.add(req("short", 2))
    assert run(s) == [("long", 20)]
    assert run(s) == [("long", 1), ("short", 2)]
    s.add(req("long2", 9))
    assert run(s) == [("long", 1), ("short", 1), ("long2", 9)]  # past the budget, with the decodes
