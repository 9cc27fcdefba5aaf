"""A dead instance comes back: kill -9 of the prefill or the decode instance of a 1P+1D engine
while requests are at every stage. Requests that streamed nothing are run again; the others
fail at once with the cause; the instance is started again and serves; nothing leaks (the
module's fixture checks processes and shared memory)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from distserve import LLM, SamplingParams
from tests.engine.test_disaggregated import Outputs, instance_stats, pids
from tests.tiny_models import mixed_prompts

LONG = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)


def state(engine: LLM, name: str) -> str:
    return next(s.state for s in engine.engine.instance_status() if s.name == name)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["prefill-0", "decode-0"])
def test_a_killed_instance_comes_back_and_no_request_hangs(checkpoints, victim: str) -> None:
    with LLM(str(checkpoints("llama-gqa")), mode="disaggregated", num_kv_blocks=128) as engine:
        outputs = Outputs(engine)
        prompts = mixed_prompts(12, seed=4)
        decoding = [outputs.add({"prompt_token_ids": p}, LONG) for p in prompts[:4]]
        outputs.poll_until(lambda: all(outputs.tokens(r) >= 2 for r in decoding))
        before = pids(engine)
        os.kill(before["decode-0"], signal.SIGSTOP)  # prefilled requests now wait for their pull
        migrating = [outputs.add({"prompt_token_ids": p}, LONG) for p in prompts[4:8]]
        outputs.poll_until(lambda: all(outputs.tokens(r) == 1 for r in migrating))
        outputs.poll_until(lambda: instance_stats(engine, "prefill-0").num_awaiting_pull == 4)
        os.kill(before["prefill-0"], signal.SIGSTOP)  # new prompts now wait in its queue
        queued = [outputs.add({"prompt_token_ids": p}, LONG) for p in prompts[8:]]
        killed_at = time.monotonic()
        os.kill(before[victim], signal.SIGKILL)
        # the other instance goes on once the death is known (else a stopped decode instance,
        # let go first, could still pull the dead prefill instance's blocks: still mapped)
        outputs.poll_until(lambda: state(engine, victim) != "running")
        for name in ("prefill-0", "decode-0"):
            if name != victim:
                os.kill(before[name], signal.SIGCONT)

        # what streamed before the death fails at once, with the cause
        doomed = migrating + (decoding if victim == "decode-0" else [])
        outputs.poll_until(lambda: all(outputs.finished(r) for r in doomed), timeout=10)
        assert time.monotonic() - killed_at < 2.0
        assert all(victim in outputs.latest[r].error for r in doomed)
        assert str(engine.engine.health()) in ("degraded", "healthy")
        # the instance is back within its start time, and the rest finish with their output
        outputs.poll_until(lambda: state(engine, victim) == "running", timeout=60)
        assert pids(engine)[victim] != before[victim]
        survivors = queued + (decoding if victim == "prefill-0" else [])
        outputs.poll_until(lambda: all(outputs.finished(r) for r in survivors), timeout=60)
        for r in survivors:
            out = outputs.latest[r]
            assert out.error is None and len(out.outputs[0].token_ids) == LONG.max_tokens
        assert str(engine.engine.health()) == "healthy"
        assert engine.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0].token_ids
        stats = engine.get_stats()
        assert all(s.kv_blocks_free == s.kv_blocks_total for s in stats), stats
        assert next(s.restarts for s in engine.engine.instance_status() if s.name == victim) == 1


@pytest.mark.slow
def test_a_killed_instance_leaves_the_shared_cores_to_the_other(checkpoints) -> None:
    """Phases taking turns on shared cores (`time_share_cores`): kill -9 of the decode
    instance mid-step, while it holds the turn, releases the turn with the process; the
    prefill instance goes on prefilling and the requests sent after finish."""
    with LLM(str(checkpoints("llama-gqa")), mode="disaggregated", num_kv_blocks=128, time_share_cores=True) as engine:
        outputs = Outputs(engine)
        prompts = mixed_prompts(8, seed=6)
        decoding = [outputs.add({"prompt_token_ids": p}, LONG) for p in prompts[:4]]
        outputs.poll_until(lambda: all(outputs.tokens(r) >= 2 for r in decoding))
        os.kill(pids(engine)["decode-0"], signal.SIGKILL)
        outputs.poll_until(lambda: state(engine, "decode-0") != "running")
        later = [outputs.add({"prompt_token_ids": p}, LONG) for p in prompts[4:]]
        outputs.poll_until(lambda: all(outputs.finished(r) for r in decoding + later), timeout=60)
        assert all("decode-0" in outputs.latest[r].error for r in decoding)
        for r in later:
            out = outputs.latest[r]
            assert out.error is None and len(out.outputs[0].token_ids) == LONG.max_tokens
        assert all(s.kv_blocks_free == s.kv_blocks_total for s in engine.get_stats())


@pytest.mark.slow
def test_the_restart_budget_ends_in_unhealthy(checkpoints) -> None:
    with LLM(str(checkpoints("llama-gqa")), mode="colocated", num_kv_blocks=64, max_restarts=1, restart_window=60) as engine:
        os.kill(pids(engine)["colocated-0"], signal.SIGKILL)
        outputs = Outputs(engine)
        outputs.poll_until(lambda: state(engine, "colocated-0") == "running", timeout=60)
        # a request that comes while the instance restarts waits for it; this one comes after
        assert engine.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=3, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0].token_ids
        os.kill(pids(engine)["colocated-0"], signal.SIGKILL)
        outputs.poll_until(lambda: state(engine, "colocated-0") == "down", timeout=10)
        assert str(engine.engine.health()) == "unhealthy" and not engine.engine.is_healthy()
