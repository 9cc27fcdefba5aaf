"""How one request is sampled and when it stops (vLLM's `SamplingParams`, same names)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

GREEDY_TEMPERATURE = 1e-5  # below this, sampling is greedy
MAX_SAMPLES = 128  # n and best_of


@dataclass
class SamplingParams:
    """Sampling and stopping parameters of one request.

    `temperature=0` is greedy. `seed` makes a request's samples reproducible on its own,
    whatever else runs in the batch and whichever instance samples each token. `n` samples
    are returned; `best_of` (>= n) are generated and the n of highest cumulative logprob
    returned. Each sample runs as a request of its own, all admitted together so that they
    share the prompt's blocks (`samples`); sample i is seeded `seed + i`.
    """

    n: int = 1
    best_of: int | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Every field in its range (NaN and infinities refused), or a ValueError that names
        the field and what it must be."""
        if not _is_int(self.n) or not 1 <= self.n <= MAX_SAMPLES:
            raise ValueError(f"n must be an integer between 1 and {MAX_SAMPLES}, got {self.n!r}.")
        if self.best_of is not None and (not _is_int(self.best_of) or not self.n <= self.best_of <= MAX_SAMPLES):
            raise ValueError(f"best_of must be an integer between n ({self.n}) and {MAX_SAMPLES}, got {self.best_of!r}.")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        _check_number("temperature", self.temperature, 0.0, None, "(0 means greedy)")
        _check_number("top_p", self.top_p, 0.0, 1.0, "", low_open=True)
        if not _is_int(self.top_k) or self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or an integer >= 1, got {self.top_k!r}.")
        _check_number("min_p", self.min_p, 0.0, 1.0)
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, None, "", low_open=True)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be an integer between 0 and 20, got {self.logprobs!r}.")
        if not isinstance(self.stop, list) or any(not isinstance(s, str) or not s or not _encodable(s) for s in self.stop):
            raise ValueError("stop must be a string or a list of non-empty strings of valid Unicode.")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be a list of non-negative integers.")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}.")

    @property
    def num_samples(self) -> int:
        """Samples generated: best_of, or n."""
        return self.best_of or self.n

    def samples(self) -> list[SamplingParams]:
        """The parameters of each sample's request: one sample each, sample i seeded seed + i;
        when best_of > n they keep each token's logprob, which ranks them."""
        if self.num_samples == 1:
            return [self]
        ranked = self.num_samples > self.n
        return [
            dataclasses.replace(self, n=1, best_of=None, seed=None if self.seed is None else self.seed + i,
                                logprobs=self.logprobs if self.logprobs is not None or not ranked else 0)
            for i in range(self.num_samples)
        ]

    @property
    def greedy(self) -> bool:
        # a temperature this small divides logits into infinities: it is greedy (as in vLLM)
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(
    name: str, value: object, low: float, high: float | None, note: str = "", low_open: bool = False
) -> None:
    """`value` a finite number in [low, high] ((low, high] if `low_open`; no upper bound if `high` is None)."""
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high is not None else None
    what = f"in {bounds}" if bounds else (f"> {low:g}" if low_open else f">= {low:g}")
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (high is None or value <= high)
    )
    if not ok:
        raise ValueError(f"{name} must be a finite number {what}{' ' + note if note else ''}, got {value!r}.")
