"""The controller's record of a request: where it is, its text so far, its timeline."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from distserve.engine.messages import TokenOutput
from distserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, TokenLogprobs
from distserve.sampling_params import SamplingParams
from distserve.tokenizer import IncrementalDetokenizer


class EngineDeadError(RuntimeError):
    """An instance holding the request died; the message says which."""


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    holders: set[str] = field(default_factory=set)  # instances that may hold its KV blocks
    prefill_instance: str | None = None
    decode_instance: str | None = None
    _delta_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_token(self, token: TokenOutput, tokenizer: PreTrainedTokenizerBase, now: float) -> None:
        """Record a generated token; finishes the request on a stop string or the
        instance's own finish."""
        if self.finished:
            return
        self.token_ids.append(token.token_id)
        self._delta_ids.append(token.token_id)
        metrics = self.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        metrics.num_generated_tokens = len(self.token_ids)
        if self.params.logprobs is not None and token.logprob is not None:
            self.cumulative_logprob += token.logprob
            entry: TokenLogprobs = {
                token.token_id: Logprob(token.logprob, tokenizer.decode([token.token_id]), token.rank)
            }
            for rank, (tid, value) in enumerate(token.top_logprobs or [], start=1):
                entry.setdefault(tid, Logprob(value, tokenizer.decode([tid]), rank))
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.append(entry)
        stop = self.detokenizer.add(token.token_id)
        if stop is not None:
            self.finish("stop", stop, now)
        elif token.finish_reason is not None:
            self.finish(token.finish_reason, token.stop_reason, now)

    def finish(self, reason: str, stop_reason: int | str | None, now: float, error: str | None = None) -> None:
        if self.finished:
            return
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.error = error
        self.metrics.finished_time = now

    def output(self) -> RequestOutput:
        """The request's output so far, with what is new since the last call as the delta."""
        delta_text = self.detokenizer.delta(self.finished)
        delta_ids, self._delta_ids = self._delta_ids, []
        completion = CompletionOutput(
            index=0,
            text=self.detokenizer.text if self.finished else self.detokenizer.text[: self.detokenizer.emitted],
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob if self.params.logprobs is not None else None,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[completion],
            finished=self.finished,
            metrics=self.metrics,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            error=self.error,
        )
