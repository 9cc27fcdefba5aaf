"""The placement search: memory checks, both algorithms, and the placement file `serve` reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distserve.config import DeploymentConfig
from distserve.entrypoints.cli import build_parser
from distserve.entrypoints.cli_planner import cmd_plan  # noqa: F401 - the command under test is run through the parser
from distserve.planner.hardware import Cluster, fits_in_memory, model_shape
from distserve.planner.latency_model import FittedLatencyModel
from distserve.planner.search import Parallelism, PlanProblem, algorithm1, algorithm2, choose_mode

LENGTHS = [(200 + 37 * (i % 11), 50 + 13 * (i % 7)) for i in range(120)]


def problem(model: str = "facebook/opt-13b", cluster: str = "1x4xa100-80gb", latency: str = "published") -> PlanProblem:
    return PlanProblem(model_shape(model), Cluster.parse(cluster), LENGTHS, ttft=0.4, tpot=0.1, latency=latency, min_requests=100,
        max_requests=400)


def test_memory_infeasible_parallelism_is_never_a_candidate() -> None:
    p = problem("facebook/opt-66b", "1x8xa100-80gb", "analytical")
    shape, device = p.shape, p.cluster.device
    assert not fits_in_memory(shape, device, 1, 1, 2048)  # 132 GB of fp16 weights on one 80 GB device
    candidates = p.candidates(8)
    assert candidates and Parallelism(1, 1) not in candidates
    assert all(fits_in_memory(shape, device, c.tp, c.pp, 2048) for c in candidates)
    placement = algorithm2(p, rate=1.0, progress=False)
    for par in (placement.prefill, placement.decode):
        assert fits_in_memory(shape, device, par.tp, par.pp, max(a + b for a, b in LENGTHS))


def test_both_algorithms_choose_and_replicate() -> None:
    p = problem()
    one = algorithm1(p, rate=6.0, progress=False)
    two = algorithm2(p, rate=6.0, progress=False)
    for placement in (one, two):
        assert placement.goodput >= 6.0 and placement.devices <= 4
        assert placement.num_prefill >= 1 and placement.num_decode >= 1
    assert {c.kind for c in one.candidates} == {"prefill", "decode"} and {c.kind for c in two.candidates} == {"pair"}
    with pytest.raises(ValueError, match="devices|pairs"):
        algorithm2(p, rate=10_000.0, progress=False)


def test_placement_file_round_trips_into_serve(tmp_path) -> None:
    out = tmp_path / "placement.json"
    args = build_parser().parse_args([
        # two devices, not four: the file's round trip is under test, not the search (a third of the time)
        "plan", "--model", "facebook/opt-13b", "--cluster", "1x2xa100-80gb", "--latency", "published",
        "--ttft", "0.4", "--tpot", "0.1", "--rate", "2", "--algorithm", "2", "--workload", "synthetic:uniform:100:600:20:200",
        "--num-requests", "100", "--serve-model", "facebook/opt-13b", "--out", str(out), "--modes", "disaggregated",
    ])
    args.func(args)
    data = json.loads(out.read_text())
    assert data["plan"]["per_device_goodput"] > 0
    deployment = DeploymentConfig.load(out)
    assert deployment.mode == "disaggregated" and deployment.model == "facebook/opt-13b"
    assert deployment.prefill.tensor_parallel_size * deployment.prefill.pipeline_parallel_size >= 1
    from distserve.entrypoints.cli import deployment_from_args

    serve_args = build_parser().parse_args(["serve", "--config", str(out), "--decode-max-num-seqs", "64"])
    served = deployment_from_args(serve_args)
    assert served.prefill == deployment.prefill and served.decode.max_num_seqs == 64
    assert served.decode.tensor_parallel_size == deployment.decode.tensor_parallel_size
    # and `simulate` runs the same file (workload lengths from the built-in tokenizer)
    sim_out = tmp_path / "simulated.json"
    sim_args = build_parser().parse_args(sim_args_list(out, sim_out))
    sim_args.func(sim_args)
    rows = json.loads(sim_out.read_text())["rows"]
    assert [r["rate"] for r in rows] == [0.5, 1.0] and all(0.0 <= r["attainment"] <= 1.0 for r in rows)
    # on a machine 8x slower the same placement meets the SLOs less often
    slow_args = build_parser().parse_args([*sim_args_list(out, sim_out), "--latency-scale", "8"])
    slow_args.func(slow_args)
    slow = json.loads(sim_out.read_text())["rows"]
    assert [r["attainment"] for r in slow] < [r["attainment"] for r in rows]
    assert all(s["attainment"] <= r["attainment"] for s, r in zip(slow, rows))
    # on a machine whose speed wanders, each rate is the mean over draws of its speed
    drift_args = build_parser().parse_args([*sim_args_list(out, sim_out), "--speed-drift", "0.2", "--drift-samples", "3"])
    drift_args.func(drift_args)
    drifting = json.loads(sim_out.read_text())
    assert (drifting["speed_drift"], drifting["drift_samples"]) == (0.2, 3)
    assert [r["rate"] for r in drifting["rows"]] == [0.5, 1.0] and all(0.0 <= r["attainment"] <= 1.0 for r in drifting["rows"])
    bad = build_parser().parse_args([*sim_args_list(out, sim_out), "--speed-drift", "0.2", "--drift-samples", "0"])
    with pytest.raises(ValueError, match="--drift-samples >= 1"):
        bad.func(bad)


def sim_args_list(config: Path, out: Path) -> list[str]:
    return ["simulate", "--config", str(config), "--latency", "published", "--cluster", "1x4xa100-80gb", "--ttft", "0.4",
            "--tpot", "0.1", "--workload", "synthetic:uniform:100:600:20:200", "--num-requests", "50", "--rates", "0.5", "1",
            "--out", str(out)]


@pytest.mark.slow
def test_profile_fits_this_engine(checkpoints, tmp_path) -> None:
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, "-m", "distserve.entrypoints.cli", "profile", str(checkpoints("llama-gqa")),
                           "--quick", "--threads", "1", "--out", str(out), "--max-model-len", "512", "--quantization", "int4"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["meta"]["threads"] == 1 and len(data["prefill"]) == 3
    assert data["meta"]["quantization"] == "int4" and data["meta"]["weight_bytes"] > 0
    assert "fit error" in done.stdout


def synthetic_problem(tmp_path, prefill: tuple, decode: tuple, lengths: list, ttft: float, tpot: float, chunk: int) -> PlanProblem:
    """One CPU core per device, step times from a made-up profile."""
    path = tmp_path / "profile.json"
    FittedLatencyModel(prefill, decode, decode).save(path)
    return PlanProblem(model_shape("HuggingFaceTB/SmolLM2-135M-Instruct"), Cluster.parse("1x2xcpu"), lengths, ttft=ttft, tpot=tpot,
                       latency=f"fitted:{path}", min_requests=60, max_requests=200, iterations=4, chunk_size=chunk)


def test_the_mode_is_chosen_not_assumed(tmp_path) -> None:
    # prompts of 1 ms a token beside 10 ms decode steps and a 12 ms TPOT: a decode that shares a
    # step with a prompt misses it, so only disaggregated serves the rate
    only_apart = synthetic_problem(tmp_path, (0.0, 1e-3, 0.0), (0.01, 0.0, 0.0), [(400, 100)] * 10, 2.0, 0.012, 512)
    plans = choose_mode(only_apart, 1.0, progress=False)
    assert [str(p.mode) for p in plans] == ["disaggregated"]
    # cheap prompts in 64-token chunks beside decodes whose steps grow with the batch: one core
    # doing both phases in chunks serves the most per device
    shared = synthetic_problem(tmp_path, (0.0, 2e-4, 0.0), (0.005, 0.0, 5e-4), [(100, 200)] * 10, 1.0, 0.02, 64)
    plans = choose_mode(shared, 1.0, progress=False)
    assert str(plans[0].mode) == "chunked" and {str(p.mode) for p in plans} == {"chunked", "colocated", "disaggregated"}
    assert plans[0].per_device_goodput > max(p.per_device_goodput for p in plans[1:])
    deployment = plans[0].deployment("model", shared)
    assert deployment.mode == "chunked" and deployment.colocated.max_num_batched_tokens == 64


def test_a_colocated_mode_placement_file_round_trips_into_serve(tmp_path) -> None:
    out = tmp_path / "placement.json"
    args = build_parser().parse_args([
        "plan", "--model", "facebook/opt-13b", "--cluster", "1x2xa100-80gb", "--latency", "published", "--ttft", "0.4", "--tpot", "0.1",
        "--rate", "2", "--workload", "synthetic:uniform:100:600:20:200", "--num-requests", "100", "--out", str(out),
        "--modes", "colocated", "chunked",  # two devices, as above
    ])
    args.func(args)
    data = json.loads(out.read_text())
    assert set(data["plan"]["modes"]) == {"colocated", "chunked"} and data["plan"]["reason"]
    assert data["plan"]["vllm_profile_per_device_goodput"] > 0  # the published vLLM engine, labelled apart
    deployment = DeploymentConfig.load(out)
    assert str(deployment.mode) == data["plan"]["mode"] and deployment.colocated.num_instances >= 1
    from distserve.entrypoints.cli import deployment_from_args

    served = deployment_from_args(build_parser().parse_args(["serve", "--config", str(out)]))
    assert served.mode == deployment.mode and served.colocated == deployment.colocated
