"""GPT-2.

    h   = x + c_proj(attn(q, k, v))        q, k, v = c_attn(ln_1(x))
    out = h + mlp.c_proj(gelu(c_fc(ln_2(h))))

Learned absolute positions; the LM head is tied to the token embedding. GPT-2 checkpoints
store projections as Conv1D ([in, out]); they are transposed and c_attn split into Q, K, V
while loading, so the same tensor-parallel linears serve every model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from distserve.layers.activation import get_activation
from distserve.layers.attention import Attention, AttentionMetadata
from distserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distserve.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, transpose_conv1d
from distserve.layers.norm import LayerNorm
from distserve.models.base import CausalLM, LayerNormDecodeLayer
from distserve.weights.loader import LoadedWeight, materialize

_CONV1D = (".c_attn.", ".c_proj.", ".c_fc.")


class GPT2Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        hidden, heads = config.n_embd, config.n_head
        head_dim = hidden // heads
        scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.c_attn = QKVParallelLinear(hidden, head_dim, heads, heads, bias=True)
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True)
        self.attn = Attention(self.c_attn.num_heads, self.c_attn.num_kv_heads, head_dim, scale)
        self.split = [self.c_attn.q_size, self.c_attn.kv_size, self.c_attn.kv_size]

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.split, dim=-1)
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2MLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = ColumnParallelLinear(config.n_embd, inner, bias=True)
        self.c_proj = RowParallelLinear(inner, config.n_embd, bias=True)
        self.act = get_activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(LayerNormDecodeLayer):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def prepare_fused_decode(self) -> bool:
        attn, mlp = self.attn, self.mlp
        return self.prepare_layer_norm_decode(True, self.ln_1, attn.c_attn, attn.c_proj, attn.attn, self.ln_2,
                                              mlp.c_fc, mlp.c_proj, mlp.act)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = meta.kept(x) + self.attn(self.ln_1(x), meta)
        return h + self.mlp(self.ln_2(h))


class GPT2Model(nn.Module):
    def __init__(self, config: PretrainedConfig, lm: CausalLM) -> None:
        super().__init__()
        first, last = lm.is_first_stage, lm.is_last_stage
        self.wte = VocabParallelEmbedding(config.vocab_size, config.n_embd) if first else nn.Identity()
        self.wpe = nn.Embedding(config.n_positions, config.n_embd) if first else nn.Identity()
        self.wpe.requires_grad_(False)
        self.h = lm.make_layers(config.n_layer, lambda i: GPT2Block(config, i))
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon) if last else nn.Identity()


class GPT2LMHeadModel(CausalLM):
    stacked_params = (
        (".c_attn.", ".q_proj.", "q"),
        (".c_attn.", ".k_proj.", "k"),
        (".c_attn.", ".v_proj.", "v"),
    )

    def __init__(self, config: PretrainedConfig, max_model_len: int) -> None:
        super().__init__(config.n_layer)
        self.config = config
        self.transformer = GPT2Model(config, self)
        if self.is_last_stage:
            self.lm_head = ParallelLMHead(config.vocab_size, config.n_embd)
            if self.is_first_stage:
                self.lm_head.tie(self.transformer.wte)
        else:
            self.lm_head = nn.Identity()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.is_first_stage:
            x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        else:
            x = hidden_states
        x = self.run_layers(x, meta)
        return self.transformer.ln_f(x) if self.is_last_stage else x

    def stage_layers(self) -> nn.ModuleList:
        return self.transformer.h[self.start_layer : self.end_layer]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def checkpoint_name(self, name: str) -> str | None:
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return None  # causal-mask buffers of old checkpoints
        if name == "lm_head.weight":
            return None if self.is_first_stage or not self.is_last_stage else name
        if name == "transformer.wte.weight" and self.is_last_stage and not self.is_first_stage:
            return "lm_head.weight"  # the tied head on a later pipeline stage
        return name

    def load_weights(self, weights: Iterable[tuple[str, LoadedWeight]]) -> None:
        super().load_weights(self._hf_layout(weights))

    @staticmethod
    def _hf_layout(weights: Iterable[tuple[str, LoadedWeight]]) -> Iterator[tuple[str, LoadedWeight]]:
        """Add the `transformer.` prefix, transpose Conv1D weights, split c_attn into Q, K, V."""
        for name, weight in weights:
            if not name.startswith(("transformer.", "lm_head.")):
                name = f"transformer.{name}"
            if any(part in name for part in _CONV1D):
                weight = transpose_conv1d(weight) if name.endswith(".weight") else materialize(weight)
            if ".c_attn." in name:
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), weight.chunk(3, dim=0)):
                    yield name.replace("c_attn", part), chunk
            else:
                yield name, weight
