"""The built-in model (SmolLM2-135M-Instruct from its GGUF) answers correctly, disaggregated,
with transformers' exact greedy tokens."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from distserve import LLM, SamplingParams
from distserve.weights.source import builtin_model_path
from tests.tiny_models import hf_greedy

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_builtin_model_answers_paris_like_transformers() -> None:
    with LLM(mode="disaggregated") as llm:
        out = llm.chat(QUESTION, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
        assert all(s.kv_blocks_free == s.kv_blocks_total for s in llm.get_stats())
    completion = out.outputs[0]
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"
    path = builtin_model_path()
    reference = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    expected = hf_greedy(reference, out.prompt_token_ids, len(completion.token_ids))
    assert completion.token_ids == expected
