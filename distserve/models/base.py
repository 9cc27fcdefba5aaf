"""What every model shares: the forward/logits interface, pipeline-stage layers, weight loading."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType

import torch
from torch import nn

from distserve.distributed.parallel_state import get_pp_rank, get_pp_size, pp_layer_range
from distserve.kernels import native_ops
from distserve.layers.activation import PointwiseActivation
from distserve.layers.attention import Attention, AttentionMetadata
from distserve.layers.embedding import ParallelLMHead
from distserve.layers.linear import FUSED_DECODE_BATCH, LinearBase, direct_rows, fused_projections
from distserve.layers.norm import LayerNorm
from distserve.layers.quantization import QUANT_STREAM_ROWS
from distserve.weights.loader import LoadedWeight, materialize


class CausalLM(nn.Module):
    """A decoder-only LM split into pipeline stages (one stage when PP is 1).

    `forward` takes token ids on the first stage and the previous stage's hidden states on
    the others, and returns hidden states; `compute_logits` runs on the last stage.
    """

    # (our parameter part, checkpoint part, shard id) for projections stored fused
    stacked_params: tuple[tuple[str, str, object], ...] = ()

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.start_layer, self.end_layer = pp_layer_range(num_layers)
        self.is_first_stage = get_pp_rank() == 0
        self.is_last_stage = get_pp_rank() == get_pp_size() - 1
        self._fused_decode: bool | None = None

    def make_layers(self, num_layers: int, build: Callable[[int], nn.Module]) -> nn.ModuleList:
        """The decoder layers of this stage; the other stages' slots hold empty placeholders."""
        return nn.ModuleList(
            build(i) if self.start_layer <= i < self.end_layer else nn.Identity() for i in range(num_layers)
        )

    def fused_decode_layers(self, x: torch.Tensor, meta: AttentionMetadata) -> ModuleType | None:
        """The native kernels when this step can run each layer of this stage as one call
        (`decode_fused`): a pure decode step of at most FUSED_DECODE_BATCH sequences on CPU
        float32, and every layer able to (`prepare_fused_decode`, decided once, after the
        weights are loaded and packed)."""
        ops = native_ops(x)
        if ops is None or meta.prefill_query_lens or len(x) > FUSED_DECODE_BATCH:
            return None
        if self._fused_decode is None:
            layers = self.stage_layers()
            self._fused_decode = bool(layers) and all(
                hasattr(layer, "prepare_fused_decode") and layer.prepare_fused_decode() for layer in layers)
        return ops if self._fused_decode else None

    def stage_layers(self) -> nn.ModuleList:
        """This stage's decoder layers."""
        raise NotImplementedError

    def run_layers(self, x: torch.Tensor, meta: AttentionMetadata, module_args: tuple = (),
                   fused_args: tuple = ()) -> torch.Tensor:
        """This stage's layers over `x`: each as one native call in a pure decode step that can
        (`fused_decode_layers`: `decode_fused(ops, *fused_args, x, meta)`), else module by module
        (`forward(*module_args, x, meta)`), the last one over `meta.output_rows` only when the
        runner set them (then the result has those rows)."""
        ops = self.fused_decode_layers(x, meta)
        if ops is None:
            layers = self.stage_layers()
            for i, layer in enumerate(layers):
                x = layer(*module_args, x, meta.for_last_layer() if i == len(layers) - 1 else meta)
            return x
        x = x.contiguous()
        for layer in self.stage_layers():
            x = layer.decode_fused(ops, *fused_args, x, meta)
        return x

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def greedy_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Each row's greedy token straight from the last hidden states where the LM head can
        screen its vocabulary (`ParallelLMHead.greedy_tokens`); None: compute the logits."""
        head = getattr(self, "lm_head", None)
        return head.greedy_tokens(hidden_states) if isinstance(head, ParallelLMHead) else None

    def checkpoint_name(self, name: str) -> str | None:
        """Our parameter name for a checkpoint tensor name; None to skip it."""
        return name

    def load_weights(self, weights: Iterable[tuple[str, LoadedWeight]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for ckpt_name, weight in weights:
            name = self.checkpoint_name(ckpt_name)
            if name is None:
                continue
            shard_id = None
            for ours, theirs, shard in self.stacked_params:
                if theirs in name:
                    name, shard_id = name.replace(theirs, ours), shard
                    break
            if name not in params:
                if self._belongs_to_other_stage(name):
                    continue
                raise ValueError(f"checkpoint tensor {ckpt_name!r} matches no parameter of {type(self).__name__}")
            param = params[name]
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                param.data.copy_(materialize(weight))
            else:
                loader(param, weight, shard_id)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def _belongs_to_other_stage(self, name: str) -> bool:
        """Whether `name` lives under a placeholder left for another pipeline stage."""
        parts = name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            try:
                module = self.get_submodule(".".join(parts[:i]))
            except AttributeError:
                return False
            if isinstance(module, nn.Identity):
                return True
        return False


class LayerNormDecodeLayer(nn.Module):
    """A decoder layer with layer norms (before or after each residual add) and a pointwise MLP
    activation (OPT, GPT-2), which a pure decode step can run as one native call
    (`layer_norm_decode_layer`)."""

    def prepare_layer_norm_decode(self, pre_ln: bool, ln1: LayerNorm, qkv: LinearBase, out: LinearBase, attn: Attention,
                                  ln2: LayerNorm, fc1: LinearBase, fc2: LinearBase, act: nn.Module) -> bool:
        """Whether `decode_fused` computes what `forward` does for a few decodes (a pointwise
        activation the call knows, no tensor parallelism, every projection kept as the call
        takes it); if so, gather its arguments once."""
        projections = fused_projections(qkv, out, fc1, fc2)
        if not isinstance(act, PointwiseActivation) or projections is None:
            return False
        qkv_args, o_args, fc1_args, fc2_args = (projections[i : i + 3] for i in range(0, 12, 3))
        self.fused_weights = (ln1.weight, ln1.bias, *qkv_args, *o_args, ln2.weight, ln2.bias, *fc1_args, *fc2_args,
                              attn.k_cache, attn.v_cache)
        self.fused_shape = (attn.num_heads, attn.head_dim, ln1.eps, attn.scale, direct_rows(qkv_args[0]),
                            QUANT_STREAM_ROWS, qkv.int8_activations, pre_ln, act.kind)
        return True

    def decode_fused(self, ops: ModuleType, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """`forward` for a pure decode step, as one native call."""
        return ops.layer_norm_decode_layer(x, *self.fused_weights, meta.slot_mapping, meta.decode_block_tables,
                                           meta.decode_seq_lens, *self.fused_shape)
