"""Runs the model for a scheduled batch: builds the flat input tensors, runs, samples.

It also owns the worker's KV cache (sized from the instance's memory budget) and its swap
space, and performs the swap copies a batch asks for before the forward pass.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from itertools import accumulate

import torch
from torch import nn

from distserve.config import GIB, QUANTIZATIONS, InstanceConfig, ModelConfig, PreemptionMode, default_kv_cache_gb
from distserve.distributed.group import group_min, recv_from_prev_stage, send_to_next_stage
from distserve.distributed.parallel_state import (
    get_parallel_state,
    get_pp_size,
    get_tp_rank,
    get_tp_size,
    pp_layer_range,
)
from distserve.engine.scheduler import ScheduledBatch
from distserve.kernels import cpu_ops
from distserve.kv.cache import KVCache, KVLayout
from distserve.layers.attention import AttentionMetadata, OutputRows
from distserve.layers.linear import kv_head_range
from distserve.layers.sampler import SampleResult, SamplingBatch, sample
from distserve.models.base import CausalLM
from distserve.models.registry import model_class
from distserve.weights.loader import iterate_weights

# On CPU, linear weights are kept twice (oneDNN-packed, and in panels or plain for small
# batches) when they take at most this much; larger models keep only the packed copy.
PLAIN_COPY_LIMIT = 2 * GIB


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(model_config: ModelConfig, device: torch.device, quantization: str | None = None) -> CausalLM:
    """Build this worker's part of the model and load its weights. `quantization`: None or
    "auto" keeps a GGUF's block-quantized tensors quantized (on CPU) and a float checkpoint
    float; "none" dequantizes everything; "int8" / "int4" quantize the float linear weights."""
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")
    cls = model_class(model_config.hf_config)
    with _default_dtype(model_config.dtype), device:
        model = cls(model_config.hf_config, model_config.max_model_len)
    keep_quantized = quantization in (None, "auto") and device.type == "cpu" and model_config.dtype == torch.float32
    model.load_weights(iterate_weights(model_config, keep_quantized=keep_quantized))
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    keep_plain = float_bytes <= PLAIN_COPY_LIMIT
    for module in model.modules():
        if hasattr(module, "prepack"):
            module.prepack(keep_plain, quantization)
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take in memory: parameters, packed, panel and screening
    copies, quantized storage, each tensor counted once (a tied head shares the embedding's)."""
    seen: dict[int, int] = {}

    def count(t: torch.Tensor | None) -> None:
        if t is None or not t.numel():
            return
        if t.is_mkldnn:  # oneDNN's packed layout has no storage to look at
            seen[id(t)] = t.numel() * t.element_size()
        else:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for p in model.parameters():
        count(p)
    for module in model.modules():
        count(getattr(module, "packed", None))
        count(getattr(module, "panels", None))
        count(getattr(module, "screen", None))
        count(getattr(module, "row_norms", None))
        quant = getattr(module, "quant", None)
        if quant is not None:
            count(quant.q)
            count(quant.sm)
    return sum(seen.values())


def kv_layout(model_config: ModelConfig, config: InstanceConfig, num_blocks: int) -> KVLayout:
    """The slice of the model's KV this worker holds, for its TP and PP rank."""
    layer_start, layer_end = pp_layer_range(model_config.num_layers)
    head_start, head_end = kv_head_range(model_config.num_kv_heads, get_tp_size(), get_tp_rank())
    return KVLayout(
        num_blocks=num_blocks,
        block_size=config.block_size,
        layer_start=layer_start,
        layer_end=layer_end,
        head_start=head_start,
        head_end=head_end,
        head_dim=model_config.head_dim,
        dtype=model_config.dtype,
    )


def num_kv_blocks(model_config: ModelConfig, config: InstanceConfig, device: torch.device) -> int:
    """Blocks that fit the instance's KV budget (the same count on every worker)."""
    if config.phase.num_kv_blocks is not None:
        return config.phase.num_kv_blocks
    bytes_per_block = kv_layout(model_config, config, 1).bytes_per_block
    workers = get_tp_size() * get_pp_size()
    if config.phase.kv_cache_gb is not None:
        budget = config.phase.kv_cache_gb * GIB / workers  # the budget is the instance's
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.85 * free
    else:  # the default, or what the instance's sequences could ever fill, if less
        budget = default_kv_cache_gb(config.role) * GIB / workers
        most = config.max_num_seqs * -(-model_config.max_model_len // config.block_size)
        budget = min(budget, most * bytes_per_block)
    blocks = int(budget // bytes_per_block)
    if blocks < 1:
        raise ValueError(f"a KV budget of {budget / GIB:.3f} GiB holds no block of {bytes_per_block} bytes")
    return group_min(blocks)  # every worker of the instance holds the same blocks


def micro_batches(batch: ScheduledBatch, count: int) -> list[list[int]]:
    """Up to `count` runs of consecutive requests with about equal tokens each."""
    count = max(1, min(count, len(batch)))
    if count == 1:
        return [list(range(len(batch)))]
    target = batch.num_tokens / count
    parts: list[list[int]] = [[]]
    tokens = 0
    for i, n in enumerate(batch.num_new_tokens):
        left = len(batch) - i  # keep at least one request for each part still to come
        if parts[-1] and (tokens >= target * len(parts) or left < count - len(parts) + 1) and len(parts) < count:
            parts.append([])
        parts[-1].append(i)
        tokens += n
    return parts


class ModelRunner:
    def __init__(self, model_config: ModelConfig, config: InstanceConfig, shared_cache: bool = False) -> None:
        self.model_config = model_config
        self.config = config
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        start = time.perf_counter()
        if self.device.type == "cpu":
            cpu_ops()  # build (first time on this machine) or load the native kernels now
        self.model = load_model(model_config, self.device, config.phase.quantization)
        self.weight_bytes = weight_bytes(self.model)
        self.load_seconds = time.perf_counter() - start
        self.num_blocks = num_kv_blocks(model_config, config, self.device)
        self.kv_cache = KVCache(kv_layout(model_config, config, self.num_blocks), config.device, shared_cache)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_cache.layer(i)
        self.num_swap_blocks = 0
        self.swap_cache: KVCache | None = None
        if config.preemption_mode is PreemptionMode.SWAP:
            layout = kv_layout(model_config, config, 1)
            self.num_swap_blocks = group_min(max(1, int(config.swap_space_gb * GIB // layout.bytes_per_block)))
            self.swap_cache = KVCache(kv_layout(model_config, config, self.num_swap_blocks), "cpu", False)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        state = get_parallel_state()
        self.is_first_stage = state.pp_rank == 0
        self.is_last_stage = state.pp_rank == state.pp_size - 1
        # one worker samples: TP rank 0 of the last stage (every TP rank has the full logits)
        self.is_sampler = self.is_last_stage and state.tp_rank == 0
        self.pp_size = state.pp_size
        self.hidden_size = model_config.hf_config.hidden_size

    # -- KV movement --------------------------------------------------------------------
    def swap(self, batch: ScheduledBatch) -> None:
        """Copy preempted blocks out to swap space, and resumed ones back in."""
        assert not (batch.swap_out and batch.swap_in), "a step never swaps both ways"
        for pairs, src, dst in (
            (batch.swap_out, self.kv_cache, self.swap_cache),
            (batch.swap_in, self.swap_cache, self.kv_cache),
        ):
            if pairs:
                assert src is not None and dst is not None
                src_idx = torch.tensor([p[0] for p in pairs], device=src.tensor.device)
                dst_idx = torch.tensor([p[1] for p in pairs], device=dst.tensor.device)
                dst.tensor.index_copy_(2, dst_idx, src.tensor.index_select(2, src_idx).to(dst.tensor.device))

    # -- the step -----------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch, sampled_only: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[int]]:
        """Flat inputs, with prefill-like sequences (several new tokens) before decodes.

        Returns input ids, positions, attention metadata, the batch index of each sequence
        in flat order, and the flat index of the last token of each sequence to sample.
        `sampled_only`: the model's last layer computes those tokens only (the metadata's
        `output_rows`; the last token of the step when none is sampled), so the model's output
        has one row per sampled sequence, in that order, instead of one per token.
        """
        bs = self.block_size
        order = [i for i, n in enumerate(batch.num_new_tokens) if n > 1]
        num_prefills = len(order)
        order += [i for i, n in enumerate(batch.num_new_tokens) if n == 1]
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefill_query_lens: list[int] = []
        prefill_seq_lens: list[int] = []
        prefill_tables: list[list[int]] = []
        decode_seq_lens: list[int] = []
        decode_tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_flat: list[int] = []
        sampled_ends: list[tuple[int, list[int]]] = []  # each sampled sequence's length and blocks
        for k, i in enumerate(order):
            request, n = batch.requests[i], batch.num_new_tokens[i]
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            table = request.block_table
            tokens.extend(request.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if k < num_prefills:
                prefill_query_lens.append(n)
                prefill_seq_lens.append(end)
                prefill_tables.append(table[: -(-end // bs)])
            else:
                decode_seq_lens.append(end)
                decode_tables.append(table)
            if end == request.num_tokens:
                sample_rows.append(i)
                sample_flat.append(len(tokens) - 1)
                sampled_ends.append((end, table))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_prefill_tokens=sum(prefill_query_lens),
            prefill_query_lens=prefill_query_lens,
            prefill_seq_lens=prefill_seq_lens,
            prefill_query_starts=torch.tensor([0, *accumulate(prefill_query_lens)], dtype=torch.long, device=self.device),
            prefill_seq_lens_tensor=torch.tensor(prefill_seq_lens, dtype=torch.long, device=self.device),
            prefill_block_table=self._padded(prefill_tables),
            decode_seq_lens=torch.tensor(decode_seq_lens, dtype=torch.long, device=self.device),
            decode_block_tables=self._padded(decode_tables),
            block_size=bs,
        )
        if sampled_only and len(sample_flat) < len(tokens):
            kept = sample_flat or [len(tokens) - 1]
            ends = sampled_ends or [(end, table)]  # none sampled: the step's last sequence
            meta.output_rows = OutputRows(
                index=torch.tensor(kept, dtype=torch.long, device=self.device),
                attention=self._decode_metadata([e for e, _ in ends], [t for _, t in ends]),
            )
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return input_ids, pos, meta, sample_rows, sample_flat

    def _decode_metadata(self, seq_lens: list[int], tables: list[list[int]]) -> AttentionMetadata:
        """Metadata of a pure decode step of sequences with these lengths and blocks, each
        attending with its last token (that token's K and V already in the cache)."""
        none = torch.zeros(0, dtype=torch.long, device=self.device)
        return AttentionMetadata(
            slot_mapping=none, num_prefill_tokens=0, prefill_query_lens=[], prefill_seq_lens=[],
            prefill_query_starts=torch.zeros(1, dtype=torch.long, device=self.device), prefill_seq_lens_tensor=none,
            prefill_block_table=self._padded([]),
            decode_seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=self.device),
            decode_block_tables=self._padded(tables), block_size=self.block_size,
        )

    def _padded(self, tables: list[list[int]]) -> torch.Tensor:
        """Block tables as one [n, longest] tensor, padded with block 0."""
        width = max(map(len, tables), default=0)
        return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long,
                            device=self.device).view(len(tables), width)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None] | None:
        """Run one step; on the sampling worker, a sample for each request whose last token
        was computed (None on the other workers).

        With pipeline stages the batch runs as up to `pp_size` micro-batches: a stage sends
        one micro-batch's activations on and starts the next while later stages work.
        """
        self.swap(batch)
        results: list[SampleResult | None] = [None] * len(batch)
        sends = []
        parts = micro_batches(batch, self.pp_size)
        for part in parts:
            # one part (no pipeline stages): the batch itself, no per-step copy
            sub = batch if len(parts) == 1 else ScheduledBatch([batch.requests[i] for i in part],
                                                               [batch.num_new_tokens[i] for i in part])
            input_ids, positions, meta, rows, _ = self.prepare(sub, sampled_only=self.is_last_stage)
            hidden = None
            if not self.is_first_stage:
                hidden = recv_from_prev_stage((len(input_ids), self.hidden_size), self.model_config.dtype, self.device)
            hidden = self.model(input_ids, positions, meta, hidden)
            if not self.is_last_stage:
                sends.append(send_to_next_stage(hidden))
                continue
            if not rows:
                continue
            # one row per sampled sequence: the last layer's output rows, or, in a step that
            # samples every token (decodes only), every row already in sampling order
            if not self.is_sampler:
                self.model.compute_logits(hidden)  # its share of the tensor-parallel head
                continue
            requests = [sub.requests[i] for i in rows]
            sampling = SamplingBatch(
                params=[r.sampling_params for r in requests],
                output_token_ids=[r.output_token_ids for r in requests],
                prompt_token_ids=[r.prompt_token_ids for r in requests],
            )
            tokens = self.model.greedy_tokens(hidden) if sampling.tokens_only else None
            if tokens is not None:
                samples = [SampleResult(t) for t in tokens.tolist()]
            else:
                samples = sample(self.model.compute_logits(hidden), sampling, self.generator)
            for i, result in zip(rows, samples):
                results[part[i]] = result
        for work in sends:
            work.wait()
        return results if self.is_sampler else None

    def close(self) -> None:
        self.kv_cache.close()
