"""`distserve bench compare --quick` end to end against real distserve servers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_compare_quick_writes_results_and_plots(checkpoints, tmp_path) -> None:
    out = tmp_path / "bench"
    command = [
        sys.executable, "-m", "distserve.entrypoints.cli", "bench", "compare", str(checkpoints("llama-gqa")),
        "--systems", "disaggregated", "colocated", "--quick", "--workload", "synthetic:uniform:8:40:4:16",
        "--rates", "4", "--ttft", "2", "--tpot", "0.5", "--out", str(out), "--server-args", "--max-model-len 256",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((out / "results.json").read_text())
    assert set(data["systems"]) == {"disaggregated", "colocated"}
    for system in data["systems"].values():
        run = system["runs"][0]
        assert run["rate"] == 4 and len(run["requests"]) == 8 and run["errors"] == 0
        assert all(r["num_tokens"] == r["output_len"] and r["ttft"] > 0 for r in run["requests"])
        assert 0.0 <= run["attainment"] <= 1.0 and system["per_device_goodput"] >= 0
    assert all(r["transfer_seconds"] is not None for r in data["systems"]["disaggregated"]["runs"][0]["requests"])
    summary = json.loads((out / "summary.json").read_text())  # the same, without the requests
    for name, system in summary["systems"].items():
        assert [{k: v for k, v in r.items() if k != "requests"} for r in data["systems"][name]["runs"]] == system["runs"]
        assert system["goodput"] == data["systems"][name]["goodput"]
    for plot in ("attainment_vs_rate.png", "attainment_vs_slo_scale.png", "latency_breakdown.png", "kv_transfer_cdf.png"):
        assert (out / plot).stat().st_size > 1000
    assert "goodput" in done.stdout


def test_a_chat_workload_is_replayed_turn_by_turn_and_hits_the_prefix_cache(checkpoints, tmp_path) -> None:
    out = tmp_path / "chat"
    command = [
        sys.executable, "-m", "distserve.entrypoints.cli", "bench", "compare", str(checkpoints("llama-gqa")),
        "--systems", "colocated", "--workload", "synthetic-chat:48:3:8:6", "--num-requests", "4", "--think-time", "0.05",
        "--rates", "2", "--ttft", "2", "--tpot", "0.5", "--out", str(out), "--server-args", "--max-model-len 256",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((out / "results.json").read_text())
    assert data["workload"]["conversations"] == 4 and data["workload"]["requests"] == 12
    run = data["systems"]["colocated"]["runs"][0]
    assert run["errors"] == 0 and len(run["requests"]) == 12
    # each conversation's turns in order: its prompt the last one's, the answer and a new message
    prompts = sorted(r["prompt_len"] for r in run["requests"])
    assert prompts[:4] == [56] * 4 and max(prompts) >= 56 + 2 * (8 + 6) - 4
    # the shared system prompt and every earlier turn come from the prefix cache
    assert run["cached_prompt_share"] > 0.5
    assert all(r["cached_tokens"] >= 48 for r in run["requests"] if r["prompt_len"] > 56)
