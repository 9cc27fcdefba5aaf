"""The simulator against timelines computed by hand and against queueing theory."""

from __future__ import annotations

import statistics

import pytest

from distserve.bench.arrivals import arrival_times
from distserve.planner.latency_model import FittedLatencyModel
from distserve.planner.simulator import ClusterSpec, InstanceSpec, SpeedDrift, simulate

PREFILL = FittedLatencyModel((0.1, 0.0, 0.0), (0.01, 0.0, 0.0), (0.01, 0.0, 0.0))  # 100 ms prefill, 10 ms decode


def pair(**prefill: object) -> ClusterSpec:
    return ClusterSpec([InstanceSpec("prefill", PREFILL, 10_000, **prefill), InstanceSpec("decode", PREFILL, 10_000)],
                       transfer_time=lambda tokens: 0.01)


def test_one_request_timeline() -> None:
    (r,) = simulate(pair(), [0.0], [(100, 4)])
    # prefill 0-0.1 (first token); decode steps of 0.01 after a 0.01 pull: tokens at 0.12, 0.13, 0.14
    assert r.token_times == pytest.approx([0.1, 0.14])
    assert r.ttft == pytest.approx(0.1) and r.tpot == pytest.approx(0.04 / 3)


def test_two_requests_queue_for_prefill() -> None:
    a, b = simulate(pair(max_num_seqs=1), [0.0, 0.05], [(100, 2), (100, 2)])
    assert a.ttft == pytest.approx(0.1)
    assert b.ttft == pytest.approx(0.15)  # waits for the first prefill to end at 0.1


def test_prefill_batches_requests_that_arrive_together() -> None:
    a, b = simulate(pair(), [0.0, 0.0], [(100, 2), (100, 2)])
    assert a.ttft == pytest.approx(0.1) and b.ttft == pytest.approx(0.1)


def test_colocated_prefill_stalls_decodes() -> None:
    spec = ClusterSpec([InstanceSpec("colocated", PREFILL, 10_000)])
    first, second = simulate(spec, [0.0, 0.105], [(100, 4), (100, 2)])
    # first: token at 0.1 (prefill), 0.11 decode; its third token rides in the step that runs the
    # second prompt (0.11-0.21), so that prompt stalls it for 0.1 s; both decode 0.21-0.22
    assert second.ttft == pytest.approx(0.21 - 0.105)
    assert first.token_times == pytest.approx([0.1, 0.22])


def test_step_gap_delays_each_next_step() -> None:
    model = FittedLatencyModel((0.1, 0.0, 0.0), (0.01, 0.0, 0.0), (0.01, 0.0, 0.0), step_gap=0.002)
    (r,) = simulate(ClusterSpec([InstanceSpec("colocated", model, 10_000)]), [0.0], [(100, 4)])
    # prefill 0-0.1, then each decode step starts 2 ms after the last one ended
    assert r.token_times == pytest.approx([0.1, 0.1 + 3 * 0.012])
    (late,) = simulate(pair(), [0.0], [(100, 4)])  # no gap: the hand-computed timeline above
    assert late.token_times == pytest.approx([0.1, 0.14])


def test_a_scaled_model_stretches_the_timeline() -> None:
    model = FittedLatencyModel((0.1, 0.0, 0.0), (0.01, 0.0, 0.0), (0.01, 0.0, 0.0), step_gap=0.002)
    (r,) = simulate(ClusterSpec([InstanceSpec("colocated", model.scaled(1.5), 10_000)]), [0.0], [(100, 4)])
    # every step and gap 1.5x: prefill 0-0.15, then three decode steps of 0.018 each (0.015 + 0.003 gap)
    assert r.token_times == pytest.approx([0.15, 0.15 + 3 * 0.018])
    with pytest.raises(ValueError, match="positive"):
        model.scaled(0.0)


def test_a_slow_stretch_of_the_machine_stretches_the_steps_that_start_in_it() -> None:
    model = FittedLatencyModel((0.1, 0.0, 0.0), (0.01, 0.0, 0.0), (0.01, 0.0, 0.0))
    spec = ClusterSpec([InstanceSpec("colocated", model, 10_000)], speed=lambda t: 2.0 if t < 0.1 else 1.0)
    (r,) = simulate(spec, [0.0], [(100, 4)])
    # the prefill starts at 0, in the slow stretch: 0-0.2; the three decode steps after it do not
    assert r.token_times == pytest.approx([0.2, 0.23])


def test_speed_drift_is_a_factor_of_mean_one_per_window() -> None:
    drift = SpeedDrift(0.1, window=20.0, seed=5)
    factors = [drift(20.0 * k + 3.0) for k in range(20_000)]
    assert statistics.fmean(factors) == pytest.approx(1.0, abs=0.003)
    assert statistics.stdev(factors) == pytest.approx(0.1, rel=0.03)
    assert drift(0.0) == drift(19.9) != drift(20.0)  # one factor per window
    assert SpeedDrift(0.1, 20.0, seed=5)(45.0) == drift(45.0)  # the seed sets the draws
    assert SpeedDrift(0.0, 20.0)(100.0) == 1.0
    with pytest.raises(ValueError, match="window > 0"):
        SpeedDrift(0.1, 0.0)


def test_a_drifting_machine_queues_longer_than_a_steady_one_of_the_same_mean_speed() -> None:
    # M/D/1 at 60% load: a slow stretch builds a queue that the fast stretches do not undo as fast
    service, rate, n = 0.1, 6.0, 5000
    model = FittedLatencyModel((service, 0.0, 0.0), (0.001, 0.0, 0.0), (0.001, 0.0, 0.0))
    spec = ClusterSpec([InstanceSpec("prefill", model, 10**7, max_num_seqs=1), InstanceSpec("decode", model, 10**7)])
    arrivals = arrival_times(n, rate, seed=3)
    steady = statistics.fmean(r.ttft for r in simulate(spec, arrivals, [(100, 2)] * n))
    drifting = statistics.fmean(
        statistics.fmean(r.ttft for r in simulate(ClusterSpec(spec.instances, speed=SpeedDrift(0.3, 20.0, seed)), arrivals, [(100, 2)] * n))
        for seed in range(8))
    assert drifting > 1.2 * steady  # 1.42x here


def test_md1_mean_ttft_matches_queueing_theory() -> None:
    service, rate = 0.1, 6.0
    model = FittedLatencyModel((service, 0.0, 0.0), (0.001, 0.0, 0.0), (0.001, 0.0, 0.0))
    spec = ClusterSpec([InstanceSpec("prefill", model, 10**7, max_num_seqs=1), InstanceSpec("decode", model, 10**7)])
    n = 20000
    records = simulate(spec, arrival_times(n, rate, seed=3), [(100, 2)] * n)
    expected = service + rate * service**2 / (2 * (1 - rate * service))  # Pollaczek-Khinchine, M/D/1
    assert statistics.fmean(r.ttft for r in records) == pytest.approx(expected, rel=0.03)


def test_decode_kv_capacity_bounds_the_batch() -> None:
    decode = FittedLatencyModel((0.0, 0.0, 0.0), (0.01, 0.0, 0.0), (0.01, 0.0, 0.0))
    spec = ClusterSpec([InstanceSpec("prefill", decode, 10_000), InstanceSpec("decode", decode, 64, block_size=16)])
    records = simulate(spec, [0.0] * 3, [(16, 10)] * 3)
    assert all(r.ok for r in records)
    ends = sorted(r.token_times[-1] for r in records)
    assert ends[-1] > ends[0] + 0.05  # not all three fit at once: one waits for another to finish
