"""Token embeddings and the LM head, with the vocabulary split across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distserve.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from distserve.kernels import native_ops
from distserve.layers.linear import linear, pack_panels, prepack
from distserve.layers.quantization import QuantizedWeight, quant_linear
from distserve.layers.sampler import greedy
from distserve.weights.loader import LoadedWeight, narrow, weight_shape


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary) are split across ranks; lookups are all-reduced. A
    quantized checkpoint tensor (GGUF) stays quantized: a lookup dequantizes its rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_embeddings = num_embeddings
        self.shard_size = -(-num_embeddings // self.tp_size)  # padded so every rank has the same
        self.vocab_start = self.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.quant: QuantizedWeight | None = None

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        rows = weight_shape(loaded)[0]
        if rows != self.num_embeddings:
            raise ValueError(f"embedding has {rows} rows, the config says {self.num_embeddings}")
        length = max(0, min(self.shard_size, rows - self.vocab_start))
        if isinstance(loaded, QuantizedWeight) and param is self.weight:
            part = loaded.narrow(0, self.vocab_start, length)
            pad = self.shard_size - length  # padding rows: scale and min 0, so they read as 0
            q = torch.cat([part.q, part.q.new_zeros(pad, part.q.shape[1])])
            sm = torch.cat([part.sm, part.sm.new_zeros(pad, *part.sm.shape[1:])])
            # float32 activations always: the (tied) LM head picks the token, so rounding its input
            # would flip near ties (the built-in model's first answer token is one), and over a
            # vocabulary's rows it is bound by the bytes it reads either way
            self.quant = QuantizedWeight(q.contiguous(), sm.contiguous(), part.bits, part.group).to(param.device)
            param.data = torch.empty(0, device=param.device)
            return
        param.data[:length].copy_(narrow(loaded, 0, self.vocab_start, length))
        param.data[length:].zero_()

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return F.embedding(ids, self.weight)
        return self.quant.dequantize(ids.flatten()).view(*ids.shape, -1).to(ids.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.lookup(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        out = self.lookup(local.masked_fill(outside, 0))
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return tp_all_reduce(out)


# Logits a screened greedy step recomputes exactly, at most, a row (past them: the whole row)
SCREEN_CANDIDATES = 256


def bf16_matmul_fast() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16), where
    oneDNN's bfloat16 linear runs a vocabulary-wide head 2.5-4x as fast as float32 (1-128 rows)."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def screen_error(k: int) -> float:
    """c in |s_j - x . w_j| <= c ||x|| ||w_j|| for a bfloat16 screen s over k inputs: x and w
    rounded to bfloat16 (relative error u = 2^-8 each), their products exact in float32, summed
    in float32 (gamma_k <= 1.1 k 2^-24 in any order), the sum rounded to bfloat16 (u again);
    Cauchy-Schwarz bounds sum |x_i w_i| by ||x|| ||w||. One percent over, for the bounds'
    own second-order terms."""
    u = 2.0**-8
    return 1.01 * (3 * u + 4 * u * u + 1.1 * k * 2.0**-24)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits (tied to the embedding or not).

    Greedy steps can skip most of the float32 head (`greedy_tokens`): a bfloat16 copy
    screens the vocabulary, with a bound on its error, and only the tokens that could be the
    largest are recomputed exactly. The tokens are those of the exact logits, as a float32
    head gives them (up to ties within float32 rounding)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False) -> None:
        super().__init__(num_embeddings, embedding_dim)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.shard_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed: torch.Tensor | None = None
        self.panels: torch.Tensor | None = None
        self.screen: torch.Tensor | None = None  # oneDNN's packed bfloat16 copy
        self.row_norms: torch.Tensor | None = None  # ||w_j||_2, rounded up

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight
        self.tied_to = embedding

    def prepack(self, keep_plain: bool, quantization: str | None = None) -> None:
        """A copy for the matmul: in the panel kernel's layout where it is built, else
        oneDNN's packed one. The plain weight stays (it may be the tied embedding's). The head
        multiplies only the rows it samples (up to a step's sequences), where panels run
        1.3-1.5x oneDNN at 1-8 rows, 1.0-1.1x at 64-128 and 0.8-1.0x at 256
        (benchmarks/small_batch_linear.py, vocabulary-wide shapes). A quantized (or tied
        quantized) head stays quantized; `quantization` int8 / int4 leaves the head in float,
        as vLLM does."""
        tied = getattr(self, "tied_to", None)
        if tied is not None and tied.quant is not None:
            self.quant = tied.quant
        if self.quant is None:
            self.panels = pack_panels(self.weight)
            if self.panels is None:
                self.packed = prepack(self.weight)
            if self.tp_size == 1 and native_ops(self.weight) is not None and bf16_matmul_fast():
                self.screen = torch.ops.mkldnn._reorder_linear_weight(self.weight.to(torch.bfloat16), 32)
                norms = [torch.linalg.vector_norm(part, dim=1, dtype=torch.float64)  # a few MiB of doubles at a time
                         for part in self.weight.split(4096)]
                self.row_norms = (torch.cat(norms) * (1 + 1e-6)).float()

    def screened_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The bfloat16 screen's logits s of rows x [B, K] (float32, contiguous): [B, V] bfloat16,
        each within `screen_error(K) ||x|| ||w_j||` of the exact x . w_j."""
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.screen, None, "none", [], "")

    def greedy_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Each row's argmax token over the logits, without computing all of them where the
        bfloat16 screen is built (`screened_argmax`; a row it cannot settle gets its logits in
        full); None where it is not."""
        if self.screen is None:
            return None
        x = hidden_states.contiguous()
        ops = native_ops(x)
        tokens = ops.screened_argmax(x, self.screened_logits(x), self.weight, self.row_norms, self.bias,
                                     screen_error(x.shape[1]), SCREEN_CANDIDATES)
        missed = (tokens < 0).nonzero().flatten()
        if len(missed):
            tokens[missed] = greedy(self.compute_logits(x[missed]))
        return tokens

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = native_ops(hidden_states) if self.panels is not None else None
        if self.quant is not None:
            logits = quant_linear(hidden_states.contiguous(), self.quant, self.bias)
        elif ops is not None:
            logits = ops.panel_linear(hidden_states.contiguous(), self.panels, self.weight.shape[0], self.bias)
        else:
            logits = linear(hidden_states, self.weight, self.bias, self.packed)
        logits = tp_all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings]
