"""Latency models: fits recover known coefficients, published and analytical models behave."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from distserve.planner.hardware import DEVICES, model_shape
from distserve.planner.latency_model import AnalyticalLatencyModel, FittedLatencyModel, kv_transfer_time, published_model


def test_fit_recovers_known_coefficients(tmp_path) -> None:
    rng = random.Random(0)
    prefill_true, small_true, large_true = (0.02, 1e-4, 3e-8), (0.01, 2e-6, 5e-4), (0.015, 1.5e-6, 3e-4)
    prefill = []
    for _ in range(40):
        lens = [rng.randint(8, 2048) for _ in range(rng.randint(1, 4))]
        a, b, c = prefill_true
        prefill.append((lens, a + b * sum(lens) + c * sum(l * l for l in lens)))
    decode = []
    for _ in range(60):
        ctx = [rng.randint(16, 2048) for _ in range(rng.choice([1, 2, 4, 8, 16, 32, 64, 128]))]
        a, b, c = small_true if len(ctx) < 32 else large_true
        decode.append((ctx, a + b * sum(ctx) + c * len(ctx)))
    model = FittedLatencyModel.fit(prefill, decode, threshold=32)
    assert model.prefill == pytest.approx(prefill_true, rel=1e-6)
    assert model.decode_small == pytest.approx(small_true, rel=1e-6)
    assert model.decode_large == pytest.approx(large_true, rel=1e-6)
    assert model.fit_error["prefill"] < 1e-9 and model.fit_error["decode"] < 1e-9
    model.save(tmp_path / "p.json")
    again = FittedLatencyModel.load(tmp_path / "p.json")
    assert again.decode_time([100, 200]) == model.decode_time([100, 200])


def test_fit_is_unbiased_in_the_mean_under_noise() -> None:
    """Steps measured with 15% noise: the fitted model's predictions sum to the measured time
    (what a simulator adds up), which a fit weighted by the measured times misses by several
    percent."""
    rng = random.Random(1)
    a, b, c = 0.03, 1e-5, 4e-3
    decode, prefill = [], []
    for _ in range(3000):
        ctx = [rng.randint(16, 1024) for _ in range(rng.choice([1, 2, 4, 8, 16, 32]))]
        decode.append((ctx, (a + b * sum(ctx) + c * len(ctx)) * rng.gammavariate(1 / 0.15**2, 0.15**2)))
        lens = [rng.randint(8, 1024)]
        prefill.append((lens, (0.05 + 3e-3 * lens[0]) * rng.gammavariate(1 / 0.15**2, 0.15**2)))
    model = FittedLatencyModel.fit(prefill, decode)
    assert sum(model.decode_time(ctx) for ctx, _ in decode) == pytest.approx(sum(t for _, t in decode), rel=2e-3)
    assert sum(model.prefill_time(lens) for lens, _ in prefill) == pytest.approx(sum(t for _, t in prefill), rel=2e-3)
    assert model.decode_small == pytest.approx((a, b, c), rel=0.1)


def test_published_profile_in_seconds() -> None:
    m = published_model("facebook/opt-13b", tp=1)
    assert m.prefill_time([100]) == pytest.approx((18.10254647486372 + 0.1019122572698738 * 100 + 7.122264314252114e-06 * 1e4) / 1e3)
    assert m.decode_time([10] * 100) == pytest.approx((7.1661889468253595 + 0.0005798000403396046 * 1000 + 0.15831096191764046 * 100) / 1e3)
    assert published_model("facebook/opt-13b", tp=1, pp=2).prefill_time([100]) == pytest.approx(m.prefill_time([100]) / 2)
    with pytest.raises(ValueError, match="available"):
        published_model("facebook/opt-13b", tp=8)


def test_analytical_roofline_is_memory_bound_for_decode_and_scales_with_tp() -> None:
    shape, a100 = model_shape("facebook/opt-13b"), DEVICES["a100-80gb"]
    one = AnalyticalLatencyModel(shape, a100, tp=1)
    two = AnalyticalLatencyModel(shape, a100, tp=2)
    weights_read = shape.weight_bytes(2) / (a100.memory_bandwidth * a100.bandwidth_efficiency)
    assert one.decode_time([128]) == pytest.approx(weights_read, rel=0.05)  # batch 1: reading the weights
    assert one.prefill_time([2048]) > 10 * one.decode_time([128])  # prefill: compute bound
    assert two.decode_time([128] * 8) < one.decode_time([128] * 8)
    assert one.prefill_time([512, 512]) > one.prefill_time([512])


def test_kv_transfer_time_by_link() -> None:
    shape, a100 = model_shape("facebook/opt-66b"), DEVICES["a100-80gb"]
    per_token = 2 * 64 * 72 * 128 * 2
    assert kv_transfer_time(shape, a100, 1000, "network") == pytest.approx(per_token * 1000 / (25e9 / 8))
    assert kv_transfer_time(shape, a100, 1000, "node") < kv_transfer_time(shape, a100, 1000, "network") / 50


def test_fit_from_step_logs_uses_whole_prefills_and_pure_decodes(tmp_path) -> None:
    from distserve.planner.profile import fit_step_logs

    rng = random.Random(1)
    prefill_true, decode_true = (0.03, 2e-3, 4e-7), (0.02, 5e-6, 3e-3)
    lines = []
    for _ in range(30):
        lens = [rng.randint(4, 700) for _ in range(rng.randint(1, 3))]
        seconds = prefill_true[0] + prefill_true[1] * sum(lens) + prefill_true[2] * sum(v * v for v in lens)
        lines.append({"start": 1.0, "seconds": seconds, "prefill": lens, "prefill_context": [0] * len(lens), "decode": []})
        ctx = [rng.randint(10, 900) for _ in range(rng.randint(1, 40))]
        seconds = decode_true[0] + decode_true[1] * sum(ctx) + decode_true[2] * len(ctx)
        lines.append({"start": 1.0, "seconds": seconds, "prefill": [], "prefill_context": [], "decode": ctx})
        # a chunked step (a chunk after context, with decodes) fits neither form: left out
        lines.append({"start": 1.0, "seconds": 99.0, "prefill": [16], "prefill_context": [32], "decode": ctx})
    half = len(lines) // 2
    text = ["".join(json.dumps(x) + "\n" for x in part) for part in (lines[:half], lines[half:])]
    (tmp_path / "prefill-0.jsonl").write_text(text[0])
    (tmp_path / "decode-0.jsonl.gz").write_bytes(gzip.compress(text[1].encode()))  # kept compressed, as benchmarks do
    model = fit_step_logs([tmp_path / "prefill-0.jsonl", tmp_path / "decode-0.jsonl.gz"])
    assert model.prefill == pytest.approx(prefill_true, rel=1e-6)
    assert model.decode_time([300] * 7) == pytest.approx(decode_true[0] + decode_true[1] * 2100 + decode_true[2] * 7, rel=1e-6)
    assert model.fit_error["prefill"] < 1e-9 and model.fit_error["decode"] < 1e-9
    (tmp_path / "short.jsonl").write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(ValueError, match="at least 3"):
        fit_step_logs([tmp_path / "short.jsonl"])


def test_step_gap_from_logs_is_the_time_between_busy_decode_steps(tmp_path) -> None:
    from distserve.planner.profile import fit_step_logs

    lines, now = [], 0.0
    for i in range(40):
        lens = [50 + i]
        lines.append({"start": now, "seconds": 0.05, "prefill": lens, "prefill_context": [0], "decode": []})
        now += 0.05 + 0.5  # idle after a prefill: not a busy gap
        for step, batch in enumerate((3, 3, 2)):  # each sequence one token longer; one leaves: still busy
            lines.append({"start": now, "seconds": 0.01 + 1e-3 * batch, "prefill": [], "prefill_context": [],
                          "decode": [100 + i + step + k for k in range(batch)]})
            now += 0.01 + 1e-3 * batch + 0.002
        # one carries on while another joins (after its KV pull, or an idle wait): left out
        lines.append({"start": now + 0.3, "seconds": 0.015, "prefill": [], "prefill_context": [],
                      "decode": [100 + i + 3, 57]})
        now += 0.4
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    model = fit_step_logs([tmp_path / "log.jsonl"])
    assert model.step_gap == pytest.approx(0.002)
    assert type(model).from_json(model.to_json()).step_gap == model.step_gap
