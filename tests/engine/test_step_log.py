"""The per-step log (`step_log`): every step an instance ran, with the prompt tokens and
decode contexts it computed, as the planner's latency models take them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from distserve import LLM, SamplingParams
from tests.tiny_models import hf_greedy, load_reference, mixed_prompts

MAX_TOKENS = 6


def read(folder: Path) -> dict[str, list[dict]]:
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(folder.glob("*.jsonl"))}


@pytest.mark.parametrize("mode, kwargs", [
    ("disaggregated", {}),
    ("chunked", {"max_num_batched_tokens": 16}),  # prompts longer than 16 tokens are split
])
def test_step_log_accounts_for_every_token(checkpoints, tmp_path: Path, mode: str, kwargs: dict) -> None:
    prompts = mixed_prompts(6, seed=5)
    with LLM(str(checkpoints("llama-gqa")), mode=mode, num_kv_blocks=64, step_log=str(tmp_path), **kwargs) as engine:
        engine.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True), use_tqdm=False)
    logs = read(tmp_path)
    assert sorted(logs) == (["decode-0", "prefill-0"] if mode == "disaggregated" else ["colocated-0"])
    steps = [s for rows in logs.values() for s in rows]
    assert all(s["seconds"] > 0 and s["start"] > 0 for s in steps)
    # every prompt token computed once, in chunks that start where the last one ended
    chunks = sorted(zip((c for s in steps for c in s["prefill_context"]), (n for s in steps for n in s["prefill"])))
    assert sum(n for _, n in chunks) == sum(map(len, prompts))
    if mode == "chunked":
        assert max(n for _, n in chunks) <= 16 and any(c > 0 for c, _ in chunks)
    # every token after the first is one decode, at contexts prompt + 1 ... prompt + MAX_TOKENS - 1
    decoded = Counter(c for s in steps for c in s["decode"])
    assert decoded == Counter(len(p) + i for p in prompts for i in range(1, MAX_TOKENS))
    if mode == "disaggregated":
        assert all(not s["decode"] for s in logs["prefill-0"]) and all(not s["prefill"] for s in logs["decode-0"])


def overlaps(logs: dict[str, list[dict]]) -> int:
    """Pairs of steps of different instances that ran at the same time."""
    steps = sorted((s["start"], s["start"] + s["seconds"], name) for name, rows in logs.items() for s in rows)
    return sum(1 for i, (_, end, name) in enumerate(steps) for start, _, other in steps[i + 1:] if other != name and start < end)


def test_phases_on_shared_cores_take_turns(checkpoints, tmp_path: Path) -> None:
    """`time_share_cores`: a prefill and a decode instance on the same cores never step at the
    same time (without it, this run had ~50 pairs of steps overlap), and still give
    transformers' tokens."""
    prompts = mixed_prompts(24, seed=8)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with LLM(str(checkpoints("llama-gqa")), mode="disaggregated", num_kv_blocks=128, step_log=str(tmp_path),
             time_share_cores=True, prefill={"max_num_seqs": 1}) as engine:
        outputs = engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert all(s.kv_blocks_free == s.kv_blocks_total for s in engine.get_stats())
    logs = read(tmp_path)
    assert len(logs["prefill-0"]) >= len(prompts) // 2 and logs["decode-0"]
    assert overlaps(logs) == 0
    reference = load_reference(checkpoints("llama-gqa"))
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(reference, p, 16) for p in prompts]
