"""One instance: a scheduler and a block manager over a step executor, stepping in a loop.

    handle(message)  AddRequest / MigrateRequest / ReleaseKV / ConnectSources / AbortRequest
    step()           decode role: admit migrations and pull their KV
                     schedule -> execute -> update
                     -> StepOutput (tokens, stamps, stats), PrefillDone, MigrationDone

The executor runs a scheduled batch and pulls KV: the instance's workers (`engine/worker.py`)
in the engine, a latency model on a virtual clock in the planner's simulator
(`planner/simulator.py`), so both schedule with this very code. The instance knows nothing of
processes; `engine/instance_loop.py` hosts it for every backend.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from distserve.config import InstanceConfig, Role
from distserve.engine.messages import (
    AbortRequest,
    AddRequest,
    ConnectSources,
    InstanceMessage,
    InstanceReady,
    InstanceStats,
    MigrateRequest,
    MigrationDone,
    PrefillDone,
    ReleaseKV,
    RequestFailed,
    ResetPrefixCache,
    StatsRequest,
    StepOutput,
    TokenOutput,
)
from distserve.engine.scheduler import ScheduledBatch, Scheduler, admission_capacity
from distserve.kv.block_manager import BlockManager
from distserve.kv.cache import KVCacheHandle
from distserve.kv.transfer import KVPull
from distserve.layers.sampler import SampleResult
from distserve.request import Request, RequestStatus

logger = logging.getLogger(__name__)

Event = StepOutput | PrefillDone | MigrationDone | RequestFailed


class StepExecutor(Protocol):
    """What an instance runs its steps on."""

    num_blocks: int  # KV cache blocks
    weight_bytes: int  # model weights in memory (its driver worker's)
    num_swap_blocks: int  # swap space blocks (0: none)
    load_seconds: float
    handles: list[KVCacheHandle]  # its workers' caches, for decode instances to pull from
    # whether a failed step can be run again, a request at a time (a single worker: no other
    # worker is left waiting in a collective)
    can_rerun: bool

    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        """Run the batch; a sample for each request whose last token was computed."""

    def pull(self, pulls: list[KVPull]) -> dict[str, int]:
        """Copy KV blocks in from prefill instances; bytes moved, by transport."""

    def connect(self, sources: list[KVCacheHandle]) -> None:
        """Map the caches pulls will read, ahead of the first pull."""

    def close(self) -> None: ...


def new_request(msg: AddRequest, max_model_len: int) -> Request:
    return Request(
        request_id=msg.request_id,
        prompt_token_ids=list(msg.prompt_token_ids),
        sampling_params=msg.sampling_params,
        arrival_time=msg.arrival_time,
        eos_token_ids=msg.eos_token_ids,
        max_model_len=max_model_len,
    )


class Instance:
    def __init__(
        self, config: InstanceConfig, executor: StepExecutor, max_model_len: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.name = config.name
        self.executor = executor
        self.clock = clock
        self.blocks = BlockManager(executor.num_blocks, config.block_size, config.enable_prefix_caching)
        # a request stops at the model's context, or at what this instance's cache can hold
        self.max_model_len = min(max_model_len, admission_capacity(executor.num_blocks) * config.block_size)
        self.swap = BlockManager(executor.num_swap_blocks, config.block_size) if executor.num_swap_blocks else None
        self.scheduler = Scheduler(config, self.blocks, self.swap)
        self._sources: dict[str, tuple[str, list[KVCacheHandle], list[int]]] = {}
        self._started: set[str] = set()
        self._step_log = None
        if config.step_log:
            Path(config.step_log).mkdir(parents=True, exist_ok=True)
            self._step_log = open(Path(config.step_log) / f"{self.name}.jsonl", "a", buffering=1)
        self.stats = InstanceStats(
            name=self.name,
            role=config.role,
            num_waiting=0,
            num_running=0,
            num_swapped=0,
            num_awaiting_pull=0,
            num_pending_migrations=0,
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_free=self.blocks.num_free_blocks,
            block_size=config.block_size,
            weight_bytes=executor.weight_bytes,
        )

    def ready_message(self, pid: int) -> InstanceReady:
        return InstanceReady(
            name=self.name,
            pid=pid,
            num_blocks=self.blocks.num_blocks,
            block_size=self.config.block_size,
            kv_handles=self.executor.handles,
            load_seconds=self.executor.load_seconds,
        )

    # -- messages -------------------------------------------------------------------------
    def handle(self, msg: InstanceMessage) -> InstanceStats | None:
        """Take a message in; a `StatsRequest` or `ResetPrefixCache` is answered with the stats."""
        match msg:
            case AddRequest():
                self.scheduler.add(new_request(msg, self.max_model_len))
            case MigrateRequest():
                request = new_request(msg.request, self.max_model_len)
                for token in msg.output_token_ids:
                    request.append_token(token)
                request.num_preemptions = msg.num_prefill_preemptions
                self._sources[request.request_id] = (msg.source, msg.source_handles, msg.source_blocks)
                self.scheduler.add_migration(request)
            case ReleaseKV():
                self.scheduler.release(msg.request_id)
            case ConnectSources():
                self.executor.connect(msg.handles)
            case AbortRequest():
                self.scheduler.abort(msg.request_id)
                self._sources.pop(msg.request_id, None)
                self._started.discard(msg.request_id)
            case StatsRequest():
                return self.current_stats()
            case ResetPrefixCache():
                if not self.blocks.reset_prefix_cache():
                    logger.warning("instance %s: prefix cache not reset, requests hold cached blocks", self.name)
                return self.current_stats()
            case _:
                raise TypeError(f"instance {self.name} got an unknown message {type(msg).__name__}")
        return None

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[Event]:
        events: list[Event] = []
        if self.config.role is Role.DECODE:
            events.extend(self._pull_migrations())
        batch = self.scheduler.schedule()
        if not batch.requests:
            self._update_stats()
            return events
        # what the step log records is the batch as scheduled, before the step updates it
        logged = self._step_entry(batch) if self._step_log is not None else None
        start = self.clock()
        try:
            samples = self.executor.execute(batch)
        except Exception:
            if not self.executor.can_rerun or batch.swap_in or batch.swap_out:
                raise
            batch, samples, failed = self._rerun_alone(batch)
            events.extend(failed)
            if not batch.requests:
                self._update_stats()
                return events
        finished = self.scheduler.update(batch, samples)
        end = self.clock()
        if logged is not None:
            self._write_step(logged, start, end)
        out = StepOutput(instance=self.name, step_start=start, step_end=end)
        done = {r.request_id for r in finished}
        started, tokens = self._started, out.tokens
        for request, sample in zip(batch.requests, samples):
            rid = request.request_id
            if rid not in started:
                started.add(rid)
                out.started.append(rid)
                if request.num_cached_tokens:
                    out.cached_tokens[rid] = request.num_cached_tokens
            if sample is None:
                continue
            if rid in done:
                tokens.append(TokenOutput(rid, sample.token_id, request.status.value, request.stop_reason, sample.logprob,
                                          sample.rank, sample.top_logprobs))
                continue
            tokens.append(TokenOutput(rid, sample.token_id, None, None, sample.logprob, sample.rank, sample.top_logprobs))
            if request.status is RequestStatus.AWAITING_PULL:
                events.append(PrefillDone(rid, self.name, list(request.block_table), request.num_computed_tokens,
                                          request.num_preemptions))
        out.preempted = [r.request_id for r in batch.preempted]
        for request in finished:
            self._started.discard(request.request_id)
        self.stats.num_steps += 1
        self.stats.busy_seconds += end - start
        self.stats.num_preemptions += len(batch.preempted)
        out.stats = self._update_stats().snapshot()
        # the step's tokens go first: a PrefillDone refers to the first token they carry
        return [out, *events]

    def _rerun_alone(self, batch: ScheduledBatch) -> tuple[ScheduledBatch, list[SampleResult | None], list[RequestFailed]]:
        """A step raised: run each of its requests alone (writing a request's KV again writes
        the same values), so that only the requests that fail by themselves fail."""
        logger.exception("instance %s: a step of %d requests failed; running each alone", self.name, len(batch))
        kept = ScheduledBatch(preempted=batch.preempted)
        samples: list[SampleResult | None] = []
        failed: list[RequestFailed] = []
        for request, n in zip(batch.requests, batch.num_new_tokens):
            try:
                sample = self.executor.execute(ScheduledBatch([request], [n]))[0]
            except Exception as exc:
                logger.exception("instance %s: request %s fails alone; it is dropped", self.name, request.request_id)
                self.scheduler.abort(request.request_id)
                self._sources.pop(request.request_id, None)
                self._started.discard(request.request_id)
                failed.append(RequestFailed(request.request_id, self.name, f"the engine failed on this request: "
                                            f"{type(exc).__name__}: {exc}"))
                continue
            kept.add(request, n)
            samples.append(sample)
        return kept, samples, failed

    @staticmethod
    def _step_entry(batch: ScheduledBatch) -> dict[str, list]:
        """A step as the log records it: its shape, and which requests computed how many
        tokens (what the simulator's own scheduling is checked against)."""
        shape = batch.shape()
        return {
            "prefill": shape.prefill,
            "prefill_context": shape.prefill_context,
            "decode": shape.decode,
            "requests": [[r.request_id, n] for r, n in zip(batch.requests, batch.num_new_tokens)],
        }

    def _write_step(self, entry: dict[str, list], start: float, end: float) -> None:
        assert self._step_log is not None
        self._step_log.write(json.dumps({"start": start, "seconds": end - start, **entry}) + "\n")

    def _pull_migrations(self) -> list[Event]:
        """Decode role: admit the prefilled requests there is room for and pull their KV."""
        events: list[Event] = []
        bs = self.config.block_size
        for request in self.scheduler.admit_migrations():
            source, handles, src_blocks = self._sources.pop(request.request_id)
            reused = request.num_computed_tokens // bs  # the prompt's blocks held here already
            start = self.clock()
            pull = KVPull(handles, src_blocks[reused:], request.block_table[reused : len(src_blocks)],
                          request.num_prompt_tokens - reused * bs)
            by_transport = self.executor.pull([pull]) if pull.src_blocks else {}
            end = self.clock()
            moved = sum(by_transport.values())
            for transport, n in by_transport.items():
                self.stats.transferred_bytes_by_transport[transport] = self.stats.transferred_bytes_by_transport.get(transport, 0) + n
            request.num_computed_tokens = request.num_prompt_tokens
            self.scheduler.name_blocks(request, request.num_prompt_tokens)
            self.scheduler.start_running(request)
            self.stats.num_transfers += 1
            self.stats.transferred_tokens += pull.num_tokens
            self.stats.transferred_bytes += moved
            self.stats.transfer_seconds += end - start
            events.append(
                MigrationDone(
                    request_id=request.request_id,
                    instance=self.name,
                    source=source,
                    start=start,
                    end=end,
                    num_tokens=pull.num_tokens,
                    num_bytes=moved,
                    transports=tuple(sorted(by_transport)),
                    num_pulled_blocks=len(pull.src_blocks),
                    num_reused_blocks=reused,
                )
            )
        return events

    def _update_stats(self) -> InstanceStats:
        s, sched = self.stats, self.scheduler
        s.num_waiting = len(sched.waiting)
        s.num_running = len(sched.running)
        s.num_swapped = len(sched.swapped)
        s.num_awaiting_pull = len(sched.awaiting_pull)
        s.num_pending_migrations = len(sched.migrations)
        s.kv_blocks_free = self.blocks.num_free_blocks
        s.num_recomputes = sched.num_recomputes
        s.num_swaps = sched.num_swaps
        s.prefix_cache_queries = self.blocks.num_queried_tokens
        s.prefix_cache_hits = self.blocks.num_hit_tokens
        s.prefix_cache_blocks = self.blocks.num_cached_blocks
        return s

    def current_stats(self) -> InstanceStats:
        return self._update_stats().snapshot()

    def close(self) -> None:
        if self._step_log:
            self._step_log.close()
        self.executor.close()
