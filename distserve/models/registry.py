"""Which model class runs which Hugging Face architecture."""

from __future__ import annotations

from transformers import PretrainedConfig

from distserve.models.base import CausalLM
from distserve.models.gpt2 import GPT2LMHeadModel
from distserve.models.llama import LlamaForCausalLM
from distserve.models.opt import OPTForCausalLM

MODELS: dict[str, type[CausalLM]] = {
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "OPTForCausalLM": OPTForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
MODEL_TYPES: dict[str, type[CausalLM]] = {
    "gpt2": GPT2LMHeadModel,
    "opt": OPTForCausalLM,
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def model_class(config: PretrainedConfig) -> type[CausalLM]:
    for arch in getattr(config, "architectures", None) or []:
        if arch in MODELS:
            return MODELS[arch]
    if config.model_type in MODEL_TYPES:
        return MODEL_TYPES[config.model_type]
    archs = getattr(config, "architectures", None) or [config.model_type]
    raise ValueError(
        f"architecture {archs} is not supported; distserve runs {sorted(MODELS)}."
    )


def check_supported(config: PretrainedConfig) -> None:
    """Raise ValueError, saying what is supported, for a model distserve cannot run."""
    model_class(config)
    sliding = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types) and not sliding:
        raise ValueError(f"layer types {sorted(set(layer_types))} are not supported; only full attention.")
