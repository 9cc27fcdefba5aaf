"""A request as an instance tracks it: its tokens, how many have KV in the cache, its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from distserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)prefill
    RUNNING = "running"  # in the running batch
    SWAPPED = "swapped"  # preempted, KV in swap space
    AWAITING_PULL = "awaiting_pull"  # prefilled; blocks held until a decode instance pulls them
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass
class Request:
    """Engine-side state of one request.

    `token_ids` is prompt + output so far. The KV of the first `num_computed_tokens` of them
    is in the cache, in the blocks of `block_table`. A step computes the next
    `num_new_tokens` and, when that reaches the last token, samples one more.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    output_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    swap_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | None = None
    num_preemptions: int = 0
    # prefix caching: the names of its full blocks (`block_manager.prefix_hashes`), how many
    # of its blocks are named in the cache, and the prompt tokens it found there when admitted
    block_hashes: list[int] = field(default_factory=list)
    num_named_blocks: int = 0
    num_cached_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def check_stop(self) -> RequestStatus | None:
        """The finish status after the last appended token, or None to keep generating."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if last in params.stop_token_ids:
            self.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
        if not params.ignore_eos and last in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(self.output_token_ids) >= params.max_tokens or self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
