"""Linear layers that shard over tensor parallelism (Megatron-style, vLLM's names).

- `ColumnParallelLinear`: output features split across ranks (no communication).
- `MergedColumnParallelLinear`: several column-parallel projections in one matmul (gate+up).
- `QKVParallelLinear`: Q, K and V in one matmul; KV heads are replicated when the TP size
  exceeds them.
- `RowParallelLinear`: input features split; the partial outputs are all-reduced.
- `ReplicatedLinear`: every rank holds all of it.

Each parameter carries a `weight_loader(param, loaded, shard_id)` that copies its own shard
out of a full checkpoint tensor, so models never compute shard offsets themselves. A
checkpoint tensor kept quantized (a GGUF block format, layers/quantization.py) is sharded the
same way and stays quantized; `prepack` merges its shards, or quantizes a float weight when
`--quantization int8|int4` asks for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distserve.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from distserve.kernels import native_ops
from distserve.layers.quantization import QuantizedWeight, merge, quant_linear, quantize
from distserve.weights.loader import LoadedWeight, materialize, narrow

# Batch size oneDNN lays a packed weight out for; it serves every batch size.
_PACK_BATCH_HINT = 32
# Up to this many rows, distserve's panel kernel (kernels/panel_linear.cpp, AVX-512) beats
# oneDNN's packed weight: with cold weights, as a decode step reads them, 1.3-1.8x as fast at
# 1-16 rows, 1.03-1.16x at 64-96, 1.01-1.07x at 128 (benchmarks/small_batch_linear.py).
PANEL_ROWS = 128
# Without AVX-512, up to this many rows a streaming kernel over the plain weight beats
# oneDNN's packed one: 1.2-1.8x as fast at 1-2 rows, about even at 3, slower from 4.
SMALL_BATCH = 3
# Decode steps of up to this many sequences (the default max_num_seqs) run a LLaMA-family
# layer as one native call: against layer by layer, interleaved in one process
# (benchmarks/decode_step.py), 8-29% faster a step at 1-32 sequences and 5-11% at 48-128.
FUSED_DECODE_BATCH = 256


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in oneDNN's blocked layout, when that is the faster path (fp32 on CPU).

    MKL's GEMM runs small-batch (decode) matmuls at well under memory bandwidth on this
    class of CPU; oneDNN's prepacked linear runs them about 2x faster.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT)


def pack_panels(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in the panel kernel's layout, where that kernel is built (AVX-512)."""
    ops = native_ops(weight)
    if ops is None or not weight.numel():
        return None
    panels = ops.pack_panels(weight.detach())
    return panels if panels.numel() else None


def direct_rows(weight: torch.Tensor) -> int:
    """Rows up to which `linear` runs a kept weight (panels or plain) on distserve's own kernel
    rather than on oneDNN's packed copy."""
    return PANEL_ROWS if weight.dim() == 3 else SMALL_BATCH


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b by the fastest path here. `weight` is the plain weight [N, K], or its panels
    (`pack_panels`), or empty; `packed` is oneDNN's copy. Up to `direct_rows` rows the panel or
    streaming kernel runs over the kept weight, else oneDNN's packed weight, else torch."""
    if packed is not None:
        if weight.numel() and x.shape[0] <= direct_rows(weight):
            ops = native_ops(x)
            if ops is not None:
                if weight.dim() == 3:
                    return ops.panel_linear(x.contiguous(), weight, packed.shape[0], bias)
                return ops.linear_small_batch(x.contiguous(), weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


def kv_head_range(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The KV heads tensor-parallel rank `tp_rank` holds: an equal share of them, or, with more
    ranks than heads, one head replicated on tp_size / num_kv_heads consecutive ranks."""
    local = max(1, num_kv_heads // tp_size)
    start = tp_rank // max(1, tp_size // num_kv_heads) * local
    return start, start + local


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _copy(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
    param.copy_(loaded)


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.weight = _param(output_size, input_size)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = _param(output_size)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed: torch.Tensor | None = None
        self.quant: QuantizedWeight | None = None
        self._quant_shards: dict[int, QuantizedWeight] = {}  # row offset -> shard, until prepack

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        self._store(param, loaded)

    def _store(self, param: nn.Parameter, loaded: LoadedWeight, row: int = 0, rows: int | None = None) -> None:
        """Copy a (sharded) checkpoint tensor into rows [row, row + rows) of `param` (all of it by
        default); a quantized one is kept aside as it is (the float parameter is never written,
        so it never takes memory)."""
        target = param.data if rows is None else param.data.narrow(0, row, rows)
        if isinstance(loaded, QuantizedWeight) and param is self.weight:
            if tuple(loaded.shape) != tuple(target.shape):
                raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit {tuple(target.shape)}")
            self._quant_shards[row] = loaded.compact()
            return
        _copy(target, materialize(loaded))

    def prepack(self, keep_plain: bool, quantization: str | None = None) -> None:
        """After loading: merge the quantized shards, or quantize the float weight
        (`quantization` int8 / int4), or else add oneDNN's packed weight; if `keep_plain`, a
        second copy serves small batches faster: the panels where that kernel is built, else
        the plain weight."""
        shards, self._quant_shards = self._quant_shards, {}
        if shards and sum(s.shape[0] for s in shards.values()) == self.weight.shape[0]:
            self.quant = merge([shards[row] for row in sorted(shards)])
        else:  # some shards came as floats: the projection runs in float32
            for row, shard in shards.items():
                self.weight.data[row : row + shard.shape[0]] = shard.dequantize()
        if self.quant is None and quantization in ("int8", "int4") and self.weight.numel():
            self.quant = quantize(self.weight, quantization)
        if self.quant is not None:
            self.quant = self.quant.to(self.weight.device)
            self.weight.data = torch.empty(0)
            return
        self.packed = prepack(self.weight)
        if self.packed is None:
            return
        if not keep_plain:
            self.weight.data = torch.empty(0)
        elif (panels := pack_panels(self.weight)) is not None:  # the small-batch copy, else the plain weight
            self.weight.data = panels

    def fused_weight(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What the one-call decode layer takes for this projection: the quantized storage and
        its scales, or the kept (panels or plain) and the packed weight; None when neither is kept."""
        if self.quant is not None:
            return self.quant.q, self.quant.sm
        if self.packed is not None and self.weight.numel():
            return self.weight, self.packed
        return None

    @property
    def int8_activations(self) -> bool:
        """Whether its decode matmuls round activations to int8 (quantized weights only)."""
        return self.quant is not None and self.quant.int8_activations

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant is not None:
            return quant_linear(x, self.quant, bias)
        return linear(x, self.weight, bias, self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


def fused_projections(*linears: LinearBase) -> list[torch.Tensor | None] | None:
    """The one-call decode layers' arguments for these projections, three each: the plain weight
    or quantized storage, the packed weight or the scales, the bias. None when they are split
    across tensor-parallel ranks (the layer would need an all-reduce inside) or one keeps
    neither form."""
    weights = [m.fused_weight() for m in linears]
    if linears[0].tp_size != 1 or None in weights:
        return None
    return [t for m, (w, p) in zip(linears, weights) for t in (w, p, m.bias)]


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's rows (output features) split across tensor-parallel ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True) -> None:
        tp = get_tp_size()
        if output_size % tp:
            raise ValueError(f"output size {output_size} is not divisible by tensor parallel size {tp}")
        super().__init__(input_size, output_size // tp, bias)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        rows = param.shape[0]
        self._store(param, narrow(loaded, 0, self.tp_rank * rows, rows))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input, stacked (e.g. gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        rows = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        self._store(param, narrow(loaded, 0, self.tp_rank * rows, rows), offset, rows)


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matmul, split by heads across ranks.

    With more ranks than KV heads, each KV head is replicated on tp_size / num_kv_heads ranks.
    """

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        tp = get_tp_size()
        if num_heads % tp:
            raise ValueError(f"{num_heads} attention heads are not divisible by tensor parallel size {tp}")
        if num_kv_heads % tp and tp % num_kv_heads:
            raise ValueError(
                f"{num_kv_heads} KV heads cannot be split or replicated over tensor parallel size {tp}"
            )
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.kv_heads = kv_head_range(num_kv_heads, tp, get_tp_rank())
        self.num_kv_heads = self.kv_heads[1] - self.kv_heads[0]
        local = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, local * tp, bias)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        assert shard_id in ("q", "k", "v")
        if shard_id == "q":
            offset, rows, start = 0, self.q_size, self.tp_rank * self.q_size
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            rows, start = self.kv_size, self.kv_heads[0] * self.head_dim
        self._store(param, narrow(loaded, 0, start, rows), offset, rows)


class RowParallelLinear(LinearBase):
    """y = x W^T with W's columns (input features) split; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True) -> None:
        tp = get_tp_size()
        if input_size % tp:
            raise ValueError(f"input size {input_size} is not divisible by tensor parallel size {tp}")
        super().__init__(input_size // tp, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        if param.dim() == 1:  # the bias is added once, after the all-reduce
            _copy(param.data, materialize(loaded))
            return
        cols = param.shape[1]
        self._store(param, narrow(loaded, 1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = tp_all_reduce(self.matmul(x, None))
        return out if self.bias is None else out + self.bias


def transpose_conv1d(loaded: LoadedWeight) -> torch.Tensor:
    """GPT-2 stores its projections as Conv1D ([in, out]); our linears are [out, in]."""
    weight = materialize(loaded)
    return weight.t() if weight.dim() == 2 else weight

