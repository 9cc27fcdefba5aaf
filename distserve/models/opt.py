"""OPT.

Pre-LN (`do_layer_norm_before=True`, most sizes):
    h = x + out_proj(attn(self_attn_layer_norm(x)));  out = h + fc2(relu(fc1(final_layer_norm(h))))
Post-LN (OPT-350m):
    h = self_attn_layer_norm(x + out_proj(attn(x)));  out = final_layer_norm(h + fc2(relu(fc1(h))))

Learned positions with an offset of 2; `word_embed_proj_dim` != `hidden_size` adds
project_in / project_out around the decoder (OPT-350m).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from distserve.layers.activation import get_activation
from distserve.layers.attention import Attention, AttentionMetadata
from distserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distserve.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from distserve.layers.norm import LayerNorm
from distserve.models.base import CausalLM, LayerNormDecodeLayer

POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        bias = config.enable_bias
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, heads, heads, bias=bias)
        self.out_proj = RowParallelLinear(hidden, hidden, bias=bias)
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, head_dim**-0.5)
        self.split = [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size]

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        return self.out_proj(self.attn(q, k, v, meta))


class OPTDecoderLayer(LayerNormDecodeLayer):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        affine = config.layer_norm_elementwise_affine
        self.pre_ln = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = RowParallelLinear(config.ffn_dim, config.hidden_size, bias=config.enable_bias)
        self.act = get_activation(config.activation_function)
        self.final_layer_norm = LayerNorm(config.hidden_size, elementwise_affine=affine)

    def prepare_fused_decode(self) -> bool:
        attn = self.self_attn
        return self.prepare_layer_norm_decode(self.pre_ln, self.self_attn_layer_norm, attn.qkv_proj, attn.out_proj,
                                              attn.attn, self.final_layer_norm, self.fc1, self.fc2, self.act)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.pre_ln:
            h = meta.kept(x) + self.self_attn(self.self_attn_layer_norm(x), meta)
            return h + self.fc2(self.act(self.fc1(self.final_layer_norm(h))))
        h = self.self_attn_layer_norm(meta.kept(x) + self.self_attn(x, meta))
        return self.final_layer_norm(h + self.fc2(self.act(self.fc1(h))))


class OPTDecoder(nn.Module):
    def __init__(self, config: PretrainedConfig, lm: CausalLM) -> None:
        super().__init__()
        first, last = lm.is_first_stage, lm.is_last_stage
        proj_dim, hidden = config.word_embed_proj_dim, config.hidden_size
        projected = proj_dim != hidden
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, proj_dim) if first else nn.Identity()
        self.embed_positions = (
            nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, hidden) if first else nn.Identity()
        )
        self.embed_positions.requires_grad_(False)
        # Parts another pipeline stage runs are placeholders; parts this model lacks are None.
        self.project_in = (ReplicatedLinear(proj_dim, hidden, bias=False) if projected else None) if first else nn.Identity()
        self.layers = lm.make_layers(config.num_hidden_layers, lambda i: OPTDecoderLayer(config))
        has_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        final_norm = LayerNorm(hidden, elementwise_affine=config.layer_norm_elementwise_affine)
        self.final_layer_norm = (final_norm if has_final_norm else None) if last else nn.Identity()
        self.project_out = (ReplicatedLinear(hidden, proj_dim, bias=False) if projected else None) if last else nn.Identity()


class OPTForCausalLM(CausalLM):
    stacked_params = (
        (".qkv_proj.", ".q_proj.", "q"),
        (".qkv_proj.", ".k_proj.", "k"),
        (".qkv_proj.", ".v_proj.", "v"),
    )

    def __init__(self, config: PretrainedConfig, max_model_len: int) -> None:
        super().__init__(config.num_hidden_layers)
        self.config = config
        self.model = nn.Module()
        self.model.decoder = OPTDecoder(config, self)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        if self.is_last_stage:
            self.lm_head = ParallelLMHead(config.vocab_size, config.word_embed_proj_dim)
            if self.tied and self.is_first_stage:
                self.lm_head.tie(self.model.decoder.embed_tokens)
        else:
            self.lm_head = nn.Identity()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        decoder = self.model.decoder
        if self.is_first_stage:
            x = decoder.embed_tokens(input_ids)
            if decoder.project_in is not None:
                x = decoder.project_in(x)
            x = x + decoder.embed_positions(positions + POSITION_OFFSET)
        else:
            x = hidden_states
        x = self.run_layers(x, meta)
        if self.is_last_stage:
            if decoder.final_layer_norm is not None:
                x = decoder.final_layer_norm(x)
            if decoder.project_out is not None:
                x = decoder.project_out(x)
        return x

    def stage_layers(self) -> nn.ModuleList:
        return self.model.decoder.layers[self.start_layer : self.end_layer]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def checkpoint_name(self, name: str) -> str | None:
        if not name.startswith(("model.", "lm_head.")):
            name = f"model.{name}"  # checkpoints saved from OPTModel
        if name == "lm_head.weight" and self.tied:
            return None if self.is_first_stage or not self.is_last_stage else name
        if name == "model.decoder.embed_tokens.weight" and self.tied and self.is_last_stage and not self.is_first_stage:
            return "lm_head.weight"
        return name
