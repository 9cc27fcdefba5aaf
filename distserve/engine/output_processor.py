"""Requests out: generated tokens turned into text (incrementally, stop strings applied),
logprobs and the request's output so far.

The controller reports tokens as `RequestUpdate`s; `OutputProcessor.process` applies them to
each request's `RequestState` and returns the new `RequestOutput`s, and the requests a stop
string finished, which the engine must release on its instances (they do not know text).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from distserve.engine.messages import RequestUpdate, TokenOutput
from distserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, TokenLogprobs
from distserve.sampling_params import SamplingParams
from distserve.tokenizer import IncrementalDetokenizer


@dataclass
class RequestState:
    """A request's output so far: its tokens, text, logprobs, and how it finished."""

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


class OutputProcessor:
    """Every unfinished request's `RequestState`, updated from the controller's news."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams, metrics: RequestMetrics
    ) -> None:
        self.states[request_id] = RequestState(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            params=params,
            metrics=metrics,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params),
        )

    def process(self, updates: list[RequestUpdate]) -> tuple[list[RequestOutput], list[str]]:
        """The outputs of the requests with news (each once, finished ones forgotten), and the
        ids of those a stop string finished (still running on their instances)."""
        touched: dict[str, RequestState] = {}
        stopped: list[str] = []
        for update in updates:
            state = self.states.get(update.request_id)
            if state is None or state.finished:
                continue
            touched[state.request_id] = state
            if update.error is not None:
                state.finish("abort", None, update.time, error=update.error)
                continue
            for token in update.tokens:
                state.add_token(token, self.tokenizer, update.time)
                if state.finished:
                    if token.finish_reason is None:  # a stop string: the instance does not know
                        stopped.append(state.request_id)
                    break
        outputs = []
        for rid, state in touched.items():
            outputs.append(state.output())
            if state.finished:
                del self.states[rid]
        return outputs, stopped

    def abort(self, request_id: str, now: float) -> RequestOutput | None:
        """Finish a request at the front's request (its instances are told by the caller)."""
        return self.fail(request_id, None, now)

    def fail(self, request_id: str, error: str | None, now: float) -> RequestOutput | None:
        """Finish a request as aborted, with `error` if it failed (the caller tells its instances)."""
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        state.finish("abort", None, now, error=error)
        return state.output()
