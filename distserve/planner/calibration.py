"""The analytical latency model calibrated on measured steps.

A step's time is a sum of what it does, each in its own unit, with weights fitted per phase
(prefill, decode) to measured steps:

    t = w0 * 1 ms                                          a step's fixed cost
      + w1 * FLOPs / (tp * peak FLOP/s)                    compute (1 / its efficiency)
      + w2 * bytes / (tp * peak memory bandwidth)          weights, KV read, activations
      + w3 * all-reduce bytes / link bandwidth              tensor parallelism's traffic
      + w4 * all-reduces * 1 us                            ... and its per-collective latency
      + w5 * layers * 1 us                                 per-layer launch and sync costs

The terms come from the model's shape and the device's peak numbers (`hardware.py`), so one
calibration serves any model (and, assuming the same efficiencies, any device of its kind);
the weights are fitted by least squares on relative error (`latency_model._relative_fit`).
The package's calibration (`data/a100_calibration.json`) is fitted to the DistServe authors'
published A100 profiles (OPT-13B and OPT-66B at every tensor-parallel degree they hold);
`distserve calibrate` fits one to any `distserve profile` JSON instead (a user's own GPU).
Shapes whose KV would not fit the devices are left out of fits and checks: a published
profile's formula says nothing true there.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distserve.planner.hardware import Device, ModelShape
from distserve.planner.latency_model import (
    PUBLISHED,
    FittedLatencyModel,
    LatencyModel,
    _relative_fit,
    published_kv_capacity,
    published_model,
)

PACKAGED = Path(__file__).with_name("data") / "a100_calibration.json"
PHASES = ("prefill", "decode")
TERMS = ("step", "compute", "memory", "all_reduce_bytes", "all_reduces", "layers")
# the shapes sampled from a fitted profile: (batch, prompt length) of prefills, (batch,
# context) of decodes; checkerboard halves are fitted and checked against each other
PREFILL_SHAPES = [(k, l) for l in (16, 32, 64, 128, 256, 512, 1024, 2048) for k in (1, 2, 4, 8) if k * l <= 8192]
DECODE_SHAPES = [(b, c) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) for c in (64, 128, 256, 512, 1024, 2048)]


def step_terms(shape: ModelShape, device: Device, tp: int, phase: str, lengths: Sequence[int]) -> list[float]:
    """The terms of one step (seconds at the device's peaks, or counts in their units):
    prompt lengths of a prefill batch, or context lengths of a decode batch."""
    d = device.dtype_bytes
    params, hidden, layers = shape.params(), shape.hidden_size, shape.num_layers
    if phase == "prefill":
        tokens = sum(lengths)
        attention = 4.0 * layers * hidden * sum(l * l for l in lengths) / 2
        kv = 0.0
    else:
        tokens = len(lengths)
        attention = 4.0 * layers * hidden * sum(lengths)
        kv = shape.kv_bytes_per_token(d) * sum(lengths)
    flops = 2.0 * params * tokens + attention
    memory = params * d + kv + 2 * tokens * hidden * layers * d
    reduce_bytes = 2 * layers * tokens * hidden * d * 2 * (tp - 1) / tp if tp > 1 else 0.0
    return [
        1e-3,
        flops / (tp * device.flops),
        memory / (tp * device.memory_bandwidth),
        reduce_bytes / device.intra_node_bandwidth,
        2 * layers * 1e-6 if tp > 1 else 0.0,
        layers * 1e-6,
    ]


@dataclass
class Sample:
    """One measured step: of which model, at which tensor-parallel degree, its lengths."""

    shape: ModelShape
    tp: int
    phase: str
    lengths: list[int]
    seconds: float
    held_out: bool = False  # checked, not fitted


@dataclass
class Calibration:
    device: str
    weights: dict[str, list[float]]  # phase -> one weight per TERMS
    error: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> held-out median / worst relative error
    source: str = ""

    def step_time(self, shape: ModelShape, device: Device, tp: int, phase: str, lengths: Sequence[int]) -> float:
        return float(np.dot(self.weights[phase], step_terms(shape, device, tp, phase, lengths)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"device": self.device, "terms": list(TERMS), "weights": self.weights,
                                          "error": self.error, "source": self.source}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path = PACKAGED) -> Calibration:
        data = json.loads(Path(path).read_text())
        return cls(data["device"], data["weights"], data.get("error", {}), data.get("source", ""))


def fit_calibration(samples: list[Sample], device: Device, source: str = "") -> Calibration:
    """Weights per phase fitted to the samples not held out; the error on those held out
    (or, with none held out, on the fitted ones) as median and worst relative error."""
    weights: dict[str, list[float]] = {}
    error: dict[str, dict[str, float]] = {}
    for phase in PHASES:
        mine = [s for s in samples if s.phase == phase]
        if not mine:
            raise ValueError(f"no {phase} steps to calibrate on.")
        fit = [s for s in mine if not s.held_out]
        x = np.array([step_terms(s.shape, device, s.tp, phase, s.lengths) for s in fit])
        weights[phase] = list(_relative_fit(x, np.array([s.seconds for s in fit])))
        checked = [s for s in mine if s.held_out] or fit
        rel = [abs(float(np.dot(weights[phase], step_terms(s.shape, device, s.tp, phase, s.lengths))) - s.seconds) / s.seconds
               for s in checked]
        error[phase] = {"median": statistics.median(rel), "worst": max(rel), "steps": len(checked)}
    return Calibration(device.name, weights, error, source)


def profile_samples(model: FittedLatencyModel, shape: ModelShape, tp: int, kv_capacity: int | None = None) -> list[Sample]:
    """Steps of a profile: the ones it was fitted to when it kept them (a `distserve profile`),
    else its formula at a grid of shapes (a published profile), those whose KV fits
    `kv_capacity`; half of them held out, alternately over the grid."""
    if model.samples:
        measured = [("prefill", lengths, t) for lengths, t in model.samples.get("prefill", [])]
        measured += [("decode", lengths, t) for lengths, t in model.samples.get("decode", [])]
        return [Sample(shape, tp, phase, list(lengths), float(t), held_out=i % 2 == 1) for i, (phase, lengths, t) in enumerate(measured)]
    samples = []
    for i, (k, l) in enumerate(PREFILL_SHAPES):
        samples.append(Sample(shape, tp, "prefill", [l] * k, model.prefill_time([l] * k), held_out=i % 2 == 1))
    for i, (b, c) in enumerate(DECODE_SHAPES):
        if kv_capacity is None or b * c <= kv_capacity:
            samples.append(Sample(shape, tp, "decode", [c] * b, model.decode_time([c] * b), held_out=i % 2 == 1))
    return samples


def published_samples(engine: str = "distserve") -> list[Sample]:
    """Steps of every published A100 profile (every model and TP degree the authors hold)."""
    from distserve.planner.hardware import model_shape

    data = json.loads(PUBLISHED.read_text())["engines"][engine]
    samples: list[Sample] = []
    for name, by_tp in data.items():
        for tp in sorted(map(int, by_tp)):
            samples += profile_samples(published_model(name, tp, engine=engine), model_shape(name), tp, published_kv_capacity(name, tp, 1))
    return samples


@dataclass
class CalibratedLatencyModel(LatencyModel):
    """The analytical model with a calibration's weights; pipeline stages divide a step."""

    shape: ModelShape
    device: Device
    calibration: Calibration
    tp: int = 1
    pp: int = 1

    def prefill_time(self, prompt_lens: Sequence[int]) -> float:
        if not prompt_lens:
            return 0.0
        return self.calibration.step_time(self.shape, self.device, self.tp, "prefill", prompt_lens) / self.pp

    def decode_time(self, context_lens: Sequence[int]) -> float:
        return self.calibration.step_time(self.shape, self.device, self.tp, "decode", context_lens) / self.pp
