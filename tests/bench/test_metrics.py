"""Attainment, goodput search and SLO scale on synthetic timelines with known answers."""

from __future__ import annotations

import math

import pytest

from distserve.bench.metrics import RequestRecord, goodput_from_curve, search_goodput, slo_attainment, slo_scale, tpot


def record(ttft: float, tpot_: float, n: int = 11, error: str | None = None) -> RequestRecord:
    """A request sent at 100.0 whose first token came after `ttft` and the rest every `tpot_`."""
    times = [100.0 + ttft + i * tpot_ for i in range(n)] if error is None else []
    return RequestRecord(prompt_len=10, output_len=n, send_time=100.0, token_times=times, num_tokens=n, error=error)


def test_tpot_is_last_minus_first_over_n_minus_1() -> None:
    assert tpot(1.0, 3.0, 5) == pytest.approx(0.5)
    assert tpot(1.0, 1.0, 1) == 0.0
    r = record(0.2, 0.05)
    assert r.ttft == pytest.approx(0.2) and r.tpot == pytest.approx(0.05) and r.e2e == pytest.approx(0.7)


def test_attainment_counts_both_and_each() -> None:
    records = [record(0.1, 0.01), record(0.5, 0.01), record(0.1, 0.2), record(0.5, 0.2), record(0, 0, error="boom")]
    a = slo_attainment(records, ttft_slo=0.3, tpot_slo=0.1)
    assert (a.both, a.ttft, a.tpot) == (0.2, 0.4, 0.4)
    doubled = slo_attainment(records, ttft_slo=0.3, tpot_slo=0.1, scale=3.0)
    assert doubled.both == 0.8  # only the failed request still misses


def test_slo_scale_is_the_target_quantile_of_the_worst_ratio() -> None:
    records = [record(0.1 * (i + 1), 0.01) for i in range(10)]  # ttft 0.1 .. 1.0
    assert slo_scale(records, ttft_slo=1.0, tpot_slo=1.0, target=0.9) == pytest.approx(0.9)
    assert slo_scale(records, ttft_slo=0.5, tpot_slo=1.0, target=0.5) == pytest.approx(1.0)
    scale = slo_scale(records, 1.0, 1.0, target=0.9)
    assert slo_attainment(records, 1.0, 1.0, scale=scale).both >= 0.9
    assert slo_attainment(records, 1.0, 1.0, scale=scale * 0.99).both < 0.9
    assert slo_scale([record(0, 0, error="x")], 1.0, 1.0) == math.inf


def test_goodput_search_finds_the_knee() -> None:
    probes: dict[float, float] = {}
    knee = 3.3
    found = search_goodput(lambda r: 0.95 if r <= knee else 0.4, 0.5, 8.0, target=0.9, iterations=12, tested=probes)
    assert knee - 0.01 < found <= knee
    assert search_goodput(lambda r: 0.1, 0.5, 8.0) == 0.0
    assert search_goodput(lambda r: 1.0, 0.5, 8.0) == 8.0


def test_goodput_from_a_measured_curve_interpolates_the_crossing() -> None:
    assert goodput_from_curve([1, 2, 3, 4], [1.0, 0.95, 0.85, 0.2], target=0.9) == pytest.approx(2.5)
    assert goodput_from_curve([1, 2], [0.5, 0.3]) == 0.0
    assert goodput_from_curve([1, 2], [1.0, 0.99]) == 2
