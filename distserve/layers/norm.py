"""Normalization layers: RMSNorm (LLaMA family) and LayerNorm (GPT-2, OPT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distserve.kernels import native_ops


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like the reference implementation."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = native_ops(x)
        if ops is not None and x.dim() == 2:
            return ops.rms_norm(x.contiguous(), self.weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm; parameters are loaded, not trained."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, elementwise_affine: bool = True) -> None:
        super().__init__(hidden_size, eps=eps, elementwise_affine=elementwise_affine)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
