"""The DistServe paper's three chatbot cases through the planner: for each model, the best
placement of every mode (disaggregated, colocated, chunked prefill) and its goodput per GPU,
under the analytical model calibrated on the published A100 steps and under the published
profiles themselves (OPT-13B and OPT-66B: the authors published none of OPT-175B), next to the
paper's measured ratio. Like is compared with like: every mode on the same latency model; the
2023 vLLM engine's own published profile is a separate, labelled row.

    python -m benchmarks.planner_cases [--num-requests 300]

Writes benchmarks/results/planner_cases.json and the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import report

# model, SLOs (TTFT, TPOT) as the paper's chatbot figures set them, the rate to plan for
CASES = [
    ("facebook/opt-13b", 0.25, 0.1, 8.0),
    ("facebook/opt-66b", 2.5, 0.15, 4.0),
    ("facebook/opt-175b", 4.0, 0.2, 2.0),
]
PAPER = "chatbot goodput vs vLLM: 2.0-4.6x (measured, ShareGPT)"


def plan(model: str, ttft: float, tpot: float, rate: float, latency: str, requests: int, out: Path) -> dict:
    command = [sys.executable, "-m", "distserve.entrypoints.cli", "plan", "--model", model, "--cluster", "4x8xa100-80gb",
               "--latency", latency, "--workload", "sharegpt-multiturn", "--num-requests", str(requests), "--max-prompt-len", "2048",
               "--max-model-len", "2048", "--ttft", str(ttft), "--tpot", str(tpot), "--rate", str(rate), "--out", str(out)]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads(out.read_text())["plan"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=300)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, ttft, tpot, rate in CASES:
            for latency in ("analytical", "published"):
                if latency == "published" and model.endswith("175b"):
                    continue
                result = plan(model, ttft, tpot, rate, latency, args.num_requests, Path(tmp) / "plan.json")
                modes = result["modes"]
                base = {"model": model.split("/")[-1], "slos": f"{ttft:g} / {tpot:g}", "latency": latency, "chosen": result["mode"]}
                for mode, m in modes.items():
                    rows.append({**base, "mode": mode, "placement": m["placement"], "per_gpu": m["per_device_goodput"],
                                 "vs_colocated": m["per_device_goodput"] / modes["colocated"]["per_device_goodput"]
                                 if "colocated" in modes else float("nan")})
                if result.get("vllm_profile_per_device_goodput"):
                    vllm = result["vllm_profile_per_device_goodput"]
                    rows.append({**base, "mode": "vLLM profile", "placement": "colocated, published vLLM engine", "per_gpu": vllm,
                                 "vs_colocated": float("nan")})
                    rows[-1]["disaggregated_vs_vllm"] = modes.get("disaggregated", {}).get("per_device_goodput", 0.0) / vllm
    report(rows, [("model", "model", "<9"), ("SLOs s", "slos", "<11"), ("latency", "latency", "<10"), ("mode", "mode", "<14"),
                  ("placement", "placement", "<58"), ("per GPU", "per_gpu", ".3f"), ("/colocated", "vs_colocated", ".2f"),
                  ("chosen", "chosen", "<13")],
           "benchmarks/results/planner_cases.json", cluster="4x8xa100-80gb", workload="sharegpt-multiturn", paper=PAPER)


if __name__ == "__main__":
    main()
