"""Reading checkpoint tensors: safetensors and pytorch_model.bin (sharded or not), and GGUF.

Safetensors tensors are handed out as lazy slices, so a tensor-parallel worker reads only the
rows or columns it owns (`narrow`); the other formats hand out whole tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from glob import glob
from typing import Any

import torch
from safetensors import safe_open

from distserve.config import ModelConfig

# A checkpoint tensor: a torch.Tensor, a safetensors slice not read yet, or a GGUF tensor kept
# quantized (layers/quantization.py's QuantizedWeight).
LoadedWeight = torch.Tensor | Any


def narrow(weight: LoadedWeight, dim: int, start: int, length: int) -> LoadedWeight:
    """Rows/columns [start, start + length) of `weight` along `dim`, reading only those."""
    if isinstance(weight, torch.Tensor) or hasattr(weight, "dequantize"):
        return weight.narrow(dim, start, length)
    index = [slice(None)] * len(weight.get_shape())
    index[dim] = slice(start, start + length)
    return weight[tuple(index)]


def materialize(weight: LoadedWeight) -> torch.Tensor:
    """The tensor in float (a quantized one dequantized)."""
    if isinstance(weight, torch.Tensor):
        return weight
    return weight.dequantize() if hasattr(weight, "dequantize") else weight[:]


def weight_shape(weight: LoadedWeight) -> tuple[int, ...]:
    if isinstance(weight, torch.Tensor) or hasattr(weight, "dequantize"):
        return tuple(weight.shape)
    return tuple(weight.get_shape())


def _checkpoint_files(path: str) -> tuple[str, list[str]]:
    for kind, index_name, pattern in (
        ("safetensors", "model.safetensors.index.json", "*.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return kind, [os.path.join(path, s) for s in shards]
        files = sorted(glob(os.path.join(path, pattern)))
        if files:
            return kind, files
    raise ValueError(f"{path} holds no *.safetensors or pytorch_model*.bin weights.")


def iterate_weights(model: ModelConfig, keep_quantized: bool = False) -> Iterator[tuple[str, LoadedWeight]]:
    """(checkpoint name, tensor) for every tensor of the model's checkpoint (a GGUF's quantized
    matrices kept quantized when `keep_quantized`)."""
    if model.gguf_file is not None:
        from distserve.weights.gguf import iterate_gguf_weights

        yield from iterate_gguf_weights(os.path.join(model.path, model.gguf_file), model.hf_config, keep_quantized)
        return
    kind, files = _checkpoint_files(model.path)
    for file in files:
        if kind == "safetensors":
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)
        else:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            yield from state.items()
