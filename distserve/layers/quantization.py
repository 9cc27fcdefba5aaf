"""Weight-only quantization: linear weights kept as int8 or int4, activations in float32.

One storage serves every format (kernels/quant_linear.cpp): the integers `q` (int8 [N, K], or
two 4-bit values a byte, uint8 [N, K / 2]) and each group of `group` weights along K its
(scale, min) in float16, so that w = q * scale + min. Per-channel int8 (`--quantization
int8`: one group a row, min 0), groupwise int4 (`--quantization int4`: groups of 32 with a
min), and GGUF's block formats all fit it; GGUF blocks map onto it without loss except that a
K-quant's two-level scale (d * sub-block scale) is rounded once to float16 (relative 2^-11):

| GGUF | q | group | scale, min |
|---|---|---|---|
| Q8_0 | int8 | 32 | d, 0 |
| Q4_0 | 4 bits | 32 | d, -8 d |
| Q4_1 | 4 bits | 32 | d, m |
| Q4_K | 4 bits | 32 | d sc, -dmin m |
| Q5_K | int8 (0..31) | 32 | d sc, -dmin m |
| Q6_K | int8 (-32..31) | 16 | d sc, 0 |

Matmuls of up to QUANT_STREAM_ROWS rows run on the native kernel, which dequantizes each weight
in registers as it streams them (decode reads a quarter to a half of float32's bytes); larger
ones dequantize a tile of output rows at a time into a cached buffer and run float32 GEMMs on
it (compute-bound: each weight is dequantized once a step, not once a row).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from distserve.kernels import cpu_ops, native_ops

METHODS = ("none", "int8", "int4")
INT4_GROUP = 32
# Rows up to which streaming (dequantizing in registers) beats tiles of float32 GEMM.
QUANT_STREAM_ROWS = 16
# Whether streamed matmuls (decode) quantize their activations to int8 in blocks of 32 and
# multiply integers, as llama.cpp does for these formats (about twice as fast as float32
# activations; each activation off by at most half a step of 1/127 of its block's largest):
# `auto` for GGUF weights (what llama.cpp computes on the same file) and float32 activations
# for checkpoints quantized at load (what weight-only int8 / int4 compute in vLLM); `1` or `0`
# for all weights.
INT8_ACTIVATIONS = os.environ.get("DISTSERVE_INT8_ACTIVATIONS", "auto")
if INT8_ACTIVATIONS not in ("auto", "0", "1"):
    raise ValueError(f"DISTSERVE_INT8_ACTIVATIONS={INT8_ACTIVATIONS!r}: use auto, 1 or 0")


def int8_activations(from_gguf: bool) -> bool:
    """The activation policy (INT8_ACTIVATIONS) for weights from a GGUF file or quantized at load."""
    return from_gguf if INT8_ACTIVATIONS == "auto" else INT8_ACTIVATIONS == "1"
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")  # kept quantized; others dequantized at load


@dataclass
class QuantizedWeight:
    """A [rows, cols] weight as integers and float16 (scale, min) per group of `group` columns."""

    q: torch.Tensor  # int8 [rows, cols] (bits 8) or uint8 [rows, cols // 2] (bits 4)
    sm: torch.Tensor  # float16 [rows, cols // group, 2]
    bits: int
    group: int
    int8_activations: bool = False  # decode matmuls round activations to int8 (see INT8_ACTIVATIONS)

    def like(self, q: torch.Tensor, sm: torch.Tensor, bits: int | None = None, group: int | None = None) -> QuantizedWeight:
        """Other storage, the same activation policy."""
        return QuantizedWeight(q, sm, self.bits if bits is None else bits, self.group if group is None else group,
                               self.int8_activations)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.sm.shape[1] * self.group

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.sm.numel() * self.sm.element_size()

    def narrow(self, dim: int, start: int, length: int) -> QuantizedWeight:
        """Rows (dim 0) or whole groups of columns (dim 1) [start, start + length)."""
        if dim == 0:
            return self.like(self.q.narrow(0, start, length), self.sm.narrow(0, start, length))
        if start % self.group or length % self.group:
            raise ValueError(f"columns [{start}, {start + length}) split a quantization group of {self.group}; "
                             "use a tensor parallel size that divides the groups, or --quantization none")
        per_byte = 2 if self.bits == 4 else 1
        return self.like(self.q.narrow(1, start // per_byte, length // per_byte),
                         self.sm.narrow(1, start // self.group, length // self.group))

    def rows(self, index: torch.Tensor) -> QuantizedWeight:
        return self.like(self.q[index], self.sm[index])

    def to(self, device: torch.device) -> QuantizedWeight:
        return self.like(self.q.to(device), self.sm.to(device))

    def compact(self) -> QuantizedWeight:
        """A copy of its own (a shard narrowed from a whole checkpoint tensor would keep all
        of that tensor alive)."""
        return self.like(self.q.clone(memory_format=torch.contiguous_format),
                         self.sm.clone(memory_format=torch.contiguous_format))

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [rows, cols] (of the given rows only, when `rows` is given)."""
        ops = cpu_ops() if self.q.device.type == "cpu" else None
        if ops is not None:
            index = torch.empty(0, dtype=torch.long) if rows is None else rows.contiguous().long()
            return ops.dequantize_rows(self.q, self.sm, self.bits, index)
        part = self if rows is None else self.rows(rows)
        return _values(part).float().view(part.q.shape[0], -1, part.group).mul(part.sm[..., :1].float()).add(
            part.sm[..., 1:].float()).flatten(1)

    def to_int8(self, group: int) -> QuantizedWeight:
        """The same weights as int8 in groups of `group` (a divisor of this group): lossless, for
        merging projections stored in different formats into one matmul."""
        if self.group % group:
            raise ValueError(f"group {group} does not divide {self.group}")
        values = _values(self).to(torch.int8)
        sm = self.sm.repeat_interleave(self.group // group, dim=1)
        return self.like(values.contiguous(), sm.contiguous(), 8, group)


def _values(w: QuantizedWeight) -> torch.Tensor:
    """The integers q as int16 [rows, cols], in column order."""
    if w.bits == 8:
        return w.q.to(torch.int16)
    rows, half = w.q.shape[0], w.group // 2
    q = w.q.view(rows, -1, half).to(torch.int16)
    return torch.cat([q & 0x0F, q >> 4], dim=-1).view(rows, -1)


def pack_int4(values: torch.Tensor, group: int) -> torch.Tensor:
    """uint8 [rows, cols // 2] from integers 0..15 [rows, cols]: within each group, byte j holds
    element j (low nibble) and element j + group / 2 (high)."""
    rows = values.shape[0]
    v = values.to(torch.uint8).view(rows, -1, 2, group // 2)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(rows, -1).contiguous()


def merge(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Row-wise concatenation (the shards of a QKV or gate/up projection); shards of different
    formats meet losslessly as int8 in their smallest group."""
    if len({(p.bits, p.group) for p in parts}) > 1:
        group = math.gcd(*(p.group for p in parts))
        parts = [p.to_int8(group) for p in parts]
    return parts[0].like(torch.cat([p.q for p in parts]), torch.cat([p.sm for p in parts]))


def quantize(weight: torch.Tensor, method: str) -> QuantizedWeight:
    """A float weight quantized: int8 symmetric per output channel, or int4 asymmetric in groups
    of 32 (round to nearest)."""
    w = weight.detach().float()
    rows, cols = w.shape
    if method == "int8":
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        scale = scale.half().float()  # the scale the kernel will use
        q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
        sm = torch.stack([scale, torch.zeros_like(scale)], dim=-1).half()
        return QuantizedWeight(q.contiguous(), sm.contiguous(), 8, cols, int8_activations(False))
    if method == "int4":
        if cols % INT4_GROUP:
            raise ValueError(f"int4 needs input sizes that are multiples of {INT4_GROUP}; this one is {cols}")
        g = w.view(rows, -1, INT4_GROUP)
        lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-12).half().float()
        lo = lo.half().float()
        q = torch.round((g - lo) / scale).clamp(0, 15)
        sm = torch.cat([scale, lo], dim=-1).half()
        return QuantizedWeight(pack_int4(q.view(rows, cols), INT4_GROUP), sm.contiguous(), 4, INT4_GROUP,
                               int8_activations(False))
    raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")


def quant_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b for a quantized W."""
    ops = native_ops(x)
    if ops is not None:
        return ops.quant_linear(x.contiguous(), w.q, w.sm, bias, w.bits, QUANT_STREAM_ROWS, w.int8_activations)
    return F.linear(x, w.dequantize().to(x.device, x.dtype), bias)  # CUDA: the float weight, made each call


def from_gguf(data: np.ndarray, tensor_type: gguf.GGMLQuantizationType, shape: tuple[int, int]) -> QuantizedWeight:
    """A GGUF tensor of one of GGUF_TYPES (raw blocks, [rows, bytes a row]) as a QuantizedWeight,
    without dequantizing it (K-quant scales rounded to float16)."""
    rows, cols = shape
    block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
    blocks = np.ascontiguousarray(data).reshape(rows * cols // block_size, type_size)
    name = tensor_type.name
    f16 = lambda b: b.view(np.float16).astype(np.float32)  # noqa: E731 - two bytes a value
    if name == "Q8_0":
        d, qs = f16(blocks[:, :2]), blocks[:, 2:].view(np.int8)
        scale, minimum, values, group, bits = d, np.zeros_like(d), qs, 32, 8
    elif name in ("Q4_0", "Q4_1"):
        d = f16(blocks[:, :2])
        minimum = -8 * d if name == "Q4_0" else f16(blocks[:, 2:4])
        qs = blocks[:, 2:] if name == "Q4_0" else blocks[:, 4:]
        scale, values, group, bits = d, qs, 32, 4  # already packed as pack_int4 lays it out
    elif name in ("Q4_K", "Q5_K"):
        d, dmin = f16(blocks[:, :2]), f16(blocks[:, 2:4])
        sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
        scale, minimum = d * sc.astype(np.float32), -(dmin * m.astype(np.float32))
        if name == "Q4_K":  # 4 chunks of 32 bytes: low nibbles one sub-block, high the next
            q = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
            values, bits = (q & 0x0F).reshape(-1, 8, 32), 4
        else:
            qh, qs = blocks[:, 16:48], blocks[:, 48:]
            ql = (qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
            high = (qh.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
            values, bits = (ql.reshape(-1, 8, 32) | (high << 4)).astype(np.int8), 8
        group = 32
    elif name == "Q6_K":
        ql, qh, sc, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], f16(blocks[:, 208:210])
        low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        values = (low.reshape(-1, 2, 4, 32) | (high << 4)).astype(np.int8) - 32
        scale = d * sc.view(np.int8).astype(np.float32)
        minimum, group, bits = np.zeros_like(scale), 16, 8
    else:
        raise ValueError(f"GGUF type {name} is not kept quantized; supported: {', '.join(GGUF_TYPES)}")
    groups = cols // group
    sm = np.stack([scale.reshape(rows, groups), minimum.reshape(rows, groups)], axis=-1).astype(np.float16)
    q = torch.from_numpy(np.ascontiguousarray(values).reshape(rows, -1).copy())
    if name == "Q4_K":  # the others' 4-bit bytes are already laid out as pack_int4 lays them
        q = pack_int4(q, group)
    return QuantizedWeight(q.view(torch.uint8) if bits == 4 else q.view(torch.int8), torch.from_numpy(sm), bits, group,
                           int8_activations(True))
