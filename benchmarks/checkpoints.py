"""The models the benchmarks run, made once into a folder of Hugging Face checkpoints: the
built-in SmolLM2-135M dequantized to float32 (so every system reads the same weights), and
random-weight checkpoints of given shapes with a tokenizer that covers their vocabulary."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def smollm2_folder(root: Path) -> Path:
    """The built-in GGUF as a float32 Hugging Face folder (made once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distserve.weights.source import builtin_model_path

    target = root / "smollm2-135m-f32"
    if (target / "config.json").exists():
        return target
    path = builtin_model_path()
    loaded = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    config = loaded.config
    config.__dict__.pop("quantization_config", None)  # transformers will not save a GGUF-loaded model as is
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).save_pretrained(target)
    return target


def random_checkpoint(root: Path, name: str, config, dtype: torch.dtype = torch.float32) -> Path:  # noqa: ANN001 - a PretrainedConfig
    """A random-weight checkpoint of `config` in root/name (made once, seeded), with SmolLM2's
    tokenizer padded to the model's vocabulary, so that every id the model can produce decodes
    and every id a client draws from the tokenizer is in the model's vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = root / name
    if (target / "config.json").exists():
        return target
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(root))
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"{name}: vocabulary {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)}.")
    tokenizer.add_tokens([f"<pad_{i}>" for i in range(config.vocab_size - len(tokenizer))])
    tokenizer.save_pretrained(target)
    return target


def opt125m_folder(root: Path) -> Path:
    """A random checkpoint of OPT-125m's shape."""
    from transformers import OPTConfig

    config = OPTConfig(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=50272,
                       max_position_embeddings=2048, word_embed_proj_dim=768)
    return random_checkpoint(root, "opt-125m-random", config)
