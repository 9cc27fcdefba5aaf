"""Prefix caching, side by side on this machine (SmolLM2-135M float32, both cores per system):

1. system-prompt: a 1,000-token system prompt shared by every request, then a short question
   (synthetic-chat:1000:1:24:32, one turn per conversation): p50 TTFT of distserve colocated
   with its prefix cache, without it, and vLLM with its prefix cache on.
2. multi-turn: ShareGPT conversations replayed turn by turn (each turn sent a think time after
   the last answer, with that answer in its prompt): goodput of distserve colocated and
   1P+1D (cache-aware routing, conditional disaggregation; a core a phase, and both phases on
   both cores taking turns by step) against vLLM with its prefix cache on, the same
   conversations and arrivals; the share of prompt tokens each served from cache.

Multi-turn SLOs are 10x the unloaded latency of first turns: at 5x a first turn of a few
hundred uncached tokens misses TTFT on an idle server, in every system alike, so that no
system reaches 90% at any rate. Every run starts with the servers' prefix caches empty (the runner POSTs /reset_prefix_cache
before each rate; vLLM serves that route in its dev mode), so no rate reuses the prompts an
earlier rate sent.

    python -m benchmarks.prefix_cache [--vllm-python /tmp/vllm-venv/bin/python] [--only system-prompt]

Results in benchmarks/results/prefix_cache/<part>/ (summary.json, plots) and the table in
benchmarks/results/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.checkpoints import smollm2_folder
from benchmarks.report import report
from distserve.config import available_cores

RESULTS = Path("benchmarks/results/prefix_cache")
ALL_CORES = ",".join(map(str, available_cores()))
DISTSERVE = [sys.executable, "-m", "distserve.entrypoints.cli"]
# dev mode: vLLM's POST /reset_prefix_cache, which the runner calls before each run
VLLM_ENV = "VLLM_SERVER_DEV_MODE=1 VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_TARGET_DEVICE=cpu VLLM_LOGGING_LEVEL=WARNING"
PARTS = {
    "system-prompt": {
        "systems": ["cache=--mode colocated", "no-cache=--mode colocated --no-enable-prefix-caching"],
        "args": ["--workload", "synthetic-chat:1000:1:24:32", "--num-requests", "24", "--rates", "0.5",
                 "--ttft", "5", "--tpot", "1"],
    },
    "multi-turn": {
        # 1P+1D twice: a core a phase (the default split), and both phases on both cores taking
        # turns by step (--time-share-cores, on where cores overlap)
        "systems": ["colocated", "disaggregated",
                    f"1P1D-shared=--mode disaggregated --prefill-cpu-cores {ALL_CORES} --decode-cpu-cores {ALL_CORES}"],
        "args": ["--workload", "sharegpt-chat", "--num-requests", "16", "--max-turns", "4", "--think-time", "1",
                 "--max-prompt-len", "512", "--rates", "0.1", "0.2", "0.4", "--slo-multiple", "10"],
    },
}


def run_part(model: Path, name: str, vllm_python: str) -> None:
    part = PARTS[name]
    out = RESULTS / name
    command = DISTSERVE + ["bench", "compare", str(model), "--systems", *part["systems"], *part["args"],
                           "--server-args", "--max-model-len 2048", "--max-model-len", "2048", "--devices", "2", "--out", str(out)]
    if Path(vllm_python).exists():
        command += ["--vllm-command", f"{VLLM_ENV} {vllm_python} -m vllm.entrypoints.openai.api_server --model {model} "
                    "--dtype float32 --max-model-len 2048 --enable-prefix-caching --enable-prompt-tokens-details --port {port}"]
    else:
        print(f"vLLM skipped: {vllm_python} not found")
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    parser.add_argument("--only", choices=sorted(PARTS), default=None)
    parser.add_argument("--models-dir", default="/tmp/distserve-bench-models")
    parser.add_argument("--table-only", action="store_true", help="only the table, from the results of the last runs")
    args = parser.parse_args()
    if not args.table_only:
        model = smollm2_folder(Path(args.models_dir))
        for name in PARTS:
            if not args.only or name == args.only:
                run_part(model, name, args.vllm_python)
    rows = []
    for name in PARTS:  # every part measured here (the raw results stay on the machine that ran them)
        path = RESULTS / name / "results.json"
        if not path.exists():
            continue
        for system, result in json.loads(path.read_text())["systems"].items():
            for run in result["runs"]:
                ttfts = [r["ttft"] for r in run["requests"] if r["ttft"] is not None]
                rows.append({
                    "part": name, "system": system, "rate": run["rate"], "attainment": run["attainment"],
                    "p50_ttft_ms": 1e3 * statistics.median(ttfts) if ttfts else float("nan"),
                    "cached_share": run["cached_prompt_share"], "goodput": result["goodput"],
                })
    report(rows, [("part", "part", "<14"), ("system", "system", "<14"), ("rate", "rate", ".3g"), ("attainment", "attainment", ".1%"),
                  ("p50 TTFT ms", "p50_ttft_ms", ".0f"), ("cached", "cached_share", ".1%"), ("goodput", "goodput", ".3f")],
           "benchmarks/results/prefix_cache.json", model="SmolLM2-135M-Instruct float32", cores=2)

if __name__ == "__main__":
    main()
