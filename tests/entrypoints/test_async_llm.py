"""AsyncLLM streams tokens as they are produced; leaving a stream aborts its request."""

from __future__ import annotations

import asyncio
import time

import pytest

from distserve import AsyncLLM, SamplingParams
from tests.tiny_models import mixed_prompts


@pytest.fixture(scope="module")
def engine(checkpoints):
    llm = AsyncLLM(str(checkpoints("llama-gqa")), mode="disaggregated", num_kv_blocks=64)
    yield llm
    llm.shutdown()


def all_free(engine: AsyncLLM) -> bool:
    stats = asyncio.run(engine.get_stats())
    return all(s.kv_blocks_free == s.kv_blocks_total for s in stats)


def test_stream_deltas_add_up_to_the_output(engine) -> None:
    async def run():
        outputs = [o async for o in engine.generate("the café and", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))]
        return outputs

    outputs = asyncio.run(run())
    final = outputs[-1]
    assert final.finished and not any(o.finished for o in outputs[:-1])
    assert len(outputs) > 2
    assert "".join(o.delta_text for o in outputs) == final.outputs[0].text
    assert sum((o.delta_token_ids for o in outputs), []) == final.outputs[0].token_ids
    assert len(final.outputs[0].token_ids) == 20


def test_concurrent_streams(engine) -> None:
    prompts = mixed_prompts(8, seed=30)

    async def one(p: list[int], n: int) -> int:
        last = None
        async for out in engine.generate({"prompt_token_ids": p}, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)):
            last = out
        return len(last.outputs[0].token_ids)

    async def run():
        return await asyncio.gather(*(one(p, 5 + i) for i, p in enumerate(prompts)))

    assert asyncio.run(run()) == [5 + i for i in range(8)]
    assert all_free(engine)


def test_leaving_a_stream_aborts_the_request(engine) -> None:
    async def run():
        seen = 0
        async for _ in engine.generate("the", SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)):
            seen += 1
            if seen == 3:
                break
        await asyncio.sleep(0.3)
        return seen

    assert asyncio.run(run()) == 3
    assert all_free(engine)


def test_explicit_abort_ends_the_stream(engine) -> None:
    async def run():
        outputs = []
        async for out in engine.generate("the", SamplingParams(max_tokens=300, temperature=0, ignore_eos=True), request_id="to-abort"):
            outputs.append(out)
            if len(outputs) == 2:
                await engine.abort("to-abort")
        return outputs

    outputs = asyncio.run(run())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    assert all_free(engine)


def test_a_failing_poll_backs_off_and_recovers(engine) -> None:
    """A persistent error while polling the instances is logged with a growing pause, not in a
    tight loop; once it clears, requests are served again."""
    calls = []
    real_step = engine.engine.step

    def broken(timeout: float):  # noqa: ANN202
        calls.append(timeout)
        raise RuntimeError("the instances' queue is broken")

    engine.engine.step = broken
    try:
        time.sleep(1.0)
    finally:
        engine.engine.step = real_step
    assert 3 <= len(calls) <= 8  # 0.05 + 0.1 + 0.2 + 0.4 s of pauses in the second
    outputs = asyncio.run(_collect(engine, "the", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 4


async def _collect(engine: AsyncLLM, prompt: str, params: SamplingParams) -> list:
    return [o async for o in engine.generate(prompt, params)]
