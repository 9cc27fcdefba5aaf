"""Tiny random-weight checkpoints of every supported variant, with a small trained tokenizer,
and transformers' own greedy decoding as the reference."""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from distserve.config import DeploymentConfig, resolve_instances
from distserve.engine.instance import Instance
from distserve.engine.instance_loop import build_instance
from distserve.engine.messages import AddRequest
from distserve.sampling_params import SamplingParams
from distserve.weights.source import load_model_config

VOCAB = 512
EOS = "<|endoftext|>"
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or "
    "has had not but their its they one all been new more also two who other first time after year "
    "café naïve über 東京 日本語 données señor garçon ünïcödé emoji 😀 🚀 ✓ — “quoted” ‘single’"
).split()


def corpus(n: int = 4000) -> list[str]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, len(WORDS), (n, 12), generator=g).tolist()
    return [" ".join(WORDS[i] for i in row) + "." for row in idx]


@lru_cache(maxsize=1)
def trained_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) of VOCAB entries with a ChatML template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, chat_template=CHATML
    )


def _llama(**kw: object) -> LlamaConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        eos_token_id=0,
        bos_token_id=0,
    )
    base.update(kw)
    return LlamaConfig(**base)


def variant_config(name: str) -> PretrainedConfig:
    common = dict(vocab_size=VOCAB, eos_token_id=0, bos_token_id=0)
    if name == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    if name == "opt":
        return OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, word_embed_proj_dim=64, pad_token_id=1, **common,
        )
    if name == "opt-post-ln-proj":  # OPT-350m's shape: post-LN, project_in / project_out
        return OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, word_embed_proj_dim=32, do_layer_norm_before=False,
            pad_token_id=1, **common,
        )
    if name == "llama-mha":
        return _llama()
    if name == "llama-gqa":
        return _llama(num_key_value_heads=2, rope_theta=500000.0)
    if name == "llama-mqa":
        return _llama(num_key_value_heads=1, tie_word_embeddings=True)
    if name == "llama3-rope-scaling":
        return _llama(
            num_key_value_heads=2,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            },
        )
    if name == "llama-bias":
        return _llama(num_key_value_heads=2, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5)
    if name == "qwen2":
        return Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **common,
        )
    if name == "mistral":
        return MistralConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, sliding_window=None, **common,
        )
    raise KeyError(name)


VARIANTS = [
    "gpt2", "opt", "opt-post-ln-proj", "llama-mha", "llama-gqa", "llama-mqa",
    "llama3-rope-scaling", "llama-bias", "qwen2", "mistral",
]


def save_checkpoint(name: str, path: Path, safe_serialization: bool = True, max_shard_size: str | None = None) -> Path:
    """A random checkpoint of variant `name` with the tiny tokenizer, saved to `path`."""
    torch.manual_seed(sum(map(ord, name)))
    config = variant_config(name)
    model = AutoModelForCausalLM.from_config(config)
    kwargs = {"safe_serialization": safe_serialization}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    trained_tokenizer().save_pretrained(path)
    return path


def load_reference(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own forward with its KV cache, argmax each step, no logits processing."""
    ids = torch.tensor([prompt])
    out = model(ids, use_cache=True)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        out = model(torch.tensor([[nxt]]), cache=out.cache, use_cache=True)
    return tokens


def mixed_prompts(n: int, seed: int = 0, lengths: tuple[int, ...] = (1, 7, 15, 16, 17, 31, 33, 60)) -> list[list[int]]:
    """Prompts of lengths around block boundaries (block size 16), tokens away from specials."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (lengths[i % len(lengths)] + i // len(lengths),), generator=g).tolist() for i in range(n)]


def run_in_process(
    path: Path | str,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    mode: str = "colocated",
    **phase: object,
) -> tuple[list[list[int]], Instance]:
    """Run prompts through one in-process instance (scheduler, cache, runner, sampler);
    returns each prompt's generated ids and the instance, to inspect its blocks."""
    model = load_model_config(str(path))
    deployment = DeploymentConfig(model=str(path), mode=mode)
    for key, value in phase.items():
        setattr(deployment.colocated, key, value)
    instance = build_instance(model, resolve_instances(deployment, model)[0])
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        instance.handle(AddRequest(str(i), prompt, p, time.time(), frozenset({0})))
    outputs: list[list[int]] = [[] for _ in prompts]
    while instance.has_work():
        for event in instance.step():
            for token in getattr(event, "tokens", []):
                outputs[int(token.request_id)].append(token.token_id)
    return outputs, instance


def prompt_logits(instance: Instance, tokens: list[int], chunk: int | None = None) -> torch.Tensor:
    """The instance's model's logits at every position of `tokens`: one prefill over free
    blocks, or prefill chunks of `chunk` tokens, each after the cached part before it."""
    runner = instance.executor.runner
    blocks = list(range(-(-len(tokens) // runner.block_size)))
    logits = []
    for start in range(0, len(tokens), chunk or len(tokens)):
        count = min(chunk or len(tokens), len(tokens) - start)
        request = SimpleNamespace(num_computed_tokens=start, block_table=blocks, token_ids=tokens, num_tokens=len(tokens))
        input_ids, positions, meta, _, _ = runner.prepare(SimpleNamespace(requests=[request], num_new_tokens=[count]))
        with torch.inference_mode():
            logits.append(runner.model.compute_logits(runner.model(input_ids, positions, meta, None)))
    return torch.cat(logits).float()


def perplexity(instance: Instance, tokens: list[int], chunk: int | None = None) -> float:
    """Perplexity of `tokens` under the instance's model (see `prompt_logits`; chunks of a few
    rows a matmul run as decode steps do)."""
    nll = torch.nn.functional.cross_entropy(prompt_logits(instance, tokens, chunk)[:-1], torch.tensor(tokens[1:]))
    return math.exp(nll.item())



# Hugging Face name (after "model.layers.N.") -> GGUF name (after "blk.N."), as llama.cpp writes
_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script rotary permutation of Q/K rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def save_llama_gguf(hf_path: Path, out: Path, qtype: gguf.GGMLQuantizationType) -> Path:
    """Write a LLaMA checkpoint as GGUF the way llama.cpp does (permuted Q/K, quantized
    matrices, F32 norms, tokenizer and chat template in the metadata)."""
    model = load_reference(hf_path)
    cfg = model.config
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tok = trained_tokenizer()
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in (EOS, "<|im_start|>", "<|im_end|>") else 1 for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_chat_template(CHATML)
    for name, tensor in model.state_dict().items():
        data = tensor.numpy().astype(np.float32)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            part, suffix = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{_GGUF_LAYER[part]}.{suffix}"
            if part == "self_attn.q_proj":
                data = _permute(data, cfg.num_attention_heads)
            elif part == "self_attn.k_proj":
                data = _permute(data, cfg.num_key_value_heads)
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        kind = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.Q8_1:  # a type gguf cannot (de)quantize: raw bytes
            block, size = gguf.GGML_QUANT_SIZES[kind]
            raw = np.zeros((data.shape[0], data.shape[1] // block * size), dtype=np.uint8)
            writer.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=kind)
        else:
            writer.add_tensor(gname, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
