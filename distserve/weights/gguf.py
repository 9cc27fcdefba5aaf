"""GGUF files: the config from the metadata, the weights (kept quantized or dequantized), the
tokenizer.

Matrices in Q8_0, Q4_0, Q4_1, Q4_K, Q5_K or Q6_K stay quantized on a float32 CPU engine
(layers/quantization.py maps the blocks onto its storage); tensors of any other type the
`gguf` package reads (F32, F16, BF16, the other K- and I-quants), and everything under
`--quantization none`, are dequantized with it. All are renamed to Hugging Face names, so the
models load GGUF and Hugging Face checkpoints through one `load_weights`. llama.cpp stores
LLaMA's Q and K projections permuted for its rotary layout; `_unpermute` undoes it.
Parsing a GGUF's metadata (its whole vocabulary) and converting its tokenizer take seconds;
both are done once per file and cached: the config, the tensor table (where each tensor's
data lies) and the tokenizer, so that each worker only maps the file and dequantizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoConfig, LlamaConfig, PretrainedConfig, Qwen2Config

from distserve.layers.quantization import GGUF_TYPES, QuantizedWeight, from_gguf

ARCHITECTURES = {"llama": (LlamaConfig, "LlamaForCausalLM"), "qwen2": (Qwen2Config, "Qwen2ForCausalLM")}

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


@lru_cache(maxsize=4)
def open_gguf(path: str) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from None


def _field(reader: gguf.GGUFReader, key: str, default: object = None) -> object:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor's data lies in a GGUF file, and how the gguf package views it."""

    name: str
    tensor_type: int  # gguf.GGMLQuantizationType
    offset: int  # of its data, from the start of the file
    dtype: str  # numpy dtype of the data as stored (uint8 bytes for quantized types)
    shape: tuple[int, ...]  # of the data as stored


def gguf_hf_config(path: str) -> PretrainedConfig:
    """A transformers config built from the GGUF metadata (cached: reading the metadata
    of a GGUF parses its whole vocabulary, ~9 s for SmolLM2's on the CPU machine)."""
    folder = _cached_metadata(path)
    return AutoConfig.from_pretrained(folder)


def gguf_tensors(path: str) -> list[GGUFTensor]:
    """The file's tensors, from the metadata cache (so a worker does not parse it again)."""
    table = json.loads((_cached_metadata(path) / "tensors.json").read_text())
    return [GGUFTensor(**{**t, "shape": tuple(t["shape"])}) for t in table]


def _cached_metadata(path: str) -> Path:
    """The cache folder holding the GGUF's config and tensor table, read from the file once."""
    folder = gguf_cache_dir(path)
    if (folder / "config.json").exists() and (folder / "tensors.json").exists():
        return folder
    reader = open_gguf(path)
    config = _config_from_metadata(path)
    tensors = [dataclasses.asdict(GGUFTensor(t.name, int(t.tensor_type), int(t.data_offset), t.data.dtype.str,
                                             tuple(t.data.shape))) for t in reader.tensors]
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("tensors.json", json.dumps(tensors)), ("config.json", config.to_json_string())):
        staging = folder / f"{name}.{os.getpid()}.tmp"
        staging.write_text(text)
        staging.replace(folder / name)  # atomic: a process reading the cache sees all or nothing
    return folder


def _config_from_metadata(path: str) -> PretrainedConfig:
    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}."
        )
    config_cls, architecture = ARCHITECTURES[arch]
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"{path} carries llama3-style rope frequency factors (rope_freqs), which distserve "
            "reads from Hugging Face checkpoints only; pass the model's Hugging Face folder."
        )
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    rope_parameters: dict[str, object] = {
        "rope_type": "default",
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
    }
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling == "linear":
        rope_parameters = {
            **rope_parameters,
            "rope_type": "linear",
            "factor": float(_field(reader, f"{arch}.rope.scaling.factor")),
        }
    elif scaling not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported.")
    return config_cls(
        architectures=[architecture],
        vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens.data))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length")),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_parameters=rope_parameters,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a Q or K projection (rows = heads x head_dim)."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def hf_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, kind = stem.split(".", 2)
        if kind not in _LAYER_NAMES:
            raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"
    if stem not in _GLOBAL_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"{_GLOBAL_NAMES[stem]}.{suffix}"


def iterate_gguf_weights(path: str, hf_config: PretrainedConfig,
                         keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """(Hugging Face name, tensor) for every tensor: float32, dequantized, or with
    `keep_quantized` the 2-D tensors of the types in quantization.GGUF_TYPES as they are stored
    (a QuantizedWeight)."""
    arch = hf_config.model_type
    mapped = np.memmap(path, mode="r")
    for tensor in gguf_tensors(path):
        dtype = np.dtype(tensor.dtype)
        size = math.prod(tensor.shape) * dtype.itemsize
        data = mapped[tensor.offset : tensor.offset + size].view(dtype).reshape(tensor.shape)
        tensor_type = gguf.GGMLQuantizationType(tensor.tensor_type)
        name = hf_name(tensor.name)
        if keep_quantized and tensor_type.name in GGUF_TYPES and len(tensor.shape) == 2:
            block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
            rows, cols = tensor.shape[0], tensor.shape[1] // type_size * block_size
            weight = from_gguf(data, tensor_type, (rows, cols))
            if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = hf_config.num_attention_heads if "q_proj" in name else hf_config.num_key_value_heads
                order = _unpermute(np.arange(rows), heads)  # rows are independent: permute them
                weight = weight.rows(torch.from_numpy(np.ascontiguousarray(order)))
            yield name, weight
            continue
        try:
            array = gguf.quants.dequantize(data, tensor_type).astype(np.float32, copy=False)
        except NotImplementedError:
            raise ValueError(
                f"{path}: tensor {tensor.name} has GGUF type {tensor_type.name}, which the gguf "
                "package cannot dequantize; convert the model to F16, Q8_0, Q4_0, Q4_1 or a K-quant."
            ) from None
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = _unpermute(array, hf_config.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = _unpermute(array, hf_config.num_key_value_heads)
        if not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array, order="C")  # F32 tensors come back as views of the read-only map
        yield name, torch.from_numpy(array)


def cache_root() -> Path:
    return Path(os.environ.get("DISTSERVE_CACHE_DIR", Path.home() / ".cache" / "distserve"))


def gguf_cache_dir(path: str) -> Path:
    """Where the config and tokenizer converted from a GGUF file are kept."""
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / "gguf" / key[:16]


def gguf_tokenizer_dir(path: str) -> str:
    """A folder holding the GGUF's tokenizer in Hugging Face form, converted once and cached."""
    from transformers import AutoTokenizer

    target = gguf_cache_dir(path) / "tokenizer"
    if (target / "tokenizer_config.json").exists():
        return str(target)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
