"""One instance: a scheduler, a block manager and a model runner, stepping in a loop.

    handle(message)  AddRequest / MigrateRequest / ReleaseKV / AbortRequest
    step()           decode role: admit migrations and pull their KV
                     schedule -> run -> sample -> update
                     -> StepOutput (tokens, stamps, stats), PrefillDone, MigrationDone

The instance knows nothing of processes; `backends` host it and carry its messages.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from distserve.config import InstanceConfig, ModelConfig
from distserve.distributed.group import GroupSpec
from distserve.engine.messages import (
    AbortRequest,
    AddRequest,
    ConnectSources,
    InstanceReady,
    InstanceStats,
    MigrateRequest,
    MigrationDone,
    PrefillDone,
    ReleaseKV,
    StepOutput,
    TokenOutput,
)
from distserve.engine.scheduler import ScheduledBatch, Scheduler, admission_capacity
from distserve.engine.worker import KVPull, Worker
from distserve.kv.block_manager import BlockManager
from distserve.kv.cache import KVCacheHandle
from distserve.request import Request, RequestStatus

Event = StepOutput | PrefillDone | MigrationDone


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
    def __init__(self, model_config: ModelConfig, config: InstanceConfig, group: GroupSpec | None = None) -> None:
        self.config = config
        self.name = config.name
        # this process is the instance's driver (worker 0); other workers, if any, join `group`
        self.worker = Worker(model_config, config, group, rank=0)
        self.runner = self.worker.runner
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size)
        # a request stops at the model's context, or at what this instance's cache can hold
        self.max_model_len = min(
            model_config.max_model_len, admission_capacity(self.runner.num_blocks) * config.block_size
        )
        self.swap = BlockManager(self.runner.num_swap_blocks, config.block_size) if self.runner.swap_cache else None
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
        )

    def ready_message(self, pid: int) -> InstanceReady:
        return InstanceReady(
            name=self.name,
            pid=pid,
            num_blocks=self.blocks.num_blocks,
            block_size=self.config.block_size,
            kv_handles=self.worker.handles,
            load_seconds=self.runner.load_seconds,
        )

    # -- messages -------------------------------------------------------------------------
    def handle(self, msg: object) -> list[Event]:
        if isinstance(msg, AddRequest):
            self.scheduler.add(new_request(msg, self.max_model_len))
        elif isinstance(msg, MigrateRequest):
            request = new_request(msg.request, self.max_model_len)
            for token in msg.output_token_ids:
                request.append_token(token)
            request.num_preemptions = msg.num_prefill_preemptions
            self._sources[request.request_id] = (msg.source, msg.source_handles, msg.source_blocks)
            self.scheduler.add_migration(request)
        elif isinstance(msg, ReleaseKV):
            self.scheduler.release(msg.request_id)
        elif isinstance(msg, ConnectSources):
            self.worker.connect(msg.handles)
        elif isinstance(msg, AbortRequest):
            self.scheduler.abort(msg.request_id)
            self._sources.pop(msg.request_id, None)
            self._started.discard(msg.request_id)
        else:
            raise TypeError(f"instance {self.name} got an unknown message {type(msg).__name__}")
        return []

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[Event]:
        events: list[Event] = []
        if self.config.role == "decode":
            events.extend(self._pull_migrations())
        batch = self.scheduler.schedule()
        if not batch.requests:
            self._update_stats()
            return events
        shape = self._batch_shape(batch) if self._step_log else None
        start = time.time()
        samples = self.worker.execute(batch)
        finished = self.scheduler.update(batch, samples)
        end = time.time()
        if shape is not None:
            self._step_log.write(json.dumps({"start": start, "seconds": end - start, **shape}) + "\n")
        out = StepOutput(instance=self.name, step_start=start, step_end=end)
        done = {r.request_id for r in finished}
        for request, sample in zip(batch.requests, samples):
            if request.request_id not in self._started:
                self._started.add(request.request_id)
                out.started.append(request.request_id)
            if sample is None:
                continue
            status = request.status if request.request_id in done else None
            out.tokens.append(
                TokenOutput(
                    request_id=request.request_id,
                    token_id=sample.token_id,
                    finish_reason=status.value if status else None,
                    stop_reason=request.stop_reason if status else None,
                    logprob=sample.logprob,
                    rank=sample.rank,
                    top_logprobs=sample.top_logprobs,
                )
            )
            if request.status == RequestStatus.AWAITING_PULL:
                events.append(
                    PrefillDone(
                        request_id=request.request_id,
                        instance=self.name,
                        blocks=list(request.block_table),
                        num_tokens=request.num_computed_tokens,
                        num_preemptions=request.num_preemptions,
                    )
                )
        out.preempted = [r.request_id for r in batch.preempted]
        for request in finished:
            self._started.discard(request.request_id)
        self.stats.num_steps += 1
        self.stats.busy_seconds += end - start
        self.stats.num_preemptions += len(batch.preempted)
        self._update_stats()
        out.stats = self.stats
        # the step's tokens go first: a PrefillDone refers to the first token they carry
        return [out, *events]

    @staticmethod
    def _batch_shape(batch: ScheduledBatch) -> dict[str, list[int]]:
        """What a latency model is a function of: the prompt tokens each prefill (or chunk)
        computes with the context before it, and each decode's context."""
        prefill, prefill_context, decode = [], [], []
        for request, n in zip(batch.requests, batch.num_new_tokens):
            if n == 1 and request.num_tokens > request.num_prompt_tokens:
                decode.append(request.num_computed_tokens + n)
            else:
                prefill.append(n)
                prefill_context.append(request.num_computed_tokens)
        return {"prefill": prefill, "prefill_context": prefill_context, "decode": decode}

    def _pull_migrations(self) -> list[Event]:
        """Decode role: admit the prefilled requests there is room for and pull their KV."""
        events: list[Event] = []
        for request in self.scheduler.admit_migrations():
            source, handles, src_blocks = self._sources.pop(request.request_id)
            start = time.time()
            by_transport = self.worker.pull([KVPull(handles, src_blocks, request.block_table[: len(src_blocks)])])
            end = time.time()
            moved = sum(by_transport.values())
            self.stats.transferred_bytes_by_transport.update(by_transport)
            request.num_computed_tokens = request.num_prompt_tokens
            self.scheduler.start_running(request)
            self.stats.num_transfers += 1
            self.stats.transferred_tokens += request.num_prompt_tokens
            self.stats.transferred_bytes += moved
            self.stats.transfer_seconds += end - start
            events.append(
                MigrationDone(
                    request_id=request.request_id,
                    instance=self.name,
                    source=source,
                    start=start,
                    end=end,
                    num_tokens=request.num_prompt_tokens,
                    num_bytes=moved,
                    transports=tuple(sorted(by_transport)),
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
        return s

    def current_stats(self) -> InstanceStats:
        return self._update_stats()

    def close(self) -> None:
        if self._step_log:
            self._step_log.close()
        self.worker.close()
