"""Running a workload against servers: one system at several rates (and a bisection for
its goodput), several systems started one after another, and the report of it all."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from distserve.bench.arrivals import arrival_times
from distserve.bench.client import run_conversations, run_requests
from distserve.bench.metrics import (
    Attainment,
    RequestRecord,
    goodput_from_curve,
    search_goodput,
    slo_attainment,
    slo_scale,
)
from distserve.bench.workloads import BenchRequest, Conversation

Workload = list[BenchRequest] | list[Conversation]

BREAKDOWN = ("prefill_queueing", "prefill_execution", "transfer_queueing", "transfer", "decode_queueing", "decode_execution")


@dataclass
class BenchSettings:
    rates: list[float]
    ttft_slo: float
    tpot_slo: float
    arrival: str = "poisson"
    cv: float = 1.0
    seed: int = 0
    target: float = 0.9
    search_iterations: int = 0  # bisection steps after the rate grid
    progress: bool = True
    max_extensions: int = 3  # with a search: rates x1.5 above the grid while all of it passes
    think_time: float = 0.0  # chat workloads: seconds between an answer and the next turn
    tokenizer: object = None  # chat workloads: reads the answers into the next prompts


@dataclass
class RunResult:
    rate: float
    records: list[RequestRecord]
    attainment: Attainment


@dataclass
class SystemResult:
    name: str
    devices: int
    runs: list[RunResult] = field(default_factory=list)

    def curve(self) -> tuple[list[float], list[float]]:
        runs = sorted(self.runs, key=lambda r: r.rate)
        return [r.rate for r in runs], [r.attainment.both for r in runs]

    def goodput(self, target: float) -> float:
        return goodput_from_curve(*self.curve(), target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process started for a benchmark, stopped (with its children) afterwards."""

    def __init__(self, command: list[str], port: int, log: Path, timeout: float = 900.0, env: dict | None = None) -> None:
        self.command, self.port, self.log_path, self.timeout, self.env = command, port, log, timeout, env
        self.base_url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + self.timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with code {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.base_url}/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"server did not answer within {self.timeout:.0f} s; see {self.log_path}")
            time.sleep(1.0)

    def model_name(self) -> str:
        return httpx.get(f"{self.base_url}/v1/models", timeout=10).json()["data"][0]["id"]

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def distserve_command(port: int, args: str, model: str | None) -> list[str]:
    command = [sys.executable, "-m", "distserve.entrypoints.cli", "serve", "--port", str(port)]
    if model:
        command.append(model)
    return command + shlex.split(args)


def run_rate(base_url: str, model: str | None, requests: Workload, rate: float, settings: BenchSettings,
             label: str, api_key: str | None = None) -> list[RequestRecord]:
    """Every request (or conversation: `rate` is then new conversations per second) once."""
    if requests and isinstance(requests[0], Conversation):
        times = arrival_times(len(requests), rate, settings.arrival, settings.cv, settings.seed)
        return asyncio.run(run_conversations(base_url, model, requests, times, settings.tokenizer, settings.think_time, api_key,
                                             f"{label} @ {rate:g} conv/s", settings.progress))
    trace = [r.arrival_time for r in requests] if settings.arrival == "trace" else None
    times = arrival_times(len(requests), rate, settings.arrival, settings.cv, settings.seed, trace)
    return asyncio.run(run_requests(base_url, model, requests, times, api_key, f"{label} @ {rate:g} req/s", settings.progress))


def reset_prefix_cache(base_url: str, api_key: str | None = None) -> bool:
    """POST /reset_prefix_cache (distserve's, or vLLM's with VLLM_SERVER_DEV_MODE=1), so that a
    run starts with no prompt cached by the runs before it; False when the server has no such
    route or refused."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        return httpx.post(f"{base_url}/reset_prefix_cache", headers=headers, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def calibrate(base_url: str, model: str | None, requests: Workload, api_key: str | None = None,
              count: int = 8) -> tuple[float, float]:
    """Median TTFT and TPOT of requests sent one at a time (the unloaded latency; of a
    conversation, its first turn)."""
    if requests and isinstance(requests[0], Conversation):
        requests = [BenchRequest(c.system_token_ids + c.turns[0][0], c.turns[0][1]) for c in requests]
    ttfts, tpots = [], []
    for request in requests[:count]:
        record = asyncio.run(run_requests(base_url, model, [request], [0.0], api_key, progress=False))[0]
        if not record.ok:
            raise RuntimeError(f"calibration request failed: {record.error}")
        ttfts.append(record.ttft)
        tpots.append(record.tpot)
    return statistics.median(ttfts), statistics.median(tpots)


def benchmark_system(base_url: str, model: str | None, requests: Workload, settings: BenchSettings,
                     name: str, devices: int, api_key: str | None = None) -> SystemResult:
    """Run every rate of the grid, then bisect between the last passing and first failing rate."""
    result = SystemResult(name, devices)

    def attainment_at(rate: float) -> float:
        if not reset_prefix_cache(base_url, api_key):  # the runs before would have warmed it
            print(f"{name}: the prefix cache could not be reset; this run may reuse prompts of earlier runs", flush=True)
        records = run_rate(base_url, model, requests, rate, settings, name, api_key)
        run = RunResult(rate, records, slo_attainment(records, settings.ttft_slo, settings.tpot_slo))
        result.runs.append(run)
        return run.attainment.both

    tested: dict[float, float] = {}
    for rate in sorted(settings.rates):
        tested[rate] = attainment_at(rate)
    # every rate met the target: the goodput lies above the grid, go up until one fails
    for _ in range(settings.max_extensions if settings.search_iterations else 0):
        top = max(tested)
        if tested[top] < settings.target:
            break
        tested[top * 1.5] = attainment_at(top * 1.5)
    passing = [r for r in sorted(tested) if tested[r] >= settings.target]
    failing = [r for r in sorted(tested) if tested[r] < settings.target and (not passing or r > passing[-1])]
    if settings.search_iterations and passing and failing:
        search_goodput(attainment_at, passing[-1], failing[0], settings.target, settings.search_iterations, tested)
    return result


def breakdown(records: list[RequestRecord]) -> dict[str, float]:
    """Mean seconds of each stage, from the server's request timelines (distserve)."""
    stages: dict[str, list[float]] = {k: [] for k in BREAKDOWN}
    for r in records:
        m = r.server_metrics
        if not m:
            continue
        transfer = (m.get("migration_end_time") or 0) - (m.get("migration_start_time") or 0) if m.get("migration_start_time") else 0.0
        values = {
            "prefill_queueing": m.get("prefill_queueing"),
            "prefill_execution": m.get("prefill_execution"),
            "transfer_queueing": m.get("transfer_queueing") if m.get("migration_start_time") else 0.0,
            "transfer": transfer,
            "decode_queueing": m.get("decode_queueing") if m.get("migration_start_time") else 0.0,
            "decode_execution": m.get("decode_execution"),
        }
        for key, value in values.items():
            if value is not None:
                stages[key].append(value)
    return {k: statistics.fmean(v) for k, v in stages.items() if v}


def report(systems: list[SystemResult], settings: BenchSettings, workload: dict, scale_rate: float | None = None) -> dict:
    """Everything measured, as JSON-ready data."""
    out: dict = {
        "settings": {
            "ttft_slo": settings.ttft_slo, "tpot_slo": settings.tpot_slo, "target": settings.target,
            "arrival": settings.arrival, "cv": settings.cv, "rates": settings.rates, "seed": settings.seed,
        },
        "workload": workload,
        "systems": {},
    }
    for system in systems:
        runs = sorted(system.runs, key=lambda r: r.rate)
        at = min(runs, key=lambda r: abs(r.rate - (scale_rate or runs[0].rate)))
        goodput = system.goodput(settings.target)
        out["systems"][system.name] = {
            "devices": system.devices,
            "goodput": goodput,
            "per_device_goodput": goodput / system.devices,
            "slo_scale": {"rate": at.rate, "scale": slo_scale(at.records, settings.ttft_slo, settings.tpot_slo, settings.target)},
            "breakdown": {"rate": at.rate, "seconds": breakdown(at.records)},
            "runs": [
                {
                    "rate": r.rate,
                    "attainment": r.attainment.both,
                    "ttft_attainment": r.attainment.ttft,
                    "tpot_attainment": r.attainment.tpot,
                    "errors": sum(1 for rec in r.records if rec.error),
                    "cached_prompt_share": sum(rec.cached_tokens for rec in r.records) / max(1, sum(rec.prompt_len for rec in r.records)),
                    "requests": [
                        {
                            "prompt_len": rec.prompt_len, "output_len": rec.output_len, "num_tokens": rec.num_tokens,
                            "cached_tokens": rec.cached_tokens,
                            "ttft": rec.ttft if rec.ok else None, "tpot": rec.tpot if rec.ok else None,
                            "e2e": rec.e2e if rec.ok else None, "error": rec.error,
                            "transfer_seconds": (rec.server_metrics or {}).get("transfer_seconds"),
                            "server": {k: (rec.server_metrics or {}).get(k) for k in BREAKDOWN if rec.server_metrics},
                        }
                        for rec in r.records
                    ],
                }
                for r in runs
            ],
        }
    return out


def print_report(data: dict) -> None:
    s = data["settings"]
    print(f"\nSLOs: TTFT {s['ttft_slo'] * 1e3:.0f} ms, TPOT {s['tpot_slo'] * 1e3:.0f} ms, "
          f"target {s['target']:.0%} ({s['arrival']} arrivals)")
    names = list(data["systems"])
    rates = sorted({run["rate"] for sys_ in data["systems"].values() for run in sys_["runs"]})
    header = f"{'rate (req/s)':>12} " + " ".join(f"{n[:16]:>16}" for n in names)
    print("SLO attainment (TTFT and TPOT both met)")
    print(header)
    for rate in rates:
        cells = []
        for n in names:
            run = next((r for r in data["systems"][n]["runs"] if r["rate"] == rate), None)
            cells.append(f"{run['attainment']:>16.1%}" if run else f"{'-':>16}")
        print(f"{rate:>12.3g} " + " ".join(cells))
    base = names[0]
    base_goodput = data["systems"][base]["per_device_goodput"]
    print(f"\n{'system':<24} {'goodput':>9} {'per device':>11} {'vs ' + base[:12]:>16} {'SLO scale':>10}")
    for n in names:
        sys_ = data["systems"][n]
        ratio = sys_["per_device_goodput"] / base_goodput if base_goodput else float("inf")
        print(f"{n:<24} {sys_['goodput']:>9.3f} {sys_['per_device_goodput']:>11.3f} {ratio:>15.2f}x {sys_['slo_scale']['scale']:>10.2f}")


def save(data: dict, out_dir: Path) -> Path:
    """results.json (everything, every request included) and summary.json (the same without
    the requests: what a results table needs, small enough to keep in git)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(data, indent=1))
    (out_dir / "summary.json").write_text(json.dumps(summarize(data), indent=1))
    return path


def summarize(data: dict) -> dict:
    """A report without its per-request records."""
    systems = {
        name: {**system, "runs": [{k: v for k, v in run.items() if k != "requests"} for run in system["runs"]]}
        for name, system in data["systems"].items()
    }
    return {**data, "systems": systems}
