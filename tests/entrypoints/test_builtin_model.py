"""The built-in model (SmolLM2-135M-Instruct from its GGUF, its matrices kept quantized) answers
correctly, disaggregated, with transformers' exact greedy tokens, at the file's weight bytes."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distserve import LLM, SamplingParams
from distserve.weights.gguf import gguf_tokenizer_dir
from distserve.weights.source import builtin_model_path
from tests.tiny_models import hf_greedy, perplexity, run_in_process

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PARAGRAPH = (
    "The city of Paris is the capital and largest city of France. It is located on the river Seine, in the north "
    "of the country. Paris is known for its museums and monuments, among them the Louvre, the Eiffel Tower and "
    "the cathedral of Notre-Dame. Millions of people visit the city every year, and many more live in the region "
    "around it, which is one of the largest economic centres in Europe."
)


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


@pytest.mark.slow
def test_builtin_model_kept_quantized() -> None:
    """The GGUF's Q4_1 / Q8_0 matrices stay quantized: the weights take about the file's
    tensor bytes, and perplexity on a paragraph is that of the dequantized float32 engine."""
    import gguf

    path = builtin_model_path()
    tensor_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    tokenizer = AutoTokenizer.from_pretrained(gguf_tokenizer_dir(path))
    text = tokenizer(PARAGRAPH, add_special_tokens=False)["input_ids"]
    figures = {}
    for quantization in ("auto", "none"):
        _, instance = run_in_process(path, [text[:8]], SamplingParams(max_tokens=1), num_kv_blocks=64,
                                     quantization=quantization)
        # in chunks of 8 tokens: the decode path (int8 activations for the kept-quantized file)
        figures[quantization] = perplexity(instance, text, chunk=8), instance.stats.weight_bytes
    (quantized_ppl, quantized_bytes), (float_ppl, float_bytes) = figures["auto"], figures["none"]
    assert quantized_bytes == pytest.approx(tensor_bytes, rel=0.1)
    assert float_bytes > 4 * quantized_bytes
    assert quantized_ppl == pytest.approx(float_ppl, rel=0.01)
    assert quantized_ppl < 40  # a trained model on English text
