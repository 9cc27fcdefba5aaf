"""SLO attainment, goodput and SLO scale, from per-request latencies.

A request meets the SLOs when its TTFT and its TPOT ((last - first token time) / (n - 1),
as DistServe defines it) are both within them; failed requests never do. Goodput is the
highest rate whose attainment reaches the target; SLO scale is the tightest multiple of
both SLOs that the target is still reached at, for one run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """What the client saw of one request (seconds; token times are absolute)."""

    prompt_len: int
    output_len: int
    send_time: float
    token_times: list[float] = field(default_factory=list)
    num_tokens: int = 0
    error: str | None = None
    server_metrics: dict | None = None
    cached_tokens: int = 0  # prompt tokens the server's prefix cache served (usage.prompt_tokens_details)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.send_time if self.ok else math.inf

    @property
    def tpot(self) -> float:
        return tpot(self.token_times[0], self.token_times[-1], self.num_tokens) if self.ok else math.inf

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.send_time if self.ok else math.inf


def tpot(first: float, last: float, num_tokens: int) -> float:
    """(last - first) / (n - 1); 0 for a single token."""
    return 0.0 if num_tokens < 2 else (last - first) / (num_tokens - 1)


@dataclass(frozen=True)
class Attainment:
    both: float
    ttft: float
    tpot: float


def slo_attainment(records: Sequence[RequestRecord], ttft_slo: float, tpot_slo: float, scale: float = 1.0) -> Attainment:
    if not records:
        return Attainment(0.0, 0.0, 0.0)
    t, p = ttft_slo * scale, tpot_slo * scale
    n = len(records)
    ttft_ok = [r.ttft <= t for r in records]
    tpot_ok = [r.tpot <= p for r in records]
    return Attainment(
        both=sum(a and b for a, b in zip(ttft_ok, tpot_ok)) / n,
        ttft=sum(ttft_ok) / n,
        tpot=sum(tpot_ok) / n,
    )


def slo_scale(records: Sequence[RequestRecord], ttft_slo: float, tpot_slo: float, target: float = 0.9) -> float:
    """The smallest s with attainment(s * SLOs) >= target: the target quantile of each
    request's worst ratio max(ttft / TTFT_SLO, tpot / TPOT_SLO)."""
    if not records:
        return math.inf
    worst = sorted(max(r.ttft / ttft_slo, r.tpot / tpot_slo) for r in records)
    return worst[max(0, math.ceil(target * len(worst)) - 1)]


def search_goodput(
    attainment_at: Callable[[float], float],
    low: float,
    high: float,
    target: float = 0.9,
    iterations: int = 6,
    tested: dict[float, float] | None = None,
) -> float:
    """Highest rate in [low, high] whose attainment reaches `target`, by bisection
    (attainment falls as the rate grows). Returns 0 if even `low` misses; `high` if it
    passes. `tested` collects every probed rate and its attainment."""
    tested = {} if tested is None else tested

    def probe(rate: float) -> bool:
        if rate not in tested:
            tested[rate] = attainment_at(rate)
        return tested[rate] >= target

    if not probe(low):
        return 0.0
    if probe(high):
        return high
    for _ in range(iterations):
        mid = (low + high) / 2
        if probe(mid):
            low = mid
        else:
            high = mid
    return low


def goodput_from_curve(rates: Sequence[float], attainments: Sequence[float], target: float = 0.9) -> float:
    """Highest rate meeting the target on a measured curve, interpolating linearly across
    the first crossing (0 when the lowest rate already misses)."""
    points = sorted(zip(rates, attainments))
    best = 0.0
    for (r0, a0), (r1, a1) in zip(points, points[1:] + [(math.inf, -1.0)]):
        if a0 < target:
            break
        best = r0
        if a1 < target and r1 != math.inf:
            best = r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
            break
    return best


def find_goodput(
    attainment_at: Callable[[float], float], target: float = 0.9, start: float = 1.0, iterations: int = 6
) -> float:
    """Highest rate meeting the target, with no bounds known: double (or halve) from
    `start` until the outcome flips, then bisect. 0 if even start / 2**20 misses (tried
    before halving: a configuration that misses when unloaded is common in a search)."""
    tested: dict[float, float] = {}

    def ok(rate: float) -> bool:
        if rate not in tested:
            tested[rate] = attainment_at(rate)
        return tested[rate] >= target

    rate = start
    if ok(rate):
        while ok(rate * 2) and rate < start * 2**20:
            rate *= 2
        low, high = rate, rate * 2
    else:
        if not ok(start / 2**20):
            return 0.0
        while not ok(rate / 2):
            rate /= 2
            if rate < start / 2**20:
                return 0.0
        low, high = rate / 2, rate
    return search_goodput(attainment_at, low, high, target, iterations, tested)
