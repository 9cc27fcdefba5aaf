"""The README's Python usage as a plain script, with no `if __name__ == "__main__":` guard,
runs (vLLM's LLM does): the engine's processes never import the user's script."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
from distserve import LLM, SamplingParams

llm = LLM({path!r}, num_kv_blocks=64)
print("colocated", llm.generate([{{"prompt_token_ids": [1, 2, 3]}}], SamplingParams(max_tokens=5, ignore_eos=True))[0].outputs[0].token_ids)
llm.shutdown()
with LLM({path!r}, mode="disaggregated", num_prefill_instances=1, num_decode_instances=1, num_kv_blocks=64) as llm:
    out = llm.generate("The capital of France is", SamplingParams(temperature=0.8, top_p=0.95, max_tokens=6, seed=1, ignore_eos=True))
    print("disaggregated", len(out[0].outputs[0].token_ids), out[0].metrics.transfer_bytes > 0)
"""


@pytest.mark.slow
def test_the_readme_usage_runs_as_a_plain_script(checkpoints, tmp_path) -> None:
    script = tmp_path / "usage.py"
    script.write_text(SCRIPT.format(path=str(checkpoints("llama-gqa"))))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("colocated [") and len(eval(lines[0].split(" ", 1)[1])) == 5
    assert lines[1] == "disaggregated 6 True"
