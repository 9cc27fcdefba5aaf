"""Activations: the gated SiLU of LLaMA's MLP, and transformers' own for the others."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from distserve.kernels import native_ops


class SiluAndMul(nn.Module):
    """silu(gate) * up, for an input holding [gate | up] on its last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = native_ops(x)
        if ops is not None and x.dim() == 2:
            return ops.silu_and_mul(x.contiguous())
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def get_activation(name: str) -> nn.Module:
    """The activation a config names (`gelu_new`, `relu`, ...), as transformers computes it."""
    if name not in ACT2FN:
        raise ValueError(f"activation {name!r} is not supported")
    return ACT2FN[name]
