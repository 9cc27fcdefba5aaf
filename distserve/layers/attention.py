"""Attention over the paged KV cache.

A step's tokens are flattened: first the prefill-like sequences (a whole prompt, a prompt
chunk, or a recomputed sequence: more than one query each), then the decode-like ones (one
query each). Every layer first writes the step's K and V into the cache slots of
`slot_mapping`, then:

- prefill sequences (whole prompts, or chunks after cached context) attend causally over
  their blocks with the native flash-style kernel (kernels/prefill_attention.cpp; a sequence
  of 256 keys or more has its keys copied out head by head first, up to PREFILL_PACK_BYTES at
  a time); on other devices torch's SDPA, over the step's own K/V or the gathered blocks;
- all decodes run as one batch: the native kernel reads their blocks in place; torch's path
  gathers them from the block tables and masks padded key positions.

A step's last layer computes only the rows that are sampled (`AttentionMetadata.output_rows`,
set by the runner when the step has other rows: every prompt token but a prompt's last). The
layer still writes every token's K and V; then each kept row attends as a decode does, over
its sequence's blocks, and the layer's output projection, MLP and residual run on those rows
alone. A prompt of n tokens skips n - 1 rows of all of that: about one layer's work.

The cache of one layer is `[num_blocks, block_size, num_kv_heads, head_dim]` for K and for V.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distserve.kernels import native_ops

# scratch the native prefill kernel may copy a sequence's keys and values into, a group of
# KV heads at a time (16 MiB holds 2,048 tokens of 16 heads of 64)
PREFILL_PACK_BYTES = 64 << 20

@dataclass
class AttentionMetadata:
    """Where a step's tokens go in the paged cache and what each sequence attends to."""

    slot_mapping: torch.Tensor  # [num_tokens] flat slot = block * block_size + offset
    num_prefill_tokens: int
    prefill_query_lens: list[int]
    prefill_seq_lens: list[int]  # context length including this step's tokens
    prefill_query_starts: torch.Tensor  # [num_prefills + 1] where each one's tokens start
    prefill_seq_lens_tensor: torch.Tensor  # [num_prefills]
    prefill_block_table: torch.Tensor  # [num_prefills, max_blocks] (padding: block 0)
    decode_seq_lens: torch.Tensor  # [num_decodes]
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] (padding: block 0)
    block_size: int
    output_rows: OutputRows | None = None  # the rows a step's last layer computes, if not all
    last_layer: bool = False  # this layer computes `output_rows` only
    _decode_mask: torch.Tensor | None = None

    def for_last_layer(self) -> AttentionMetadata:
        """The metadata of the model's last layer: only `output_rows` are computed there."""
        return self if self.output_rows is None else dataclasses.replace(self, last_layer=True)

    def kept(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of `x` (one per token of the step) this layer outputs."""
        return x[self.output_rows.index] if self.last_layer else x

    @property
    def num_decodes(self) -> int:
        return int(self.decode_seq_lens.numel())

    def decode_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[num_decodes, 1, 1, max_blocks * block_size]: 0, or -inf past each sequence's end
        (for the torch path; built once a step, on first use)."""
        if self._decode_mask is None:
            width = self.decode_block_tables.shape[1] * self.block_size
            past = torch.arange(width, device=self.decode_seq_lens.device)[None, :] >= self.decode_seq_lens[:, None]
            mask = torch.zeros(past.shape, dtype=dtype, device=past.device).masked_fill_(past, float("-inf"))
            self._decode_mask = mask[:, None, None, :]
        return self._decode_mask


@dataclass
class OutputRows:
    """Rows of a step to compute in its last layer (the sampled ones, in sampling order), and
    how each attends: as a decode, over its sequence's blocks up to and including itself."""

    index: torch.Tensor  # [R] flat token indices
    attention: AttentionMetadata  # a pure decode step of the R rows


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query attention over one layer's paged cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads * head_dim], k/v: [T, kv_heads * head_dim] -> [T, heads * head_dim]."""
        num_tokens = q.shape[0]
        self._write_cache(k, v, meta)
        if meta.last_layer:
            rows = meta.output_rows
            q = q[rows.index].reshape(-1, self.num_heads, self.head_dim)
            return self._decode(q, rows.attention).view(len(q), -1)
        if not meta.prefill_query_lens:  # a pure decode step
            return self._decode(q.reshape(num_tokens, self.num_heads, self.head_dim), meta).view(num_tokens, -1)
        out = q.new_empty(num_tokens, self.num_heads * self.head_dim)
        prefill = meta.num_prefill_tokens
        ops = native_ops(q)
        if ops is not None and q.stride(-1) == 1:  # flash-style, over the cache the step's K/V are now in
            ops.prefill_attention(q[:prefill], self.k_cache, self.v_cache, meta.prefill_block_table,
                                  meta.prefill_query_starts, meta.prefill_seq_lens_tensor, self.num_heads, self.scale,
                                  out[:prefill], PREFILL_PACK_BYTES)
        else:
            self._prefill_sdpa(q, k, v, meta, out)
        if meta.num_decodes:
            decode_q = q[prefill:].reshape(-1, self.num_heads, self.head_dim)
            out[prefill:] = self._decode(decode_q, meta).view(meta.num_decodes, -1)
        return out

    def _prefill_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                      out: torch.Tensor) -> None:
        """The prefill sequences' attention by torch's SDPA, one sequence at a time."""
        num_tokens = q.shape[0]
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        out = out.view(num_tokens, self.num_heads, self.head_dim)
        flat = (-1, self.num_kv_heads, self.head_dim)
        start = 0
        for i, (query_len, seq_len) in enumerate(zip(meta.prefill_query_lens, meta.prefill_seq_lens)):
            end = start + query_len
            if seq_len == query_len:
                keys, values, mask = k[start:end], v[start:end], None
            else:
                blocks = meta.prefill_block_table[i, : -(-seq_len // meta.block_size)]
                keys = self.k_cache[blocks].view(flat)[:seq_len]
                values = self.v_cache[blocks].view(flat)[:seq_len]
                mask = torch.ones(query_len, seq_len, dtype=torch.bool, device=q.device).tril(
                    seq_len - query_len
                )
            out[start:end] = self._sdpa(q[start:end].unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), mask)[0]
            start = end

    def _write_cache(self, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store the step's K and V in their slots."""
        ops = native_ops(k)
        if ops is not None and k.stride(-1) == 1 and v.stride(-1) == 1:
            ops.reshape_and_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
            return
        flat = (-1, self.num_kv_heads, self.head_dim)
        self.k_cache.view(flat).index_copy_(0, meta.slot_mapping, k.reshape(flat))
        self.v_cache.view(flat).index_copy_(0, meta.slot_mapping, v.reshape(flat))

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        ops = native_ops(q)
        if ops is not None:  # reads the blocks in place instead of gathering them
            return ops.paged_attention_decode(
                q.contiguous(), self.k_cache, self.v_cache, meta.decode_block_tables, meta.decode_seq_lens, self.scale
            )
        batch, max_blocks = meta.decode_block_tables.shape
        max_len = max_blocks * meta.block_size
        keys = self.k_cache[meta.decode_block_tables].view(batch, max_len, self.num_kv_heads, self.head_dim)
        values = self.v_cache[meta.decode_block_tables].view(batch, max_len, self.num_kv_heads, self.head_dim)
        return self._sdpa(q.unsqueeze(1), keys, values, meta.decode_mask(q.dtype))[:, 0]

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """q: [B, Lq, H, D], k/v: [B, Lk, Hkv, D], mask: broadcastable to [B, H, Lq, Lk]
        (None: causal) -> [B, Lq, H, D]."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None and q.shape[1] > 1,
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return out.transpose(1, 2)
