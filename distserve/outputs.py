"""What a user gets back for a request: text, token ids, logprobs and the request's timeline."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from distserve.sampling_params import SamplingParams


@dataclass
class Logprob:
    """Log-probability of one token, with its decoded text."""

    logprob: float
    decoded_token: str | None = None
    rank: int | None = None


# One dict per generated token: token id -> Logprob (the sampled token and the top-n).
TokenLogprobs = dict[int, Logprob]


@dataclass
class RequestMetrics:
    """Timeline of a request (wall-clock seconds, `time.time()`), and what follows from it.

    Lifecycle: issued -> prefill queued -> prefill started -> prefill finished -> migration
    started -> migration finished -> decode started -> finished. Colocated requests skip the
    migration stamps. Durations are `None` until the events that bound them happened.
    """

    arrival_time: float
    prefill_queued_time: float | None = None
    prefill_start_time: float | None = None
    prefill_end_time: float | None = None
    first_token_time: float | None = None
    migration_start_time: float | None = None
    migration_end_time: float | None = None
    decode_start_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    transfer_tokens: int = 0
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0
    transfer_transport: str | None = None  # what moved the KV: shm, cuda-ipc or torch ("+" if several)
    transfer_blocks_pulled: int = 0
    transfer_blocks_reused: int = 0  # the decode instance's own prefix cache held them
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (not computed)
    prefill_instance: str | None = None
    decode_instance: str | None = None
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival until the first token reached the engine."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (last - first) / (n - 1), as DistServe."""
        if self.first_token_time is None or self.last_token_time is None:
            return None
        if self.num_generated_tokens < 2:
            return 0.0
        return (self.last_token_time - self.first_token_time) / (self.num_generated_tokens - 1)

    @property
    def e2e_latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time

    @property
    def prefill_queueing(self) -> float | None:
        return _span(self.arrival_time, self.prefill_start_time)

    @property
    def prefill_execution(self) -> float | None:
        return _span(self.prefill_start_time, self.prefill_end_time)

    @property
    def transfer_queueing(self) -> float | None:
        """Prefill finished until a decode instance started pulling the KV cache."""
        return _span(self.prefill_end_time, self.migration_start_time)

    @property
    def decode_queueing(self) -> float | None:
        start = self.migration_end_time or self.prefill_end_time
        return _span(start, self.decode_start_time)

    @property
    def decode_execution(self) -> float | None:
        """First decode step (colocated: right after the first token) to the last token."""
        return _span(self.decode_start_time or self.first_token_time, self.last_token_time)

    def as_dict(self) -> dict[str, float | int | str | None]:
        """All stamps and derived durations, for JSON (the API server's timeline)."""
        out: dict[str, float | int | str | None] = dict(self.__dict__)
        for name in (
            "ttft",
            "tpot",
            "e2e_latency",
            "prefill_queueing",
            "prefill_execution",
            "transfer_queueing",
            "decode_queueing",
            "decode_execution",
        ):
            out[name] = getattr(self, name)
        return out


def _span(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, end - start)


@dataclass
class CompletionOutput:
    """One generated sequence (distserve generates n=1 per request)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The output of a request so far (`finished` tells whether there is more).

    Streaming (`AsyncLLM.generate`) yields one per step with the cumulative text and ids in
    `outputs[0]`, and the new part in `delta_text` / `delta_token_ids`.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    error: str | None = None  # why a request was cut short (an instance died)


def merge_samples(request_id: str, samples: list[RequestOutput], params: SamplingParams) -> RequestOutput:
    """The finished samples of one request (each run as a request of its own, from
    `SamplingParams.samples`) as its output: all of them, or when best_of > n the n of highest
    cumulative logprob (their logprobs dropped if the request did not ask for them)."""
    chosen = list(samples)
    if params.num_samples > params.n:
        chosen = sorted(chosen, key=lambda o: -(o.outputs[0].cumulative_logprob or 0.0))[: params.n]
    completions = []
    for i, sample in enumerate(chosen):
        c = dataclasses.replace(sample.outputs[0], index=i)
        if params.logprobs is None:
            c.logprobs, c.cumulative_logprob = None, None
        completions.append(c)
    first = samples[0]
    errors = [s.error for s in samples if s.error]
    return RequestOutput(request_id=request_id, prompt=first.prompt, prompt_token_ids=first.prompt_token_ids, outputs=completions,
                         finished=all(s.finished for s in samples), metrics=first.metrics, error=errors[0] if errors else None)
