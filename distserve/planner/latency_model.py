"""How long one forward step takes, for a prefill batch (by its prompt lengths) and for a
decode batch (by its context lengths), on an instance of a given TP x PP.

- `FittedLatencyModel`: fitted to steps of this engine (`distserve profile`):
  prefill = a + b*sum(l) + c*sum(l^2); decode = a + b*sum(context) + c*B, with separate
  coefficients below and above a batch-size threshold (as DistServe does).
- `AnalyticalLatencyModel`: a roofline from the model's shape and a device's FLOP/s and
  memory bandwidth, plus tensor-parallel all-reduces over the intra-node link.
- `published_model`: the DistServe authors' A100 profiles of OPT-13B/66B (their engine and
  vLLM), carried in `data/distserve_a100_profiles.json`.

Also the KV transfer time between a prefill and a decode instance, which DistServe's own
simulator leaves out. All times are seconds.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from distserve.engine.scheduler import BatchShape
from distserve.planner.hardware import Device, ModelShape

PUBLISHED = Path(__file__).with_name("data") / "distserve_a100_profiles.json"


class LatencyModel(abc.ABC):
    # seconds the engine spends between two steps of a busy instance (scheduling, sending
    # the tokens out), measured from serving logs; none in a roofline or a published profile
    step_gap: float = 0.0

    @abc.abstractmethod
    def prefill_time(self, prompt_lens: Sequence[int]) -> float:
        """Seconds of one prefill step over prompts of these lengths."""

    @abc.abstractmethod
    def decode_time(self, context_lens: Sequence[int]) -> float:
        """Seconds of one decode step over sequences with these context lengths."""

    def step_time(self, shape: BatchShape) -> float:
        """One engine step: its prompts (or chunks) and decodes in one forward pass, the
        decode part's fixed cost paid once."""
        if not shape.prefill:
            return self.decode_time(shape.decode)
        if not shape.decode:
            return self.prefill_time(shape.prefill)
        return self.prefill_time(shape.prefill) + self.decode_time(shape.decode) - self.decode_time([])


@dataclass
class FittedLatencyModel(LatencyModel):
    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    threshold: int = 1 << 30
    pp: int = 1
    step_gap: float = 0.0
    fit_error: dict[str, float] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)
    samples: dict[str, list] = field(default_factory=dict)  # the measured steps it was fitted to

    def prefill_time(self, prompt_lens: Sequence[int]) -> float:
        if not prompt_lens:
            return 0.0
        a, b, c = self.prefill
        s = float(sum(prompt_lens))
        s2 = float(sum(l * l for l in prompt_lens))
        return (a + b * s + c * s2) / self.pp

    def decode_time(self, context_lens: Sequence[int]) -> float:
        batch = len(context_lens)
        a, b, c = self.decode_small if batch < self.threshold else self.decode_large
        return (a + b * float(sum(context_lens)) + c * batch) / self.pp

    @classmethod
    def fit(
        cls,
        prefill_samples: Sequence[tuple[Sequence[int], float]],
        decode_samples: Sequence[tuple[Sequence[int], float]],
        threshold: int | None = None,
        meta: dict[str, object] | None = None,
    ) -> FittedLatencyModel:
        """Coefficients from measured steps, each sample weighted by 1 / its predicted time (a
        16-token prefill matters as much as a 4096-token one) and the fit unbiased in the mean
        (see `_relative_fit`); `fit_error` is the mean absolute relative error of each part
        on its samples. The samples are kept in the model, so a saved profile can be refitted."""
        x = np.array([[1.0, sum(l), sum(v * v for v in l)] for l, _ in prefill_samples])
        y = np.array([t for _, t in prefill_samples])
        prefill = _relative_fit(x, y)

        def fit_decode(samples: Sequence[tuple[Sequence[int], float]]) -> tuple[float, float, float]:
            xd = np.array([[1.0, sum(c), len(c)] for c, _ in samples])
            yd = np.array([t for _, t in samples])
            return _relative_fit(xd, yd)

        if threshold is None:
            small = large = fit_decode(decode_samples)
            threshold = 1 << 30
        else:
            below = [s for s in decode_samples if len(s[0]) < threshold]
            above = [s for s in decode_samples if len(s[0]) >= threshold]
            small = fit_decode(below) if len(below) >= 3 else fit_decode(decode_samples)
            large = fit_decode(above) if len(above) >= 3 else small
        model = cls(prefill, small, large, threshold, meta=dict(meta or {}))
        model.samples = {
            "prefill": [[list(map(int, l)), float(t)] for l, t in prefill_samples],
            "decode": [[list(map(int, c)), float(t)] for c, t in decode_samples],
        }
        model.fit_error = {
            "prefill": _mean_relative_error([(model.prefill_time(l), t) for l, t in prefill_samples]),
            "decode": _mean_relative_error([(model.decode_time(c), t) for c, t in decode_samples]),
        }
        return model

    def scaled(self, factor: float) -> FittedLatencyModel:
        """The same model on a machine `factor` times slower: every step and gap that much longer."""
        if factor <= 0:
            raise ValueError(f"a latency scale must be positive, not {factor}.")
        times = lambda coeffs: tuple(v * factor for v in coeffs)  # noqa: E731
        return replace(self, prefill=times(self.prefill), decode_small=times(self.decode_small),
                       decode_large=times(self.decode_large), step_gap=self.step_gap * factor,
                       meta={**self.meta, "scaled": factor}, samples={})

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> FittedLatencyModel:
        return cls(
            prefill=tuple(data["prefill"]),
            decode_small=tuple(data["decode_small"]),
            decode_large=tuple(data["decode_large"]),
            threshold=int(data.get("threshold", 1 << 30)),
            pp=int(data.get("pp", 1)),
            step_gap=float(data.get("step_gap", 0.0)),
            fit_error=dict(data.get("fit_error", {})),
            meta=dict(data.get("meta", {})),
            samples=dict(data.get("samples", {})),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> FittedLatencyModel:
        return cls.from_json(json.loads(Path(path).read_text()))


def _relative_fit(x: np.ndarray, y: np.ndarray, iterations: int = 20) -> tuple[float, float, float]:
    """Least squares with each sample's error relative to its *predicted* time (iteratively
    reweighted: a gamma GLM with identity link), whose residuals sum to zero: the model is
    unbiased in the mean, which is what a simulator summing step times needs. Weighting by the
    *measured* time instead, as a first step does, leans low under noise (a step measured slow
    weighs less): by 1-5% on this machine's serving step logs."""
    w = 1.0 / np.maximum(y, 1e-9)
    coef = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)[0]
    for _ in range(iterations):
        predicted = x @ coef
        if np.any(predicted <= 0):
            break  # the first fit is as far as reweighting can go
        w = 1.0 / predicted
        coef, previous = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)[0], coef
        if np.allclose(coef, previous, rtol=1e-10, atol=0.0):
            break
    return tuple(coef.tolist())


def _mean_relative_error(pairs: list[tuple[float, float]]) -> float:
    return float(np.mean([abs(p - t) / t for p, t in pairs if t > 0])) if pairs else 0.0


def published_model(model: str, tp: int, pp: int = 1, engine: str = "distserve") -> FittedLatencyModel:
    """The DistServe authors' A100-80GB profile of `model` at tensor parallelism `tp`.

    As their simulator does, pipeline parallelism divides a step's time by `pp`.
    """
    data = json.loads(PUBLISHED.read_text())["engines"][engine]
    name = _published_name(model, data)
    if str(tp) not in data[name]:
        raise ValueError(f"no published {engine} profile of {name} at TP {tp}; available: {sorted(data[name], key=int)}.")
    p = data[name][str(tp)]
    ms = 1e-3
    scale = lambda coeffs: tuple(v * ms for v in coeffs)  # noqa: E731
    return FittedLatencyModel(
        prefill=scale(p["prefill"]),
        decode_small=scale(p["decoding_smallbs"]),
        decode_large=scale(p["decoding_largebs"]),
        threshold=int(p["decoding_large_small_bs_threshold"]),
        pp=pp,
        meta={"source": f"DistServe A100-80GB profile ({engine}), {name}, TP {tp}"},
    )


def published_tp_degrees(model: str, engine: str = "distserve") -> list[int]:
    data = json.loads(PUBLISHED.read_text())["engines"][engine]
    return sorted(int(tp) for tp in data[_published_name(model, data)])


def published_kv_capacity(model: str, tp: int, pp: int) -> int | None:
    """Tokens of KV cache DistServe measured for (model, tp, pp) on A100-80GB."""
    caps = json.loads(PUBLISHED.read_text())["max_num_tokens"]
    for name, table in caps.items():
        if name.split("/")[-1].lower() == model.split("/")[-1].lower():
            return table.get(f"{tp},{pp}")
    return None


def _published_name(model: str, data: dict) -> str:
    key = model.split("/")[-1].lower()
    for name in data:
        if name.split("/")[-1].lower() == key:
            return name
    raise ValueError(f"no published profile of {model}; available: {sorted(data)}.")


@dataclass
class AnalyticalLatencyModel(LatencyModel):
    """Roofline: a step takes the longer of its FLOPs and its memory traffic, plus TP's
    all-reduces; PP divides a step by the stages (each holds 1/pp of the layers)."""

    shape: ModelShape
    device: Device
    tp: int = 1
    pp: int = 1
    step_overhead: float = 0.0

    def __post_init__(self) -> None:
        self._params = self.shape.params()  # the simulator asks for thousands of steps

    def _step(self, tokens: int, attention_flops: float, kv_bytes: float) -> float:
        s, d = self.shape, self.device
        flops = 2.0 * self._params * tokens + attention_flops
        memory = self._params * d.dtype_bytes + kv_bytes + 2 * tokens * s.hidden_size * s.num_layers * d.dtype_bytes
        compute_time = flops / (self.tp * d.flops * d.flops_efficiency)
        memory_time = memory / (self.tp * d.memory_bandwidth * d.bandwidth_efficiency)
        comm = 0.0
        if self.tp > 1:  # two all-reduces of the activations per layer (ring: 2 (tp-1)/tp of the data)
            volume = 2 * s.num_layers * tokens * s.hidden_size * d.dtype_bytes * 2 * (self.tp - 1) / self.tp
            comm = volume / d.intra_node_bandwidth + 2 * s.num_layers * 10e-6
        return (max(compute_time, memory_time) + comm) / self.pp + self.step_overhead

    def prefill_time(self, prompt_lens: Sequence[int]) -> float:
        if not prompt_lens:
            return 0.0
        s = self.shape
        attention = 4.0 * s.num_layers * s.hidden_size * sum(l * l for l in prompt_lens) / 2
        return self._step(sum(prompt_lens), attention, 0.0)

    def decode_time(self, context_lens: Sequence[int]) -> float:
        s, d = self.shape, self.device
        attention = 4.0 * s.num_layers * s.hidden_size * sum(context_lens)
        kv = s.kv_bytes_per_token(d.dtype_bytes) * sum(context_lens)
        return self._step(len(context_lens), attention, kv)


def kv_transfer_time(shape: ModelShape, device: Device, tokens: int, link: str) -> float:
    """Seconds to move `tokens` of KV between a prefill and a decode instance over `link`:
    `device` (same device), `node` (same node), or `network` (across nodes)."""
    num_bytes = shape.kv_bytes_per_token(device.dtype_bytes) * tokens
    bandwidth = {
        "device": device.memory_bandwidth / 2,  # a copy reads and writes
        "node": device.intra_node_bandwidth,
        "network": device.inter_node_bandwidth,
    }[link]
    return num_bytes / bandwidth
