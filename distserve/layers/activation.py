"""Activations: the gated SiLU of LLaMA's MLP, and the pointwise ones of GPT-2 and OPT."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from distserve.kernels import native_ops

# config names computed in one pass (tanh-approximated GELU: GPT-2's `gelu_new` formula,
# which transformers writes out as eight elementwise ops)
POINTWISE = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


class SiluAndMul(nn.Module):
    """silu(gate) * up, for an input holding [gate | up] on its last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = native_ops(x)
        if ops is not None and x.dim() == 2:
            return ops.silu_and_mul(x.contiguous())
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class PointwiseActivation(nn.Module):
    """relu, gelu or tanh-approximated gelu, applied in place: its input is the projection's
    output, which nothing else reads. `kind` names it to the one-call decode layers."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            return x.relu_()
        if self.kind == "gelu":
            return torch._C._nn.gelu_(x)
        ops = native_ops(x)
        if ops is not None and x.is_contiguous():
            return ops.gelu_tanh_(x)
        return torch._C._nn.gelu_(x, approximate="tanh")


def get_activation(name: str) -> nn.Module:
    """The activation a config names (`gelu_new`, `relu`, ...), as transformers computes it."""
    if name in POINTWISE:
        return PointwiseActivation(POINTWISE[name])
    if name not in ACT2FN:
        raise ValueError(f"activation {name!r} is not supported")
    return ACT2FN[name]
