"""Greedy tokens from the screened LM head are the exact logits' argmax: the screen's error
bound holds on oneDNN's bfloat16 matmul, near ties are settled by the exact recompute, and a
row the screen cannot settle is left to the full head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distserve import kernels
from distserve.layers import embedding
from distserve.layers.embedding import ParallelLMHead, screen_error
from distserve.sampling_params import SamplingParams
from tests.tiny_models import hf_greedy, load_reference, mixed_prompts, run_in_process

ops = kernels.cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="no C++ compiler to build the native kernels")
bf16_linear = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                 reason="oneDNN has no bfloat16 matmul on this CPU")


def hazards(vocab: int, k: int, g: torch.Generator) -> torch.Tensor:
    """A head whose rows make screening hard: exact duplicates (a tie: the first must win),
    rows a bfloat16 rounding apart, and rows of very different norms."""
    w = torch.randn(vocab, k, generator=g) * 0.05
    w[vocab // 2 :: 7] *= 8.0
    w[0] *= 20.0
    w[1] = w[0]
    w[2] *= 20.0
    w[3] = w[2] + 1e-6 * torch.randn(k, generator=g)
    return w


def exact_argmax(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    z = x.double() @ w.double().t()
    return (z if bias is None else z + bias.double()).argmax(-1)


@pytest.mark.parametrize("with_bias", [False, True])
def test_screened_argmax_is_the_exact_argmax(with_bias: bool) -> None:
    g = torch.Generator().manual_seed(7)
    vocab, k = 3001, 96
    w = hazards(vocab, k, g)
    bias = torch.randn(vocab, generator=g) * 0.1 if with_bias else None
    x = torch.randn(40, k, generator=g)
    x[:8] = w[torch.tensor([0, 1, 2, 3, 0, 2, 5, 6])] * 20.0  # rows that point at the tied and near-tied tokens
    x[8:12, 5] = 300.0  # an outlier dimension, as trained models' hidden states have
    s = F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16))
    norms = torch.linalg.vector_norm(w, dim=1, dtype=torch.float64).mul(1 + 1e-6).float()
    got = ops.screened_argmax(x, s, w, norms, bias, screen_error(k), 256)
    assert (got >= 0).all(), "every row should be settled with 256 candidates"
    assert torch.equal(got, exact_argmax(x, w, bias))
    assert got[0] == 0 and got[4] == 0  # the duplicate row loses the tie


def test_rows_the_screen_cannot_settle_are_left_to_the_full_head() -> None:
    g = torch.Generator().manual_seed(8)
    vocab, k = 500, 64
    w = torch.randn(vocab, k, generator=g)
    w[:100] = w[0]  # a hundred tokens the screen cannot tell apart
    x = torch.randn(4, k, generator=g)
    x[0] = w[0] * 5.0
    x[2, 3] = float("nan")
    s = F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16))
    s[3, 17] = float("inf")
    norms = torch.linalg.vector_norm(w, dim=1).mul(1 + 1e-6)
    got = ops.screened_argmax(x, s, w, norms, None, screen_error(k), 64).tolist()
    assert got[0] == -1  # more candidates than the cap
    assert got[1] == int(exact_argmax(x[1:2], w))
    assert got[2] == -1 and got[3] == -1  # not finite


@bf16_linear
@pytest.mark.parametrize("rows", [1, 5, 64, 130])
def test_the_head_screens_within_its_bound_and_gives_the_float32_tokens(monkeypatch, rows: int) -> None:
    monkeypatch.setattr(embedding, "bf16_matmul_fast", lambda: True)
    g = torch.Generator().manual_seed(rows)
    vocab, k = 4099, 576
    head = ParallelLMHead(vocab, k)
    head.weight.data.copy_(hazards(vocab, k, g))
    head.prepack(keep_plain=True)
    assert head.screen is not None
    x = torch.randn(rows, k, generator=g) * 3.0
    x[:, 7] *= 100.0
    if rows > 4:
        x[:4] = head.weight[torch.tensor([0, 1, 2, 3])] * 50.0
    s = head.screened_logits(x).double()
    z = x.double() @ head.weight.double().t()
    bound = screen_error(k) * x.double().norm(dim=1, keepdim=True) * head.row_norms.double()
    assert ((s - z).abs() <= bound).all(), "oneDNN's bfloat16 matmul is off by more than the screen allows"
    tokens = head.greedy_tokens(x)
    assert torch.equal(tokens, exact_argmax(x, head.weight))
    # the float32 head's token, where it differs, is one whose exact logit is within float32
    # rounding of the largest (tokens 2 and 3 are 1e-6 apart)
    full = head.compute_logits(x).argmax(-1).view(-1, 1)
    gap = z.gather(1, tokens.view(-1, 1)) - z.gather(1, full)
    assert (gap.abs() <= 1e-6 * z.abs().amax(dim=1, keepdim=True)).all()


@bf16_linear
@pytest.mark.parametrize("variant", ["llama-gqa", "opt", "gpt2"])
def test_screened_engine_gives_transformers_greedy_tokens(checkpoints, monkeypatch, variant: str) -> None:
    monkeypatch.setattr(embedding, "bf16_matmul_fast", lambda: True)
    screened = []
    original = ParallelLMHead.greedy_tokens
    monkeypatch.setattr(ParallelLMHead, "greedy_tokens",
                        lambda self, x: screened.append(len(x)) or original(self, x))
    prompts = mixed_prompts(6, seed=3)
    outputs, instance = run_in_process(checkpoints(variant), prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                                      num_kv_blocks=128)
    reference = load_reference(checkpoints(variant))
    assert outputs == [hf_greedy(reference, p, 12) for p in prompts]
    assert sum(screened) == 6 * 12, "every token should come through the screened head"
    assert instance.blocks.num_free_blocks == instance.blocks.num_blocks
