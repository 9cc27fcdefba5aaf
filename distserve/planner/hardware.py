"""What the planner knows of models and machines: model shapes (from a config.json, or known
ids offline) and device presets (FLOP/s, memory bandwidth and size, links)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from distserve.config import GIB


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool  # LLaMA's gate/up/down MLP (three matrices) or a plain two-matrix one
    max_position: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def layer_params(self) -> int:
        attention = self.hidden_size * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim + self.hidden_size**2
        mlp = (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size
        return attention + mlp

    def params(self) -> int:
        return self.num_layers * self.layer_params() + 2 * self.vocab_size * self.hidden_size

    def weight_bytes(self, dtype_bytes: int) -> int:
        return self.params() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """2 (K and V) x layers x KV heads x head dim x dtype bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def _opt(name: str, layers: int, hidden: int, heads: int) -> ModelShape:
    return ModelShape(name, layers, hidden, heads, heads, 4 * hidden, 50272, False, 2048)


def _llama(name: str, layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int = 32000, ctx: int = 4096) -> ModelShape:
    return ModelShape(name, layers, hidden, heads, kv, ffn, vocab, True, ctx)


KNOWN_MODELS = {
    "facebook/opt-13b": _opt("facebook/opt-13b", 40, 5120, 40),
    "facebook/opt-66b": _opt("facebook/opt-66b", 64, 9216, 72),
    "facebook/opt-175b": _opt("facebook/opt-175b", 96, 12288, 96),
    "meta-llama/Llama-2-7b-hf": _llama("meta-llama/Llama-2-7b-hf", 32, 4096, 32, 32, 11008),
    "meta-llama/Llama-2-13b-hf": _llama("meta-llama/Llama-2-13b-hf", 40, 5120, 40, 40, 13824),
    "meta-llama/Llama-2-70b-hf": _llama("meta-llama/Llama-2-70b-hf", 80, 8192, 64, 8, 28672),
    "meta-llama/Meta-Llama-3-8B": _llama("meta-llama/Meta-Llama-3-8B", 32, 4096, 32, 8, 14336, 128256, 8192),
    "HuggingFaceTB/SmolLM2-135M-Instruct": _llama("HuggingFaceTB/SmolLM2-135M-Instruct", 30, 576, 9, 3, 1536, 49152, 8192),
}
_ALIASES = {name.split("/")[-1].lower(): name for name in KNOWN_MODELS}


def model_shape(model: str | None) -> ModelShape:
    """A known model id (offline), or the shape of a local checkpoint distserve can load."""
    if model is None:
        return KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"]
    key = _ALIASES.get(model.split("/")[-1].lower())
    if key is not None:
        return KNOWN_MODELS[key]
    from distserve.weights.source import load_model_config

    config = load_model_config(model)
    hf = config.hf_config
    gated = config.architecture not in ("OPTForCausalLM", "GPT2LMHeadModel")
    inter = getattr(hf, "intermediate_size", None) or getattr(hf, "ffn_dim", None) or getattr(hf, "n_inner", None) or 4 * config.hidden_size
    return ModelShape(config.name, config.num_layers, config.hidden_size, config.num_attention_heads, config.num_kv_heads,
                      inter, config.vocab_size, gated, config.max_model_len)


@dataclass(frozen=True)
class Device:
    """One accelerator (or one CPU core group) and the links around it."""

    name: str
    flops: float  # dense FLOP/s in the serving dtype
    memory_bandwidth: float  # bytes/s
    memory_bytes: float
    intra_node_bandwidth: float  # bytes/s between two devices of a node (NVLink; shared memory on CPU)
    inter_node_bandwidth: float  # bytes/s between nodes
    dtype_bytes: int = 2
    flops_efficiency: float = 0.6  # share of peak FLOP/s large matmuls reach
    bandwidth_efficiency: float = 0.8


DEVICES = {
    # A100 SXM 80GB: 312 TFLOP/s bf16, 2.0 TB/s HBM, NVLink 600 GB/s (300 each way); the
    # DistServe paper's testbed links nodes with 25 Gbit/s
    "a100-80gb": Device("a100-80gb", 312e12, 2.039e12, 80 * GIB, 300e9, 25e9 / 8),
    "h100": Device("h100", 989e12, 3.35e12, 80 * GIB, 450e9, 400e9 / 8),
    "h200": Device("h200", 989e12, 4.8e12, 141 * GIB, 450e9, 400e9 / 8),
    # this project's machine: 2 AVX2 cores, fp32 (measured: ~150 GFLOP/s matmul, ~30 GB/s
    # memory read, ~5 GB/s KV pull through shared memory); a "device" is one core
    "cpu": Device("cpu", 75e9, 15e9, 12 * GIB, 5e9, 1.25e9, dtype_bytes=4, flops_efficiency=0.85, bandwidth_efficiency=0.8),
}


@dataclass(frozen=True)
class Cluster:
    num_nodes: int
    devices_per_node: int
    device: Device

    @classmethod
    def parse(cls, text: str) -> Cluster:
        """`NODESxDEVICES[xKIND]`, e.g. `4x8xa100-80gb` or `1x2xcpu`."""
        parts = text.lower().split("x", 2)
        try:
            nodes, per_node = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            raise ValueError(f"cluster {text!r}: use NODESxDEVICES[xKIND], e.g. 4x8xa100-80gb.") from None
        kind = parts[2] if len(parts) == 3 else "a100-80gb"
        if kind not in DEVICES:
            raise ValueError(f"device kind {kind!r} unknown; one of {sorted(DEVICES)}.")
        return cls(nodes, per_node, DEVICES[kind])

    @property
    def num_devices(self) -> int:
        return self.num_nodes * self.devices_per_node


def fits_in_memory(shape: ModelShape, device: Device, tp: int, pp: int, min_kv_tokens: int, utilization: float = 0.9) -> bool:
    """Weights of one worker's shard plus room for `min_kv_tokens` of KV fit the device."""
    weights = shape.weight_bytes(device.dtype_bytes) / (tp * pp)
    kv = shape.kv_bytes_per_token(device.dtype_bytes) * min_kv_tokens / (tp * pp)
    return weights + kv <= utilization * device.memory_bytes


def kv_capacity_tokens(shape: ModelShape, device: Device, tp: int, pp: int, utilization: float = 0.9) -> int:
    """Tokens of KV cache an instance of tp x pp devices holds after its weights."""
    free = utilization * device.memory_bytes * tp * pp - shape.weight_bytes(device.dtype_bytes)
    return max(0, math.floor(free / shape.kv_bytes_per_token(device.dtype_bytes)))
