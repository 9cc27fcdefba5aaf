"""Rotary position embedding (neox / Hugging Face layout), with transformers' RoPE scalings.

Inverse frequencies come from transformers' `ROPE_INIT_FUNCTIONS` (linear, llama3, yarn, ...),
so scaled RoPE matches the reference exactly; cos/sin are precomputed for every position.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from distserve.kernels import native_ops


def rope_parameters(config: PretrainedConfig) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params is None:
        raise ValueError("the model config has no rope parameters")
    return params


class RotaryEmbedding(nn.Module):
    def __init__(self, config: PretrainedConfig, head_dim: int, max_position: int) -> None:
        super().__init__()
        params = rope_parameters(config)
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
            scaling = 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS and rope_type != "dynamic":
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        else:
            raise ValueError(f"rope_type {rope_type!r} is not supported")
        positions = torch.arange(max_position, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for a step's positions ([T, 1, head_dim]); looked up once per step."""
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return (cos, sin) if cos.dtype == dtype else (cos.to(dtype), sin.to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [T, heads, head_dim] (Q and K heads side by side are rotated in one go)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rotate_qkv(
    qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], q_size: int, kv_size: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K (rotated) and V out of a fused QKV projection [T, q_size + 2 * kv_size]."""
    ops = native_ops(qkv)
    cos, sin = rope
    if ops is not None:  # in place, on the Q and K heads of each row
        ops.rotary_embedding(qkv, cos.view(cos.shape[0], -1), sin.view(sin.shape[0], -1), (q_size + kv_size) // head_dim, head_dim)
        return qkv.split([q_size, kv_size, kv_size], dim=-1)
    qk = apply_rotary(qkv[:, : q_size + kv_size].view(qkv.shape[0], -1, head_dim), cos, sin).flatten(1)
    return qk[:, :q_size], qk[:, q_size:], qkv[:, q_size + kv_size :]
