"""Quantized weights: the kernels against the same weights dequantized in float32, GGUF blocks
mapped without loss, and a quantized engine against the float one (greedy tokens, perplexity)."""

from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch

from distserve.kernels import cpu_ops
from distserve.layers.quantization import QUANT_STREAM_ROWS, QuantizedWeight, from_gguf, merge, quant_linear, quantize
from distserve.sampling_params import SamplingParams
from tests.tiny_models import load_reference, mixed_prompts, perplexity, run_in_process

Q = gguf.GGMLQuantizationType
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


def gguf_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A [rows, cols] tensor in `qtype`'s blocks: quantized by the gguf package where it can,
    else random block bytes with small, finite float16 scales (every bit pattern of the
    integers is a valid block)."""
    rng = np.random.default_rng(seed)
    if qtype not in K_QUANTS:
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block_size * type_size), dtype=np.uint8)
    blocks = data.reshape(-1, type_size)
    scales = (rng.standard_normal((blocks.shape[0], 2)) * 0.01).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        blocks[:, 208:210] = scales[:, :2]
    else:
        blocks[:, 0:4] = scales
    return data


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, *K_QUANTS])
def test_gguf_blocks_map_onto_the_storage(qtype: Q) -> None:
    data = gguf_blocks(qtype, 8, 512)
    reference = gguf.quants.dequantize(data, qtype)
    got = from_gguf(data, qtype, (8, 512)).dequantize().numpy()
    if qtype in K_QUANTS:  # d x sub-block scale rounded once to float16
        np.testing.assert_allclose(got, reference, rtol=2 ** -10, atol=2 ** -10 * np.abs(reference).max())
    else:
        np.testing.assert_array_equal(got, reference)


SOURCES = ["int8", "int4", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]


def weight_of(source: str, rows: int, cols: int) -> QuantizedWeight:
    if source.startswith("int"):
        return quantize(torch.randn(rows, cols), source)
    return from_gguf(gguf_blocks(Q[source], rows, cols), Q[source], (rows, cols))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("rows", [1, 3, 5, QUANT_STREAM_ROWS + 1])
def test_quantized_linear_matches_the_dequantized_weight(source: str, rows: int) -> None:
    torch.manual_seed(0)
    weight = weight_of(source, 96, 512)
    x, bias = torch.randn(rows, 512), torch.randn(96)
    expected = x @ weight.dequantize().T + bias
    got = quant_linear(x, replace(weight, int8_activations=False), bias)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert cpu_ops() is not None  # the native kernel ran, not the torch fallback


def int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernel rounds it: int8 in blocks of 32, scale = block max / 127."""
    blocks = x.view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    q = torch.round(blocks * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
    return (q * (amax / 127)).view_as(x)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("rows", [1, 5, QUANT_STREAM_ROWS])
def test_int8_activations_are_exact_but_for_their_rounding(source: str, rows: int) -> None:
    torch.manual_seed(1)
    cols = 768 if source in {q.name for q in K_QUANTS} else 576  # 576: the last run of four groups cut short
    weight = weight_of(source, 80, cols)
    x = torch.randn(rows, cols) * torch.linspace(0.1, 3, cols)
    got = quant_linear(x, replace(weight, int8_activations=True), None).double()
    w = weight.dequantize().double()
    # the weight's scale meets the rounded activations; its min, the exact activation sums
    minimum = weight.sm[..., 1].double().repeat_interleave(weight.group, dim=1)
    expected = int8_blocks(x).double() @ (w - minimum).T + x.double() @ minimum.T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # against float activations: off by at most half an activation step times |w|
    step = (x.view(rows, -1, 32).abs().amax(dim=-1, keepdim=True) / 127).expand(-1, -1, 32).reshape(rows, cols)
    bound = (step.double() / 2) @ (w - minimum).abs().T
    assert ((got - x.double() @ w.T).abs() <= bound * 1.001 + 1e-4).all()


def test_gguf_weights_round_decode_activations_and_load_time_quantization_does_not() -> None:
    """The default policy: llama.cpp's numerics for a GGUF file, weight-only float32 activations
    (vLLM's) for a checkpoint quantized at load; derived weights keep it."""
    gguf_weight = from_gguf(gguf_blocks(Q.Q4_1, 8, 64), Q.Q4_1, (8, 64))
    assert gguf_weight.int8_activations and gguf_weight.narrow(0, 0, 4).int8_activations
    assert merge([gguf_weight, from_gguf(gguf_blocks(Q.Q8_0, 8, 64), Q.Q8_0, (8, 64))]).int8_activations
    assert not quantize(torch.randn(8, 64), "int4").int8_activations
    assert not quantize(torch.randn(8, 64), "int8").rows(torch.tensor([1, 2])).int8_activations


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantization_error_is_within_half_a_step(method: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q = quantize(w, method)
    step = q.sm[..., 0].float().repeat_interleave(q.group, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    assert q.nbytes <= w.nbytes * (0.26 if method == "int8" else 0.16)  # a quarter, or 4.5 bits a weight + min


def test_merging_shards_of_different_formats_is_lossless() -> None:
    a = from_gguf(gguf_blocks(Q.Q4_K, 32, 256), Q.Q4_K, (32, 256))
    b = from_gguf(gguf_blocks(Q.Q6_K, 16, 256, seed=1), Q.Q6_K, (16, 256))
    merged = merge([a, b])
    assert (merged.bits, merged.group) == (8, 16)
    torch.testing.assert_close(merged.dequantize(), torch.cat([a.dequantize(), b.dequantize()]), rtol=0, atol=0)


def greedy_and_perplexity(path, quantization: str) -> tuple[list[list[int]], float, int]:  # noqa: ANN001
    prompts = mixed_prompts(8)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    got, instance = run_in_process(path, prompts, params, num_kv_blocks=128, quantization=quantization)
    assert instance.blocks.num_free_blocks == instance.blocks.num_blocks
    text = mixed_prompts(1, seed=7, lengths=(200,))[0]
    return got, perplexity(instance, text), instance.stats.weight_bytes


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for p, q in zip(a, b) for x, y in zip(p, q)]
    return sum(x == y for x, y in pairs) / len(pairs)


def test_int8_engine_against_the_float_engine(checkpoints) -> None:
    path = checkpoints("llama-gqa")
    float_tokens, float_ppl, float_bytes = greedy_and_perplexity(path, "none")
    tokens, ppl, weight_bytes = greedy_and_perplexity(path, "int8")
    assert agreement(tokens, float_tokens) >= 0.9
    assert ppl == pytest.approx(float_ppl, rel=0.01)
    assert weight_bytes < 0.6 * float_bytes  # linears at a quarter; embeddings and head stay float


def test_int4_engine_against_its_dequantized_float_model(checkpoints, tmp_path) -> None:
    """int4 at load computes what float32 computes on the same weights dequantized."""
    path = checkpoints("llama-gqa")
    model = load_reference(path)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(quantize(module.weight, "int4").dequantize())
    model.save_pretrained(tmp_path)
    float_tokens, float_ppl, _ = greedy_and_perplexity(tmp_path, "none")
    tokens, ppl, _ = greedy_and_perplexity(path, "int4")
    assert agreement(tokens, float_tokens) >= 0.9
    assert ppl == pytest.approx(float_ppl, rel=0.01)


def test_quantization_is_a_clear_error_when_unknown(checkpoints) -> None:
    with pytest.raises(ValueError, match="quantization must be one of"):
        run_in_process(checkpoints("llama-gqa"), [[5, 6]], SamplingParams(max_tokens=2), quantization="fp8")


@pytest.mark.parametrize("prefill, decode", [("int4", "int4"), ("none", "int4"), ("int8", "none")])
def test_disaggregated_with_quantized_phases(checkpoints, prefill: str, decode: str) -> None:
    """Either phase, or both, quantized: with the same weights on both, disaggregated gives
    colocated's tokens; with different ones, every request still completes and frees its
    blocks, and the quantized phase holds fewer weight bytes."""
    from distserve import LLM

    path = str(checkpoints("llama-gqa"))
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(6, seed=3)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with LLM(path, mode="colocated", quantization=decode, num_kv_blocks=64) as engine:
        colocated = [o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    with LLM(path, mode="disaggregated", num_kv_blocks=64, prefill={"quantization": prefill},
             decode={"quantization": decode}) as engine:
        got = [o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
        stats = {s.role: s for s in engine.get_stats()}
    assert all(s.kv_blocks_free == s.kv_blocks_total for s in stats.values())
    assert [len(g) for g in got] == [16] * len(prompts)
    if prefill == decode:
        assert agreement(got, colocated) >= 0.9
        assert stats["prefill"].weight_bytes == stats["decode"].weight_bytes
    else:
        quantized, plain = ("prefill", "decode") if decode == "none" else ("decode", "prefill")
        assert stats[quantized].weight_bytes < stats[plain].weight_bytes


def test_tensor_parallel_shards_quantized_weights(checkpoints) -> None:
    """int4 groups never straddle a shard boundary: TP 2 computes what TP 1 does."""
    path = checkpoints("llama-gqa")
    prompts = mixed_prompts(6, seed=4)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    one, _ = run_in_process(path, prompts, params, num_kv_blocks=64, quantization="int4")
    from distserve import LLM

    with LLM(str(path), mode="colocated", quantization="int4", tensor_parallel_size=2, num_kv_blocks=64) as engine:
        two = [o.outputs[0].token_ids for o in engine.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                                 use_tqdm=False)]
    assert agreement(two, one) >= 0.95
