"""Hugging Face folders in every layout load the same weights; bad model names are clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from distserve.sampling_params import SamplingParams
from distserve.weights.source import load_model_config
from tests.tiny_models import hf_greedy, load_reference, mixed_prompts, run_in_process, save_checkpoint

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.mark.parametrize(
    "layout",
    [
        dict(safe_serialization=True, max_shard_size="100KB"),  # sharded safetensors with an index
        dict(safe_serialization=False),  # pytorch_model.bin
        dict(safe_serialization=False, max_shard_size="100KB"),  # sharded .bin with an index
    ],
)
def test_checkpoint_layouts(tmp_path, layout: dict) -> None:
    path = save_checkpoint("llama-gqa", tmp_path / "ckpt", **layout)
    files = sorted(p.name for p in path.iterdir())
    if layout.get("max_shard_size"):
        assert any(name.endswith(".index.json") for name in files), files
    prompts = mixed_prompts(4)
    expected = [hf_greedy(load_reference(path), p, 16) for p in prompts]
    got, _ = run_in_process(path, prompts, GREEDY, num_kv_blocks=32)
    assert got == expected


def test_unknown_path_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not a local folder"):
        load_model_config("./no/such/model/here")


def test_hub_id_without_network_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not fetch 'nobody-xyz/no-such-model'"):
        load_model_config("nobody-xyz/no-such-model")


def test_unsupported_architecture_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="not supported"):
        load_model_config(str(tmp_path))


def test_folder_without_config_is_a_clear_error(tmp_path) -> None:
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no config.json"):
        load_model_config(str(tmp_path))


def test_max_model_len_beyond_context_is_a_clear_error(checkpoints) -> None:
    with pytest.raises(ValueError, match="longer than the model's context"):
        load_model_config(str(checkpoints("gpt2")), max_model_len=100_000)
