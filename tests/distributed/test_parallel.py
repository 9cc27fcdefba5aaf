"""Tensor and pipeline parallel instances (gloo, worker processes on this machine): the same
greedy tokens as transformers for every architecture, alone and disaggregated across
different layouts, with each decode worker pulling only the KV shards it holds."""

from __future__ import annotations

import pytest

from distserve import LLM, SamplingParams
from distserve.engine.model_runner import micro_batches
from distserve.engine.scheduler import ScheduledBatch
from tests.tiny_models import hf_greedy, load_reference, mixed_prompts

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
ARCHS = ["gpt2", "opt-post-ln-proj", "llama-gqa", "llama-mqa", "qwen2"]


def generate(path, prompts: list[list[int]], **kw) -> tuple[list[list[int]], list, list]:
    with LLM(str(path), num_kv_blocks=96, **kw) as engine:
        outputs = engine.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        stats = engine.get_stats()
    assert all(s.kv_blocks_free == s.kv_blocks_total for s in stats)
    return [o.outputs[0].token_ids for o in outputs], outputs, stats


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)], ids=["tp2", "pp2"])
def test_tp_and_pp_give_transformers_tokens(checkpoints, arch: str, layout: dict) -> None:
    prompts = mixed_prompts(6, seed=5)
    reference = load_reference(checkpoints(arch))
    tokens, _, _ = generate(checkpoints(arch), prompts, **layout)
    assert tokens == [hf_greedy(reference, p, 16) for p in prompts]


@pytest.mark.slow
def test_tp2_pp2_instance(checkpoints) -> None:
    prompts = mixed_prompts(6, seed=6)
    reference = load_reference(checkpoints("llama-gqa"))
    tokens, _, _ = generate(checkpoints("llama-gqa"), prompts, tensor_parallel_size=2, pipeline_parallel_size=2)
    assert tokens == [hf_greedy(reference, p, 16) for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize(
    "prefill,decode",
    [
        (dict(tensor_parallel_size=2), dict()),
        (dict(), dict(pipeline_parallel_size=2)),
        (dict(pipeline_parallel_size=2), dict(tensor_parallel_size=2)),
    ],
    ids=["P-tp2_D-tp1", "P-tp1_D-pp2", "P-pp2_D-tp2"],
)
def test_disaggregated_across_layouts(checkpoints, prefill: dict, decode: dict) -> None:
    path = checkpoints("llama-gqa")  # 2 KV heads: TP 2 splits them
    prompts = mixed_prompts(8, seed=7)
    colocated, _, _ = generate(path, prompts)
    tokens, outputs, stats = generate(path, prompts, mode="disaggregated", prefill=prefill, decode=decode)
    assert tokens == colocated
    # each decode worker pulls only its layers and heads: together, the request's KV once
    cfg = load_reference(path).config
    per_block = 2 * cfg.num_hidden_layers * 16 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    for out, prompt in zip(outputs, prompts):
        assert out.metrics.transfer_bytes == -(-len(prompt) // 16) * per_block
    assert sum(s.num_transfers for s in stats if s.role == "decode") == len(prompts)


def test_micro_batches_split_by_tokens() -> None:
    batch = ScheduledBatch([object()] * 5, [1, 1, 1, 1, 1])  # type: ignore[list-item]
    assert micro_batches(batch, 2) == [[0, 1, 2], [3, 4]]
    assert micro_batches(batch, 1) == [[0, 1, 2, 3, 4]]
    assert micro_batches(ScheduledBatch([object()] * 2, [1, 1]), 4) == [[0], [1]]  # type: ignore[list-item]
    assert micro_batches(ScheduledBatch([object()] * 3, [100, 1, 1]), 2) == [[0], [1, 2]]  # type: ignore[list-item]


@pytest.mark.slow
@pytest.mark.parametrize("prefill,decode", [(dict(), dict()), (dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2))],
                         ids=["1P1D", "P-tp2_D-pp2"])
def test_torch_distributed_transport_without_shared_memory(checkpoints, prefill: dict, decode: dict) -> None:
    """Prefill and decode as if on two machines: no shared memory between them, the KV moves
    over the deployment's torch.distributed (gloo) transfer group."""
    import os

    path = checkpoints("llama-gqa")
    prompts = mixed_prompts(8, seed=9)
    colocated, _, _ = generate(path, prompts)
    with LLM(str(path), mode="disaggregated", num_kv_blocks=96, kv_transport="torch", prefill=prefill, decode=decode) as engine:
        assert not [f for f in os.listdir("/dev/shm") if f.startswith("ds-")], "a KV cache was placed in shared memory"
        outputs = engine.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        stats = engine.get_stats()
    assert [o.outputs[0].token_ids for o in outputs] == colocated
    assert all(s.kv_blocks_free == s.kv_blocks_total for s in stats)
    assert {o.metrics.transfer_transport for o in outputs} == {"torch"}
    cfg = load_reference(path).config
    per_block = 2 * cfg.num_hidden_layers * 16 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    for out, prompt in zip(outputs, prompts):
        assert out.metrics.transfer_bytes == -(-len(prompt) // 16) * per_block
