"""Which requests run in the next step, and with how many tokens each.

    colocated:  waiting ──prefill──> running ──decode──> finished     (a step: the running
                requests' next tokens, then new prompts whole, under one token budget)
    chunked:    waiting ──chunks + decodes under one token budget──> running ──> finished
    prefill:    waiting ──prefill──> awaiting_pull ──(decode pulled)──> released
    decode:     migrations ──admit when blocks──> (KV pulled) running ──decode──> finished

Running requests that cannot get a block are preempted, latest first: by recompute (blocks
freed, the request prefills again later with its generated tokens) or by swap (blocks copied
to swap space and back). A decode instance swaps by default and counts any recompute.

With prefix caching, a request admitted with nothing computed starts after the longest prefix
of its tokens whose blocks the cache holds (`kv/block_manager.py`; at least its last token is
computed, for its logits), and a decode instance pulls only the blocks of a migrated request
it does not hold. The full blocks a step computes are named in the cache as it is scheduled,
so a request admitted later in the same step (another sample of one prompt) shares them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from distserve.config import InstanceConfig, Policy, PreemptionMode, Role
from distserve.kv.block_manager import BlockManager, prefix_hashes
from distserve.layers.sampler import SampleResult
from distserve.request import Request, RequestStatus

WATERMARK = 0.01  # fraction of blocks kept free when admitting, so a new batch does not thrash


def watermark_blocks(num_blocks: int) -> int:
    return max(1, int(WATERMARK * num_blocks)) if num_blocks > 16 else 0


def admission_capacity(num_blocks: int) -> int:
    """Blocks one request may take on an instance of `num_blocks` (the rest is watermark)."""
    return num_blocks - watermark_blocks(num_blocks)


@dataclass
class ScheduledBatch:
    """One step: each request computes `num_new_tokens[i]` tokens (1 for a decode)."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, swap block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (swap block, device block)
    preempted: list[Request] = field(default_factory=list)

    def add(self, request: Request, num_new_tokens: int) -> None:
        self.requests.append(request)
        self.num_new_tokens.append(num_new_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)

    def shape(self) -> BatchShape:
        """What a step's time is a function of: the prompt tokens each prefill (or chunk)
        computes with the context before it, and each decode's context."""
        shape = BatchShape()
        decode, prefill, context = shape.decode, shape.prefill, shape.prefill_context
        for request, n in zip(self.requests, self.num_new_tokens):
            computed = request.num_computed_tokens
            if n == 1 and len(request.token_ids) > len(request.prompt_token_ids):
                decode.append(computed + 1)
            else:
                prefill.append(n)
                context.append(computed)
        return shape


@dataclass
class BatchShape:
    """A step's work as a latency model sees it (also a line of the step log)."""

    prefill: list[int] = field(default_factory=list)  # tokens of each prompt or chunk
    prefill_context: list[int] = field(default_factory=list)  # tokens before each of them
    decode: list[int] = field(default_factory=list)  # context of each decode, its new token included


class Scheduler:
    def __init__(self, config: InstanceConfig, blocks: BlockManager, swap: BlockManager | None) -> None:
        self.role = config.role
        self.chunked = config.chunked_prefill
        self.policy = config.phase.policy
        self.max_num_seqs = config.phase.max_num_seqs
        self.max_num_batched_tokens = config.phase.max_num_batched_tokens or 1 << 30
        self.preemption_mode = config.preemption_mode
        self.blocks = blocks
        self.swap = swap
        self.watermark = watermark_blocks(blocks.num_blocks)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.migrations: deque[Request] = deque()  # decode role: prefilled, not yet pulled
        self.awaiting_pull: dict[str, Request] = {}  # prefill role: blocks held for a pull
        self.num_recomputes = 0
        self.num_swaps = 0

    # -- queues ---------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_migration(self, request: Request) -> None:
        self.migrations.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self.migrations)

    def find(self, request_id: str) -> Request | None:
        for queue in (self.waiting, self.running, self.swapped, self.migrations):
            for request in queue:
                if request.request_id == request_id:
                    return request
        return self.awaiting_pull.get(request_id)

    def abort(self, request_id: str) -> Request | None:
        """Drop a request wherever it is and free its blocks."""
        request = self.find(request_id)
        if request is None:
            return None
        for queue in (self.waiting, self.running, self.swapped, self.migrations):
            if request in queue:
                queue.remove(request)
        self.awaiting_pull.pop(request_id, None)
        self._free(request)
        request.status = RequestStatus.FINISHED_ABORTED
        return request

    def release(self, request_id: str) -> Request | None:
        """Prefill role: a decode instance pulled the KV; free the blocks."""
        request = self.awaiting_pull.pop(request_id, None)
        if request is not None:
            self._free(request)
        return request

    def _free(self, request: Request) -> None:
        self.blocks.free(request.block_table)
        if self.swap is not None:
            self.swap.free(request.swap_table)

    # -- decode role: admitting migrations ------------------------------------------------
    def admit_migrations(self) -> list[Request]:
        """Prefilled requests this decode instance has room for, with blocks allocated.

        The caller pulls each one's KV into `block_table` before the next step.
        """
        admitted: list[Request] = []
        while self.migrations and len(self.running) + len(admitted) < self.max_num_seqs and not self.swapped:
            request = self.migrations[0]
            # the prompt's blocks this instance holds already are not pulled
            if not self._admit_with_cached_prefix(request, request.num_prompt_tokens, request.num_tokens):
                break
            self.migrations.popleft()
            admitted.append(request)
        return admitted

    def _admit_with_cached_prefix(self, request: Request, max_cached: int, num_tokens: int) -> bool:
        """Give a request with no blocks the cached blocks of its longest prefix within
        `max_cached` tokens, and room up to `num_tokens` tokens, if the cache has room for
        them (watermark kept); else change nothing."""
        blocks = self.blocks
        hits: list[int] = []
        if blocks.enable_caching:
            request.block_hashes = prefix_hashes(request.token_ids, blocks.block_size, request.block_hashes)
            hits = blocks.cached_prefix(request.token_ids, request.block_hashes, max_cached)
        needed = blocks.blocks_for(num_tokens) - len(hits)
        if needed + self.watermark > blocks.num_free_blocks - blocks.num_evictable(hits):
            return False
        if blocks.enable_caching:
            blocks.take(hits, max_cached)
        request.block_table = hits
        request.num_named_blocks = len(hits)
        cached = len(hits) * blocks.block_size
        request.num_computed_tokens = cached
        if request.num_preemptions == 0:
            request.num_cached_tokens = min(cached, request.num_prompt_tokens)
        blocks.grow(request.block_table, num_tokens)
        return True

    def name_blocks(self, request: Request, num_tokens: int) -> None:
        """Name in the cache the request's full blocks up to `num_tokens` (computed, or being
        computed this step)."""
        if num_tokens // self.blocks.block_size > request.num_named_blocks:
            request.block_hashes = prefix_hashes(request.token_ids, self.blocks.block_size, request.block_hashes, num_tokens)
            request.num_named_blocks = self.blocks.cache_blocks(request.block_table, request.token_ids, request.block_hashes,
                                                                request.num_named_blocks, num_tokens)

    def start_running(self, request: Request) -> None:
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    # -- the step -------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        if self.role is Role.PREFILL:
            self._schedule_waiting(batch, budget)
        else:
            # Iteration-level batching (Orca's): every running request's next token first, so
            # decodes advance in every step (a prefill-only step would stall them for its whole
            # length), then swapped requests back in, then new prompts in what is left of the
            # budget: whole, or in chunked mode a chunk. On a decode instance the waiting
            # queue only holds recomputed preemptions.
            budget = self._schedule_running(batch, budget)
            if not batch.preempted:
                budget = self._schedule_swap_in(batch, budget)
                if not self.swapped:
                    self._schedule_waiting(batch, budget)
        return batch

    def _waiting_order(self) -> list[Request]:
        if self.policy is Policy.SJF:
            return sorted(self.waiting, key=lambda r: (r.num_tokens, r.arrival_time))
        return list(self.waiting)

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> int:
        """Admit waiting requests (whole prompts, or a chunk of one in chunked mode). A whole
        prompt longer than what is left of the budget runs only as the step's one prompt."""
        prompts = 0
        for request in self._waiting_order():
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            fresh = not request.block_table  # nothing computed: its prefix may be cached
            computed = self._cached_prefix_tokens(request) if fresh else request.num_computed_tokens
            remaining = request.num_tokens - computed
            n = min(remaining, budget) if self.chunked else remaining
            if n > budget and prompts:
                break
            end = computed + n
            if fresh:
                if not self._admit_with_cached_prefix(request, request.num_tokens - 1, end):
                    break
            elif self.blocks.can_grow(request.block_table, end, self.watermark):
                self.blocks.grow(request.block_table, end)
            else:
                break
            self.name_blocks(request, end)
            self.waiting.remove(request)
            self.start_running(request)
            batch.add(request, n)
            budget -= n
            prompts += 1
        return budget

    def _cached_prefix_tokens(self, request: Request) -> int:
        """Tokens a request with no blocks would find cached if admitted now."""
        if not self.blocks.enable_caching:
            return 0
        request.block_hashes = prefix_hashes(request.token_ids, self.blocks.block_size, request.block_hashes)
        return len(self.blocks.cached_prefix(request.token_ids, request.block_hashes, request.num_tokens - 1)) * self.blocks.block_size

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        """Next tokens of the running requests, preempting the latest when blocks run out."""
        i = 0
        block_size = self.blocks.block_size
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            end = request.num_computed_tokens + n
            if end <= len(request.block_table) * block_size:  # its blocks have room (most decodes)
                batch.add(request, n)
                budget -= n
                i += 1
                if end // block_size > request.num_named_blocks:
                    self.name_blocks(request, end)
                continue
            while not self.blocks.can_grow(request.block_table, end):
                victim = self.running.pop()
                self._preempt(victim, batch)
                if victim is request:
                    break
            else:
                self.blocks.grow(request.block_table, end)
                self.name_blocks(request, end)
                batch.add(request, n)
                budget -= n
                i += 1
                continue
            break
        return budget

    def _preempt(self, request: Request, batch: ScheduledBatch) -> None:
        request.num_preemptions += 1
        batch.preempted.append(request)
        needed = len(request.block_table)
        if self.preemption_mode is PreemptionMode.SWAP and self.swap is not None and self.swap.num_free_blocks >= needed:
            request.swap_table = self.swap.allocate(needed)
            batch.swap_out.extend(zip(request.block_table, request.swap_table))
            self.blocks.free(request.block_table)
            request.status = RequestStatus.SWAPPED
            self.swapped.append(request)
            self.num_swaps += 1
            return
        self.blocks.free(request.block_table)
        request.num_computed_tokens = 0
        request.num_named_blocks = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_recomputes += 1

    def _schedule_swap_in(self, batch: ScheduledBatch, budget: int) -> int:
        while self.swapped and len(self.running) < self.max_num_seqs:
            assert self.swap is not None
            request = self.swapped[0]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if n <= 0 or not self.blocks.can_grow([], request.num_computed_tokens + n, self.watermark):
                break
            self.swapped.popleft()
            table = self.blocks.allocate(len(request.swap_table))
            batch.swap_in.extend(zip(request.swap_table, table))
            self.swap.free(request.swap_table)
            request.block_table = table
            request.num_named_blocks = request.num_computed_tokens // self.blocks.block_size  # its own copies: not named
            self.blocks.grow(request.block_table, request.num_computed_tokens + n)
            self.start_running(request)
            batch.add(request, n)
            budget -= n
        return budget

    # -- after the step -------------------------------------------------------------------
    def update(self, batch: ScheduledBatch, samples: list[SampleResult | None]) -> list[Request]:
        """Account the step; returns the requests that finished (their blocks freed, except
        a prefill instance's unfinished requests, which wait for their pull)."""
        finished: list[Request] = []
        for request, n, sample in zip(batch.requests, batch.num_new_tokens, samples):
            request.num_computed_tokens += n
            if sample is None:
                continue
            request.append_token(sample.token_id)
            status = request.check_stop()
            if status is not None:
                request.status = status
                self.running.remove(request)
                self._free(request)
                finished.append(request)
            elif self.role is Role.PREFILL:
                self.running.remove(request)
                request.status = RequestStatus.AWAITING_PULL
                self.awaiting_pull[request.request_id] = request
        return finished
