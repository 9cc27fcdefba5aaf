"""GGUF checkpoints load dequantized, with the tokenizer and chat template from the file,
and give the same greedy tokens as transformers loading the same file."""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from distserve.layers import quantization
from distserve.sampling_params import SamplingParams
from distserve.weights.gguf import gguf_hf_config, iterate_gguf_weights, open_gguf
from distserve.weights.source import load_model_config
from tests.tiny_models import hf_greedy, mixed_prompts, perplexity, run_in_process, save_llama_gguf

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_matches_transformers(checkpoints, tmp_path, monkeypatch, qtype: Q) -> None:
    """Exact with float32 activations (DISTSERVE_INT8_ACTIVATIONS=0): transformers' numerics."""
    monkeypatch.setattr(quantization, "INT8_ACTIVATIONS", "0")
    path = save_llama_gguf(checkpoints("llama-gqa"), tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    prompts = mixed_prompts(8)
    expected = [hf_greedy(reference, p, 64) for p in prompts]
    got, instance = run_in_process(path, prompts, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True), num_kv_blocks=128)
    assert got == expected
    assert instance.blocks.num_free_blocks == instance.blocks.num_blocks


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1])
def test_gguf_with_int8_activations_keeps_the_perplexity(checkpoints, tmp_path, monkeypatch, qtype: Q) -> None:
    """The default for GGUF weights rounds decode activations to int8 (llama.cpp's numerics):
    perplexity within 1% of float32 activations, and most greedy tokens the same."""
    path = save_llama_gguf(checkpoints("llama-gqa"), tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    text = mixed_prompts(1, seed=7, lengths=(200,))[0]
    prompts, params = mixed_prompts(8), SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    figures = {}
    for policy in ("auto", "0"):
        monkeypatch.setattr(quantization, "INT8_ACTIVATIONS", policy)
        got, instance = run_in_process(path, prompts, params, num_kv_blocks=128)
        figures[policy] = got, perplexity(instance, text, chunk=8)  # 8 rows a matmul: the int8 path
    (tokens, ppl), (float_tokens, float_ppl) = figures["auto"], figures["0"]
    assert ppl != float_ppl  # the policies differ: int8 activations ran
    assert ppl == pytest.approx(float_ppl, rel=0.01)
    same = [x == y for a, b in zip(tokens, float_tokens) for x, y in zip(a, b)]
    assert sum(same) / len(same) >= 0.5


def test_gguf_config_from_metadata(checkpoints, tmp_path) -> None:
    path = save_llama_gguf(checkpoints("llama-gqa"), tmp_path / "tiny.gguf", Q.F32)
    config = gguf_hf_config(str(path))
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (2, 4, 2)
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.tie_word_embeddings is False


def test_unsupported_gguf_type_is_a_clear_error(checkpoints, tmp_path) -> None:
    path = save_llama_gguf(checkpoints("llama-gqa"), tmp_path / "tiny.gguf", Q.Q8_1)
    with pytest.raises(ValueError, match="Q8_1"):
        run_in_process(path, [[5, 6]], SamplingParams(max_tokens=2), num_kv_blocks=8)


def test_gguf_tokenizer_and_chat_template(checkpoints, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DISTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    path = save_llama_gguf(checkpoints("llama-gqa"), tmp_path / "tiny.gguf", Q.Q8_0)
    from distserve.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(load_model_config(str(path)))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer("the café", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "the café"


def test_workers_read_the_tensor_table_from_the_cache(checkpoints, tmp_path, monkeypatch) -> None:
    """The GGUF's metadata is parsed once per file: later loads (every worker's) map the file
    at the cached offsets and get the same weights."""
    monkeypatch.setenv("DISTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    path = str(save_llama_gguf(checkpoints("llama-gqa"), tmp_path / "tiny.gguf", Q.Q4_1))
    config = gguf_hf_config(path)  # what the controller does first: parses and caches
    first = dict(iterate_gguf_weights(path, config))

    def no_parsing(*args, **kwargs):
        raise AssertionError("the GGUF was parsed again")

    open_gguf.cache_clear()
    monkeypatch.setattr(gguf, "GGUFReader", no_parsing)
    again = dict(iterate_gguf_weights(path, gguf_hf_config(path)))
    assert again.keys() == first.keys() and len(first) == 2 + 9 * 2 + 1  # embed, norm, 9 per layer, lm_head
    assert all(torch.equal(again[name], first[name]) for name in first)
