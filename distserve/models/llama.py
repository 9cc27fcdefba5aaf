"""LLaMA family: LLaMA-2/3, SmolLM2, Mistral and Qwen2 shapes.

    h   = x + o_proj(attn(rope(q), rope(k), v))      q, k, v = qkv_proj(rms_norm(x))
    out = h + down_proj(silu(gate) * up)             gate, up = gate_up_proj(rms_norm(h))

Multi-head, grouped-query and multi-query attention (num_key_value_heads), scaled RoPE,
tied or untied embeddings, and attention / MLP biases where the config has them (Qwen2 has
q/k/v biases only).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn
from transformers import PretrainedConfig

from distserve.layers.activation import SiluAndMul
from distserve.layers.attention import Attention, AttentionMetadata
from distserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distserve.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    direct_rows,
    fused_projections,
)
from distserve.layers.norm import RMSNorm
from distserve.layers.quantization import QUANT_STREAM_ROWS
from distserve.layers.rotary import RotaryEmbedding, rotate_qkv
from distserve.models.base import CausalLM


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        o_bias = config.model_type != "qwen2" and getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, heads, kv_heads, bias=qkv_bias)
        self.o_proj = RowParallelLinear(heads * head_dim, config.hidden_size, bias=o_bias)
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, head_dim**-0.5)
        self.split = [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size]

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q_size, kv_size, _ = self.split
        q, k, v = rotate_qkv(self.qkv_proj(x), rope, q_size, kv_size, self.attn.head_dim)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        if config.hidden_act != "silu":
            raise ValueError(f"LLaMA-family MLP with activation {config.hidden_act!r} is not supported")
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = meta.kept(x) + self.self_attn(rope, self.input_layernorm(x), meta)
        return h + self.mlp(self.post_attention_layernorm(h))

    def prepare_fused_decode(self) -> bool:
        """Whether `decode_fused` computes exactly what `forward` does for a few decodes (no
        tensor parallelism, so no all-reduce inside, and every projection keeps the plain
        weight the small-batch kernel streams, or is quantized); if so, gather its arguments once (looking up
        two dozen submodule attributes per layer and step costs more than the layer's norms
        and rotary embedding together)."""
        attn, mlp = self.self_attn, self.mlp
        projections = fused_projections(attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if projections is None:
            return False
        qkv, o, gate_up, down = (projections[i : i + 3] for i in range(0, 12, 3))
        self.fused_weights = (self.input_layernorm.weight, *qkv, *o, self.post_attention_layernorm.weight, *gate_up,
                              *down, attn.attn.k_cache, attn.attn.v_cache)
        self.fused_shape = (attn.attn.num_heads, attn.attn.num_kv_heads, attn.attn.head_dim,
                            self.input_layernorm.eps, attn.attn.scale, direct_rows(qkv[0]), QUANT_STREAM_ROWS,
                            attn.qkv_proj.int8_activations)
        return True

    def decode_fused(self, ops: ModuleType, cos: torch.Tensor, sin: torch.Tensor, x: torch.Tensor,
                     meta: AttentionMetadata) -> torch.Tensor:
        """`forward` for a pure decode step of at most FUSED_DECODE_BATCH sequences, as one native
        call (cos/sin: [T, head_dim])."""
        return ops.llama_decode_layer(x, *self.fused_weights, meta.slot_mapping, meta.decode_block_tables,
                                      meta.decode_seq_lens, cos, sin, *self.fused_shape)


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, lm: CausalLM, max_model_len: int) -> None:
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary = RotaryEmbedding(config, head_dim, max_model_len)
        first, last = lm.is_first_stage, lm.is_last_stage
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size) if first else nn.Identity()
        self.layers = lm.make_layers(config.num_hidden_layers, lambda i: LlamaDecoderLayer(config))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if last else nn.Identity()


class LlamaForCausalLM(CausalLM):
    stacked_params = (
        (".qkv_proj.", ".q_proj.", "q"),
        (".qkv_proj.", ".k_proj.", "k"),
        (".qkv_proj.", ".v_proj.", "v"),
        (".gate_up_proj.", ".gate_proj.", 0),
        (".gate_up_proj.", ".up_proj.", 1),
    )

    def __init__(self, config: PretrainedConfig, max_model_len: int) -> None:
        super().__init__(config.num_hidden_layers)
        self.config = config
        self.model = LlamaModel(config, self, max_model_len)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if self.is_last_stage:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
            if self.tied and self.is_first_stage:
                self.lm_head.tie(self.model.embed_tokens)
        else:
            self.lm_head = nn.Identity()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids) if self.is_first_stage else hidden_states
        rope = self.model.rotary.cos_sin(positions, x.dtype)
        flat = tuple(t.view(t.shape[0], -1) for t in rope)  # the native layer's cos and sin rows
        x = self.run_layers(x, meta, (rope,), flat)
        return self.model.norm(x) if self.is_last_stage else x

    def stage_layers(self) -> nn.ModuleList:
        return self.model.layers[self.start_layer : self.end_layer]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def checkpoint_name(self, name: str) -> str | None:
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.tied:
            return None if self.is_first_stage or not self.is_last_stage else name
        if name == "model.embed_tokens.weight" and self.tied and self.is_last_stage and not self.is_first_stage:
            return "lm_head.weight"  # a tied head on a later stage loads the embedding itself
        return name
