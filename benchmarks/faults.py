"""Faults under load: `distserve serve --mode disaggregated` (one prefill and one decode
instance, the built-in model) serving Poisson arrivals at about 70% of its capacity while an
instance is killed (SIGKILL) every `--every` seconds, prefill and decode in turn.

Capacity is measured first: a burst of 32 requests at once, completed requests per second.
Requests draw prompts of 128-512 random tokens and 32-128 output tokens (EOS ignored), sent
by the project's streaming client. Reported: requests completed, failed (an error status or
error event: what a client sees when its instance dies under it) and hung (no end within
`--grace` seconds after the last arrival, must be 0); per kill, p99 TTFT of the requests sent
in the `--every` seconds before and after it, and the time until `/health` said healthy
again (the instance restarted and loaded).

    python -m benchmarks.faults [--minutes 10] [--every 60] [--load 0.7]

Prints the tables and writes benchmarks/results/faults.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import time
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from benchmarks.report import report
from distserve.bench.arrivals import arrival_times
from distserve.bench.client import run_requests, send_request
from distserve.bench.metrics import RequestRecord
from distserve.bench.runner import Server, distserve_command, free_port
from distserve.bench.workloads import BenchRequest

RESULTS = Path("benchmarks/results")


def draw(n: int, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [BenchRequest([rng.randrange(100, 49000) for _ in range(rng.randint(128, 512))], rng.randint(32, 128))
            for _ in range(n)]


def instance_pids(base_url: str) -> dict[str, int]:
    pids = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("distserve_instance_pid{"):
            labels, value = line.rsplit(" ", 1)
            name = labels.split('instance="', 1)[1].split('"', 1)[0]
            pids[name] = int(float(value))
    return pids


async def healthy(client: httpx.AsyncClient, base_url: str) -> bool:
    try:
        response = await client.get(f"{base_url}/health", timeout=2)
        return response.status_code == 200 and response.json()["status"] == "healthy"
    except httpx.HTTPError:
        return False


async def killer(base_url: str, every: float, until: float, kills: list[dict]) -> None:
    """Every `every` seconds kill an instance (prefill, then decode, ...), then time its recovery."""
    roles = ["prefill-0", "decode-0"]
    async with httpx.AsyncClient() as client:
        while True:
            await asyncio.sleep(every)
            if time.perf_counter() > until:
                return
            name = roles[len(kills) % 2]
            pid = (await asyncio.to_thread(instance_pids, base_url))[name]
            os.kill(pid, signal.SIGKILL)
            kill = {"instance": name, "time": time.perf_counter()}
            kills.append(kill)
            # recovered: a new process runs the instance and /health says healthy again
            while (await asyncio.to_thread(instance_pids, base_url)).get(name) == pid or not await healthy(client, base_url):
                await asyncio.sleep(0.1)
            kill["recovery_s"] = time.perf_counter() - kill["time"]


async def run(base_url: str, requests: list[BenchRequest], times: list[float], every: float,
              grace: float) -> tuple[list[RequestRecord | None], list[dict], float]:
    url = f"{base_url}/v1/completions"
    kills: list[dict] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        start = time.perf_counter()
        kill_task = asyncio.create_task(killer(base_url, every, start + times[-1], kills))
        tasks = []
        for when, request in tqdm(list(zip(times, requests)), desc="requests sent", unit="req"):
            delay = start + when - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send_request(client, url, None, request, {})))
        done, _ = await asyncio.wait(tasks, timeout=grace)
        kill_task.cancel()
        records = [t.result() if t in done else None for t in tasks]
        for task in tasks:
            task.cancel()
    return records, kills, start


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else (values[0] if values else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=60.0, help="seconds between kills")
    parser.add_argument("--load", type=float, default=0.7, help="share of the measured capacity to send")
    parser.add_argument("--grace", type=float, default=120.0, help="seconds after the last arrival a request may take")
    parser.add_argument("--model", default=None, help="default: the built-in model")
    args = parser.parse_args()
    port = free_port()
    # a restart budget for every kill of the run (the default, 3 in 10 minutes, would leave the
    # instance down after its fourth death, as it should in production)
    restarts = int(args.minutes * 60 / args.every) + 1
    command = distserve_command(port, f"--mode disaggregated --max-restarts {restarts}", args.model)
    with Server(command, port, RESULTS / "server-faults.log") as server:
        burst = draw(32, seed=1)
        start = time.perf_counter()
        warm = asyncio.run(run_requests(server.base_url, None, burst, [0.0] * len(burst), description="capacity"))
        capacity = sum(r.ok for r in warm) / (time.perf_counter() - start)
        rate = args.load * capacity
        count = max(2, int(rate * args.minutes * 60))
        requests = draw(count, seed=2)
        times = arrival_times(count, rate, "poisson", 1.0, 0)
        print(f"capacity {capacity:.2f} req/s; sending {count} requests at {rate:.2f} req/s, a kill every {args.every:g} s")
        records, kills, t0 = asyncio.run(run(server.base_url, requests, times, args.every, args.grace))
    completed = sum(1 for r in records if r is not None and r.ok)
    hung = sum(1 for r in records if r is None)
    failed = len(records) - completed - hung
    rows = []
    for kill in kills:
        def ttfts(lo: float, hi: float) -> list[float]:
            return [r.ttft for r in records if r is not None and r.ok and lo <= r.send_time < hi]

        before = ttfts(kill["time"] - args.every, kill["time"])
        after = ttfts(kill["time"], kill["time"] + args.every)
        failed_here = sum(1 for r in records if r is not None and not r.ok
                          and kill["time"] - args.every <= r.send_time < kill["time"] + 5)
        rows.append({"at_s": kill["time"] - t0, "instance": kill["instance"], "recovery_s": kill.get("recovery_s", float("nan")),
                     "p99_ttft_before_s": p99(before), "p99_ttft_after_s": p99(after), "failed_near": failed_here})
    print(f"requests: {len(records)} sent, {completed} completed, {failed} failed, {hung} hung")
    report(rows, [("kill at s", "at_s", ".0f"), ("instance", "instance", "s"), ("recovery s", "recovery_s", ".1f"),
                  ("p99 TTFT before s", "p99_ttft_before_s", ".2f"), ("p99 TTFT after s", "p99_ttft_after_s", ".2f"),
                  ("failed (sent up to 5 s after)", "failed_near", "d")],
           RESULTS / "faults.json", capacity_req_s=capacity, rate_req_s=rate, minutes=args.minutes, every_s=args.every,
           sent=len(records), completed=completed, failed=failed, hung=hung)


if __name__ == "__main__":
    main()
