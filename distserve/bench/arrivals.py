"""When each request is sent: Poisson, gamma with a coefficient of variation, or a trace's
own timestamps rescaled to a rate."""

from __future__ import annotations

import random

ARRIVALS = ("poisson", "gamma", "trace")


def arrival_times(
    n: int, rate: float, process: str = "poisson", cv: float = 1.0, seed: int = 0, trace: list[float] | None = None
) -> list[float]:
    """Send times (seconds from the start) of n requests at `rate` requests per second.

    `gamma` draws gaps from a gamma distribution with mean 1/rate and the given coefficient
    of variation (cv=1 is Poisson; above 1 is burstier). `trace` keeps the trace's gaps,
    scaled so that the mean rate is `rate`.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}.")
    rng = random.Random(seed)
    if process == "trace":
        if not trace or len(trace) < n:
            raise ValueError("trace arrivals need the trace's timestamps for every request.")
        stamps = sorted(trace[:n])
        span = stamps[-1] - stamps[0]
        if span <= 0:
            return [i / rate for i in range(n)]
        scale = (n - 1) / rate / span
        return [(t - stamps[0]) * scale for t in stamps]
    if process == "poisson":
        gaps = [rng.expovariate(rate) for _ in range(n)]
    elif process == "gamma":
        if cv <= 0:
            raise ValueError(f"cv must be > 0, got {cv}.")
        shape = 1.0 / (cv * cv)
        gaps = [rng.gammavariate(shape, 1.0 / (rate * shape)) for _ in range(n)]
    else:
        raise ValueError(f"arrival process must be one of {ARRIVALS}, got {process!r}.")
    times, t = [], 0.0
    for gap in gaps:
        times.append(t)
        t += gap
    return times
