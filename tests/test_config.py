"""Deployments from `LLM(...)`'s keyword arguments: instance counts, per-phase overrides, enums."""

from __future__ import annotations

import pytest
import torch

from distserve.config import (
    DEFAULT_MODE,
    GIB,
    Mode,
    PhaseConfig,
    Policy,
    PreemptionMode,
    Role,
    build_deployment,
    deployment_from,
    resolve_instances,
)
from distserve.engine.model_runner import kv_layout, num_kv_blocks
from distserve.weights.source import load_model_config


def test_instance_counts_come_from_either_place_and_must_agree() -> None:
    d = build_deployment(None, "disaggregated", num_prefill_instances=2, prefill=PhaseConfig(tensor_parallel_size=2))
    assert d.prefill.num_instances == 2 and d.prefill.tensor_parallel_size == 2
    d = build_deployment(None, "disaggregated", prefill=PhaseConfig(num_instances=3), decode={"num_instances": 2, "max_num_seqs": 8})
    assert (d.prefill.num_instances, d.decode.num_instances, d.decode.max_num_seqs) == (3, 2, 8)
    d = build_deployment(None, "disaggregated", num_decode_instances=2, decode={"max_num_seqs": 4}, max_num_seqs=16)
    assert (d.decode.num_instances, d.decode.max_num_seqs, d.prefill.max_num_seqs) == (2, 4, 16)
    with pytest.raises(ValueError, match="num_prefill_instances=2 contradicts prefill.num_instances=3"):
        build_deployment(None, "disaggregated", num_prefill_instances=2, prefill={"num_instances": 3})
    with pytest.raises(ValueError, match="unknown decode settings"):
        build_deployment(None, "disaggregated", decode={"batch": 4})


def test_modes_roles_and_policies_are_enums_parsed_from_their_names() -> None:
    d = build_deployment(None, "chunked", preemption_mode="swap")
    assert d.mode is Mode.CHUNKED and d.colocated.preemption_mode is PreemptionMode.SWAP
    assert d.phases() == (Role.COLOCATED,) and Mode.DISAGGREGATED.phases == (Role.PREFILL, Role.DECODE)
    assert build_deployment().mode is DEFAULT_MODE
    assert PhaseConfig(policy="sjf").policy is Policy.SJF
    assert f"{Mode.CHUNKED}" == "chunked" and Mode.CHUNKED == "chunked"
    with pytest.raises(ValueError, match=r"mode must be one of \['disaggregated', 'colocated', 'chunked'\]"):
        build_deployment(None, "pipelined")
    with pytest.raises(ValueError, match="sjf' is a prefill policy"):
        build_deployment(None, "disaggregated", decode={"policy": "sjf"})


def test_a_whole_config_or_keyword_arguments_not_both() -> None:
    config = build_deployment(None, "colocated", max_num_seqs=8)
    d = deployment_from("other-model", "disaggregated", config, {})
    assert d.model == "other-model" and d.mode is Mode.COLOCATED and config.model is None
    with pytest.raises(TypeError, match="not both"):
        deployment_from(None, DEFAULT_MODE, config, {"max_num_seqs": 4})


def test_instances_may_be_given_cores_and_share_them() -> None:
    """`--prefill-cpu-cores` / `--decode-cpu-cores` (taskset's syntax) pin each phase's instances;
    phases given the same cores share them; cores this process may not use are refused."""
    import argparse

    from distserve.config import available_cores, resolve_instances
    from distserve.entrypoints.cli import add_deployment_args, deployment_from_args

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_deployment_args(parser)
    cores = available_cores()
    both = f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0], cores[-1] + 1)) else ",".join(map(str, cores))
    args = parser.parse_args(["--mode", "disaggregated", "--prefill-cpu-cores", both, "--prefill-num-threads", str(len(cores)),
                              "--decode-cpu-cores", both, "--decode-num-threads", "1", "--decode-nice", "10"])
    config = deployment_from_args(args)
    prefill, decode = resolve_instances(config, None)
    assert prefill.cpu_cores == decode.cpu_cores == cores
    assert (prefill.num_threads, decode.num_threads) == (len(cores), 1)
    assert (prefill.phase.nice, decode.phase.nice) == (None, 10)
    assert prefill.take_turns and decode.take_turns  # phases on the same cores step in turns
    config.time_share_cores = False
    assert not any(i.take_turns for i in resolve_instances(config, None))
    if len(cores) > 1:  # a core each: nothing shared, no turns unless asked
        apart = deployment_from_args(parser.parse_args(["--mode", "disaggregated", "--prefill-cpu-cores", str(cores[0]),
                                                        "--decode-cpu-cores", str(cores[1])]))
        assert not any(i.take_turns for i in resolve_instances(apart, None))
        apart.time_share_cores = True
        assert all(i.take_turns for i in resolve_instances(apart, None))
    # more workers than cores: none is pinned, so every instance runs on all of them
    crowded = deployment_from_args(parser.parse_args(["--mode", "disaggregated", "--device", "cpu",
                                                      "--prefill-tensor-parallel-size", str(len(cores) + 1)]))
    assert all(i.cpu_cores is None and i.take_turns for i in resolve_instances(crowded, None))
    with pytest.raises(ValueError, match="time_share_cores needs the local backend"):
        deployment_from_args(parser.parse_args(["--mode", "disaggregated", "--backend", "ray", "--time-share-cores"]))
    for bad in ("20", "-1"):
        with pytest.raises(ValueError, match="decode.nice must be an integer from 0"):
            deployment_from_args(parser.parse_args(["--mode", "disaggregated", "--decode-nice", bad]))
    with pytest.raises(argparse.ArgumentError, match="cores must look like 0-3,8"):
        parser.parse_args(["--decode-cpu-cores", "0-x"])
    with pytest.raises(ValueError, match="decode.cpu_cores must name cores this process may run on"):
        deployment_from_args(parser.parse_args(["--mode", "disaggregated", "--decode-cpu-cores", str(max(cores) + 1000)]))


def test_the_default_kv_budget_is_4_gib_1_for_prefill_or_what_the_sequences_can_fill(checkpoints) -> None:
    model = load_model_config(str(checkpoints("llama-gqa")), max_model_len=100)
    instance = resolve_instances(build_deployment(str(checkpoints("llama-gqa")), "colocated", max_num_seqs=3), model)[0]
    assert num_kv_blocks(model, instance, torch.device("cpu")) == 3 * 7  # 3 sequences of 7 blocks of 16
    huge = resolve_instances(build_deployment(str(checkpoints("llama-gqa")), "colocated", max_num_seqs=1 << 20), model)[0]
    per_block = kv_layout(model, huge, 1).bytes_per_block
    assert num_kv_blocks(model, huge, torch.device("cpu")) == int(4 * GIB // per_block)
    given = resolve_instances(build_deployment(str(checkpoints("llama-gqa")), "colocated", max_num_seqs=3, kv_cache_gb=0.01), model)[0]
    assert num_kv_blocks(model, given, torch.device("cpu")) == int(0.01 * GIB // per_block)  # a budget given is taken whole
    prefill, decode = resolve_instances(build_deployment(str(checkpoints("llama-gqa")), "disaggregated", max_num_seqs=1 << 20), model)
    assert num_kv_blocks(model, prefill, torch.device("cpu")) == int(1 * GIB // per_block)  # it holds prompts until pulled
    assert num_kv_blocks(model, decode, torch.device("cpu")) == int(4 * GIB // per_block)
