"""The native CPU kernels agree with the torch computations they replace, and the engine
gives transformers' tokens with or without them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distserve import kernels
from distserve.layers.linear import pack_panels
from distserve.layers.rotary import apply_rotary
from distserve.sampling_params import SamplingParams
from tests.tiny_models import hf_greedy, load_reference, mixed_prompts, run_in_process

ops = kernels.cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="no C++ compiler to build the native kernels")


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 64), (9, 3, 64), (8, 1, 128), (6, 2, 40), (4, 2, 80), (2, 1, 36)])
@pytest.mark.parametrize("bs", [16, 12])
def test_paged_attention_decode(heads: int, kv_heads: int, head_dim: int, bs: int) -> None:
    g = torch.Generator().manual_seed(heads + head_dim)
    num_blocks, batch = 96, 6
    cache = torch.randn(3, 2, num_blocks, bs, kv_heads, head_dim, generator=g)  # strided per-layer views
    k, v = cache[1, 0], cache[1, 1]
    lens = torch.tensor([1, 15, 16, 17, 90, 200])  # within a block, across blocks, across softmax chunks
    width = int((lens.max() + bs - 1) // bs)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in range(batch)])
    q = torch.randn(batch, heads, head_dim, generator=g)
    keys = k[tables].view(batch, width * bs, kv_heads, head_dim).transpose(1, 2)
    values = v[tables].view(batch, width * bs, kv_heads, head_dim).transpose(1, 2)
    mask = (torch.arange(width * bs)[None, :] < lens[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=0.3, enable_gqa=True)
    got = ops.paged_attention_decode(q, k, v, tables, lens, 0.3)
    torch.testing.assert_close(got, expected.squeeze(2), atol=2e-6, rtol=1e-5)
    # a batch splits over threads by sequence, a single sequence by head: the same numbers
    for b in range(batch):
        alone = ops.paged_attention_decode(q[b : b + 1], k, v, tables[b : b + 1], lens[b : b + 1], 0.3)
        assert torch.equal(alone[0], got[b])


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(12, 4, 64), (4, 4, 64), (8, 1, 128), (6, 2, 40), (7, 7, 80)])
def test_prefill_attention(heads: int, kv_heads: int, head_dim: int) -> None:
    """Whole prompts and chunks after cached context, in one call, against causal SDPA over
    the same keys; q strided as a view of the QKV projection, out a slice of a larger one. The
    sequences of 256 keys and more have their keys copied out first, all KV heads at once or
    one at a time (as the scratch allows), or are read in place: the same numbers each way."""
    g = torch.Generator().manual_seed(heads * head_dim)
    bs, num_blocks = 16, 100
    cache = torch.randn(2, num_blocks, bs, kv_heads, head_dim, generator=g)
    k, v = cache[0], cache[1]
    specs = [(37, 37), (64, 200), (1, 50), (130, 130), (100, 300), (300, 300), (2, 257)]  # (new tokens, context with them)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // bs) for _, n in specs)
    tables, starts, expected, used = [], [0], [], 0
    qkv = torch.randn(sum(q for q, _ in specs), heads * head_dim + 2 * kv_heads * head_dim, generator=g)
    q = qkv[:, : heads * head_dim]
    for query_len, seq_len in specs:
        blocks = perm[used : used + -(-seq_len // bs)]
        used += len(blocks)
        tables.append(blocks + [0] * (width - len(blocks)))
        rows = q[starts[-1] : starts[-1] + query_len].reshape(query_len, heads, head_dim)
        keys = k[blocks].reshape(-1, kv_heads, head_dim)[:seq_len]
        values = v[blocks].reshape(-1, kv_heads, head_dim)[:seq_len]
        mask = torch.ones(query_len, seq_len, dtype=torch.bool).tril(seq_len - query_len)
        out = F.scaled_dot_product_attention(rows.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                             attn_mask=mask, scale=0.2, enable_gqa=True)
        expected.append(out.transpose(0, 1).reshape(query_len, -1))
        starts.append(starts[-1] + query_len)
    one_head = 2 * 300 * head_dim * 4  # the longest sequence's keys and values of one KV head
    outs = []
    for pack_bytes in (0, one_head, kv_heads * one_head):
        out = torch.zeros(starts[-1] + 3, heads * head_dim)
        ops.prefill_attention(q, k, v, torch.tensor(tables), torch.tensor(starts), torch.tensor([n for _, n in specs]),
                              heads, 0.2, out[: starts[-1]], pack_bytes)
        torch.testing.assert_close(out[: starts[-1]], torch.cat(expected), atol=2e-6, rtol=1e-5)
        assert not out[starts[-1] :].any()
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("k_dim", [576, 37])
def test_linear_small_batch(rows: int, k_dim: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, k_dim, generator=g), torch.randn(43, k_dim, generator=g), torch.randn(43, generator=g)
    torch.testing.assert_close(ops.linear_small_batch(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ops.linear_small_batch(x, w, None), F.linear(x, w), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 8, 13, 97])
@pytest.mark.parametrize("k_dim, n_dim", [(576, 96), (1000, 101), (37, 5)])
def test_panel_linear(rows: int, k_dim: int, n_dim: int) -> None:
    """The panel kernel: whole and part panels (N past a multiple of 48), several slices of k
    (K past 384), row counts past a micro-kernel (8) and a task's chunk (96)."""
    g = torch.Generator().manual_seed(rows + k_dim)
    x, w, b = torch.randn(rows, k_dim, generator=g), torch.randn(n_dim, k_dim, generator=g), torch.randn(n_dim, generator=g)
    panels = ops.pack_panels(w)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "avx512f" not in cpuinfo.read_text():
        # without AVX-512 no panels are built, and layers keep the plain weight for small batches
        assert not panels.numel() and pack_panels(w) is None
        return
    assert panels.shape == ((n_dim + 47) // 48, k_dim, 48)
    torch.testing.assert_close(ops.panel_linear(x, panels, n_dim, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ops.panel_linear(x, panels, n_dim, None), F.linear(x, w), atol=1e-4, rtol=1e-5)
    with pytest.raises(RuntimeError, match="panels"):
        ops.panel_linear(x, panels, n_dim + 48, None)


def test_elementwise_ops() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 96, generator=g), torch.randn(96, generator=g)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (96,), w, 1e-5))
    gate_up = torch.randn(7, 2 * 69, generator=g) * 30  # vector body and scalar tail; exp near its limits
    gate_up[0, :8] = torch.tensor([-100.0, -88.0, -87.0, -20.0, 0.0, 20.0, 88.0, 100.0])
    gate, up = gate_up.chunk(2, -1)
    torch.testing.assert_close(ops.silu_and_mul(gate_up), F.silu(gate) * up)


def test_argmax_rows() -> None:
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 49152), (5, 1001), (2, 7)]:
        x = torch.randn(*shape, generator=g)
        assert torch.equal(ops.argmax_rows(x), x.argmax(-1))
    x = torch.zeros(3, 40)
    x[0, [5, 30]] = 1.0  # ties: the first
    x[1, [3, 20]] = torch.tensor([5.0, float("nan")])  # a NaN is the largest
    x[2, 39] = float("nan")
    assert ops.argmax_rows(x).tolist() == x.argmax(-1).tolist() == [5, 20, 39]
    assert ops.argmax_rows(x[:, :33]).tolist() == [5, 20, 0]  # row views with a longer stride


@pytest.mark.parametrize("variant, count, stream_rows", [("llama-bias", 6, None), ("qwen2", 6, None), ("llama-gqa", 20, None),
                                                        ("llama-gqa", 20, 8), ("opt", 20, None), ("opt", 6, 4), ("gpt2", 6, None),
                                                        ("opt-post-ln-proj", 6, None)])
def test_fused_decode_layer_gives_the_layer_by_layer_tokens(checkpoints, monkeypatch, variant: str, count: int,
                                                            stream_rows: int | None) -> None:
    """Decode steps run each LLaMA, OPT (pre-LN or post-LN) or GPT-2 layer as one native call; it gives the layer-by-layer
    path's tokens (and so transformers'), also past the 8 rows where layer by layer switches its
    matmuls to oneDNN, and with the call's own matmuls on oneDNN past `stream_rows`."""
    from distserve.layers import linear
    from distserve.models import gpt2, llama, opt
    from distserve.models.base import CausalLM

    layer = gpt2.GPT2Block if variant == "gpt2" else opt.OPTDecoderLayer if variant.startswith("opt") else llama.LlamaDecoderLayer
    if stream_rows is not None:  # the kept weight's kernel up to stream_rows, oneDNN past them
        monkeypatch.setattr(linear, "PANEL_ROWS", stream_rows)
        monkeypatch.setattr(linear, "SMALL_BATCH", stream_rows)
    path = checkpoints(variant)
    prompts = mixed_prompts(count)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    rows = []
    fused = layer.decode_fused

    def counted(self, ops, *args):  # noqa: ANN001, ANN002, ANN202 - (cos, sin,) x, meta
        rows.append(len(args[-2]))
        return fused(self, ops, *args)

    monkeypatch.setattr(layer, "decode_fused", counted)
    got, _ = run_in_process(path, prompts, params, num_kv_blocks=128)
    assert rows, "the fused path never ran"
    assert max(rows) == count  # every sequence decoding in one fused step
    monkeypatch.setattr(CausalLM, "fused_decode_layers", lambda self, x, meta: None)
    unfused, _ = run_in_process(path, prompts, params, num_kv_blocks=128)
    assert got == unfused == [hf_greedy(load_reference(path), p, 24) for p in prompts]


def test_rotary_in_place_on_fused_qkv() -> None:
    g = torch.Generator().manual_seed(1)
    tokens, q_heads, kv_heads, d = 5, 4, 2, 16
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * d, generator=g)
    angles = torch.randn(tokens, d // 2, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    expected = apply_rotary(qkv[:, : (q_heads + kv_heads) * d].view(tokens, -1, d), cos[:, None], sin[:, None]).flatten(1)
    untouched = qkv[:, (q_heads + kv_heads) * d :].clone()
    ops.rotary_embedding(qkv, cos, sin, q_heads + kv_heads, d)
    torch.testing.assert_close(qkv[:, : (q_heads + kv_heads) * d], expected)
    assert torch.equal(qkv[:, (q_heads + kv_heads) * d :], untouched)


def test_reshape_and_cache() -> None:
    g = torch.Generator().manual_seed(2)
    cache = torch.zeros(2, 2, 8, 4, 3, 8)
    kv = torch.randn(5, 2 * 24, generator=g)  # K and V side by side, as split from a fused QKV
    k, v = kv[:, :24], kv[:, 24:]
    slots = torch.tensor([0, 5, 6, 31, 17])
    ops.reshape_and_cache(k, v, cache[1, 0], cache[1, 1], slots)
    assert torch.equal(cache[1, 0].reshape(-1, 24)[slots], k) and torch.equal(cache[1, 1].reshape(-1, 24)[slots], v)
    assert cache[0].abs().sum() == 0


def test_torch_fallback_gives_the_same_tokens(checkpoints, monkeypatch) -> None:
    path = checkpoints("llama-gqa")
    prompts = mixed_prompts(4)
    expected = [hf_greedy(load_reference(path), p, 24) for p in prompts]
    monkeypatch.setattr(kernels, "cpu_ops", lambda: None)
    got, _ = run_in_process(path, prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), num_kv_blocks=64)
    assert got == expected


def test_a_build_killed_midway_does_not_block_the_next(tmp_path: Path) -> None:
    """torch's lock file, left by a builder killed mid-build, is removed by the next builder,
    which holds an flock that excludes any other meanwhile."""
    import fcntl

    from distserve.kernels import _build_lock

    (tmp_path / "lock").touch()  # what a killed builder leaves
    with _build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
        with open(tmp_path / "build.flock") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "build.flock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the builder is done
