"""The analytical model's calibration: it recovers known weights, and on the published A100
profiles its error on held-out shapes is within the targets (median <= 10%, worst <= 25%)."""

from __future__ import annotations

import numpy as np
import pytest

from distserve.planner.calibration import (
    PACKAGED,
    CalibratedLatencyModel,
    Calibration,
    Sample,
    fit_calibration,
    published_samples,
    step_terms,
)
from distserve.planner.hardware import DEVICES, model_shape
from distserve.planner.latency_model import FittedLatencyModel, published_model

A100 = DEVICES["a100-80gb"]


def test_the_fit_recovers_known_weights_from_synthetic_profiles() -> None:
    truth = {"prefill": [2.0, 1.6, 0.4, 3.0, 12.0, 150.0], "decode": [1.0, 0.5, 1.4, 5.0, 20.0, 80.0]}
    samples = []
    for model, tps in (("facebook/opt-13b", (1, 2, 4)), ("meta-llama/Llama-2-70b-hf", (4, 8))):
        shape = model_shape(model)
        for tp in tps:
            shapes = [("prefill", [l] * k) for k, l in ((1, 64), (2, 300), (4, 512), (1, 2000), (8, 128))]
            shapes += [("decode", [c] * b) for b, c in ((1, 100), (8, 900), (32, 400), (128, 60), (64, 1500))]
            for phase, lengths in shapes:
                seconds = float(np.dot(truth[phase], step_terms(shape, A100, tp, phase, lengths)))
                samples.append(Sample(shape, tp, phase, lengths, seconds))
    fitted = fit_calibration(samples, A100)
    for phase in truth:
        assert fitted.weights[phase] == pytest.approx(truth[phase], rel=1e-6)
        assert fitted.error[phase]["worst"] < 1e-9


def test_held_out_error_on_the_published_profiles_is_within_the_targets() -> None:
    calibration = fit_calibration(published_samples(), A100)
    for phase in ("prefill", "decode"):
        assert calibration.error[phase]["median"] <= 0.10 and calibration.error[phase]["worst"] <= 0.25, calibration.error
    # the package's calibration is this fit
    packaged = Calibration.load(PACKAGED)
    for phase in ("prefill", "decode"):
        assert packaged.weights[phase] == pytest.approx(calibration.weights[phase], rel=1e-9)


def test_the_calibrated_model_fixes_the_short_prefills_the_roofline_got_wrong() -> None:
    """The roofline said 17.9 ms for a 128-token OPT-13B prefill on one A100 (measured 31.3)."""
    shape, published = model_shape("facebook/opt-13b"), published_model("facebook/opt-13b", 1)
    model = CalibratedLatencyModel(shape, A100, Calibration.load(), tp=1)
    for lengths in ([128], [512, 512], [64] * 8):
        assert model.prefill_time(lengths) == pytest.approx(published.prefill_time(lengths), rel=0.15)
    tp2 = CalibratedLatencyModel(shape, A100, Calibration.load(), tp=2)
    assert tp2.decode_time([512] * 32) == pytest.approx(published_model("facebook/opt-13b", 2).decode_time([512] * 32), rel=0.15)


def test_a_profile_of_this_engine_calibrates_the_same_way(tmp_path) -> None:
    """`distserve calibrate --profile`: a profile's own measured steps, half of them held out."""
    shape = model_shape("facebook/opt-13b")
    weights = {"prefill": [1.0, 1.2, 0.5, 0.0, 0.0, 100.0], "decode": [0.5, 0.3, 1.2, 0.0, 0.0, 50.0]}
    profile = FittedLatencyModel((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    profile.samples = {
        "prefill": [[[l] * k, float(np.dot(weights["prefill"], step_terms(shape, A100, 1, "prefill", [l] * k)))]
                    for k, l in ((1, 32), (1, 128), (2, 256), (1, 1024), (4, 512), (1, 2048))],
        "decode": [[[c] * b, float(np.dot(weights["decode"], step_terms(shape, A100, 1, "decode", [c] * b)))]
                   for b, c in ((1, 64), (4, 256), (16, 128), (32, 1024), (64, 512), (8, 2000))],
    }
    path = tmp_path / "profile.json"
    profile.save(path)
    from distserve.entrypoints.cli import build_parser

    out = tmp_path / "calibration.json"
    args = build_parser().parse_args(["calibrate", "--profile", str(path), "--model", "facebook/opt-13b", "--tp", "1", "--out", str(out)])
    args.func(args)
    fitted = Calibration.load(out)
    assert fitted.error["prefill"]["worst"] < 1e-6 and fitted.error["decode"]["worst"] < 1e-6
