"""A discrete-event simulator of this engine's scheduling, driven by latency models.

It follows the engine's own policies (`engine/scheduler.py`, `engine/controller.py`):

    prefill:    prompts batched under max_num_batched_tokens / max_num_seqs (FCFS or shortest
                first; a longer prompt runs alone), their KV held until a decode instance
                pulls it; no prompt is admitted while the held KV fills the cache
    decode:     a prefilled request goes to the decode instance with the most free KV; it is
                admitted when its KV fits, pulled (the step waits for the copy), and decoded
                with continuous batching; out of KV, the latest request is swapped out
    colocated:  prefill-first steps (new prompts, else one decode step for all running)
    chunked:    each step runs every decode and fills the rest of the token budget with
                prompt chunks

After a step, an instance waits the latency model's `step_gap` (the engine's own time between
two steps, measured from serving logs) before it starts the next.

A machine whose speed wanders (a shared CPU: `SpeedDrift`) stretches every step that starts in
a slow stretch of time; queueing is convex in step time, so the slow stretches cost attainment
that the fast ones do not give back, which steps at their mean time leave out.

Decoding is simulated in aggregate so that a step costs O(1), not O(batch): a running batch
is its size and the sum of its contexts, and requests leave it from a heap keyed by the step
that produces their last token. With pipeline parallelism a prefill batch takes `pp` stage
times to come out while the next enters after one, and a decode batch of B runs as `pp`
micro-batches of B / pp (each token takes `pp` stage times). KV is counted in tokens, each
request rounded up to whole blocks when admitted.

Requests come out as `RequestRecord`s scored by the benchmark's own code (`bench.metrics`).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from distserve.bench.metrics import RequestRecord
from distserve.planner.latency_model import FittedLatencyModel, LatencyModel


@dataclass
class InstanceSpec:
    role: str  # prefill | decode | colocated
    latency: LatencyModel
    kv_capacity_tokens: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    policy: str = "fcfs"
    chunked: bool = False
    block_size: int = 16


class SimRequest:
    __slots__ = ("rid", "arrival", "prompt_len", "output_len", "first_token", "last_token", "prefill_start",
                 "migration_start", "migration_end", "held", "remaining", "join_step", "join_ctx", "join_charge", "active", "done")

    def __init__(self, rid: int, arrival: float, prompt_len: int, output_len: int) -> None:
        self.rid, self.arrival, self.prompt_len, self.output_len = rid, arrival, prompt_len, output_len
        self.first_token = self.last_token = self.prefill_start = math.nan
        self.migration_start = self.migration_end = math.nan
        self.held = 0  # KV tokens held on its prefill instance until the pull
        self.remaining = output_len - 1  # tokens still to decode after the first
        self.join_step = 0
        self.join_ctx = 0
        self.join_charge = 0  # KV tokens charged when it joined the batch (whole blocks)
        self.active = False
        self.done = False


class Simulation:
    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, time: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (time, next(self._seq), action))

    def run(self) -> None:
        events = self._events
        while events:
            self.now, _, action = heapq.heappop(events)
            action()


class SpeedDrift:
    """A machine's speed wandering over time: every step starting in the k-th `window` seconds
    takes f_k times its modelled time, the f_k independent and log-normal with mean 1 and
    standard deviation `stdev` (as `benchmarks/goodput.py` reads it from serving step logs)."""

    def __init__(self, stdev: float, window: float, seed: int = 0) -> None:
        if stdev < 0 or window <= 0:
            raise ValueError(f"a speed drift needs stdev >= 0 and window > 0 seconds, not {stdev} and {window}.")
        self.sigma = math.sqrt(math.log1p(stdev * stdev))  # of the log, for that stdev of the factor
        self.window = window
        self._rng = random.Random(seed)
        self._factors: list[float] = []

    def __call__(self, time: float) -> float:
        k = max(0, int(time // self.window))
        while len(self._factors) <= k:
            self._factors.append(math.exp(self._rng.gauss(-self.sigma * self.sigma / 2, self.sigma)))
        return self._factors[k]


class DecodePool:
    """The running decode batch of an instance, in aggregate."""

    def __init__(self) -> None:
        self.step = 0  # decode steps done
        self.size = 0
        self.context_sum = 0  # sum of KV tokens of the running requests
        self._ends: list[tuple[int, int, SimRequest]] = []  # (step of last token, rid, request)
        self._newest: list[SimRequest] = []  # joining order, for preemption (lazy: skips inactive)

    def context_of(self, r: SimRequest) -> int:
        return r.join_ctx + (self.step - r.join_step)

    def charge_of(self, r: SimRequest) -> int:
        """KV tokens the request holds: its whole blocks at joining, plus a slot a step."""
        return r.join_charge + (self.step - r.join_step)

    def add(self, r: SimRequest, context: int, charge: int) -> None:
        r.join_step, r.join_ctx, r.join_charge, r.active = self.step, context, charge, True
        self.size += 1
        self.context_sum += context
        heapq.heappush(self._ends, (self.step + r.remaining, r.rid, r))
        self._newest.append(r)

    def remove(self, r: SimRequest) -> tuple[int, int]:
        """Take a request out (preemption): its context and its KV charge. Its heap entry goes stale."""
        context, charge = self.context_of(r), self.charge_of(r)
        r.remaining -= self.step - r.join_step
        r.active = False
        self.size -= 1
        self.context_sum -= context
        return context, charge

    def newest(self) -> SimRequest | None:
        while self._newest and not self._newest[-1].active:
            self._newest.pop()
        return self._newest[-1] if self._newest else None

    def advance(self, now: float) -> list[SimRequest]:
        """One decode step: every running request gains a token; returns those finished."""
        self.step += 1
        self.context_sum += self.size
        finished = []
        ends = self._ends
        while ends and ends[0][0] <= self.step:
            _, _, r = heapq.heappop(ends)
            if not r.active or r.join_step + r.remaining != self.step:
                continue  # preempted since; its new entry is elsewhere in the heap
            r.active = False
            r.done = True
            r.last_token = now
            self.size -= 1
            self.context_sum -= self.context_of(r)
            finished.append(r)
        return finished


class Instance:
    def __init__(self, sim: Simulation, spec: InstanceSpec, cluster: Cluster, name: str) -> None:
        self.sim, self.spec, self.cluster, self.name = sim, spec, cluster, name
        self.capacity = spec.kv_capacity_tokens
        self.used = 0  # KV tokens in use (running, held for a pull, or admitted)
        self.waiting: deque[SimRequest] = deque()
        self.migrations: deque[SimRequest] = deque()
        self.swapped: deque[tuple[SimRequest, int]] = deque()
        self.pool = DecodePool()
        self.prefilling: list[tuple[SimRequest, int]] = []  # chunked: (request, tokens prefilled)
        self.busy = False
        self.pp = max(1, int(getattr(spec.latency, "pp", 1)))
        self.queued_tokens = 0
        self.promised = 0
        self._fitted = isinstance(spec.latency, FittedLatencyModel)

    def rounded(self, tokens: int) -> int:
        bs = self.spec.block_size
        return -(-tokens // bs) * bs

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def wake(self) -> None:
        if not self.busy:
            self.step()

    def decode_seconds(self) -> float:
        """Time for every running request to get one token (pp micro-batches of B / pp)."""
        size, total = self.pool.size, self.pool.context_sum
        if size == 0:
            return 0.0
        micro = -(-size // self.pp)
        if self._fitted:
            stage = self.spec.latency.decode_time_sums(micro, total / self.pp)
        else:
            stage = self.spec.latency.decode_time([total // size] * micro)
        return stage * self.pp

    # -- scheduling --------------------------------------------------------------------------
    def step(self) -> None:
        spec = self.spec
        if spec.role == "prefill":
            plan = self._plan_prefill()
        elif spec.role == "decode":
            plan = self._plan_decode()
        elif spec.chunked:
            plan = self._plan_chunked()
        else:
            plan = self._plan_prefill() if not self.swapped else None
            if plan is None:
                plan = self._plan_decode()
        if plan is None:
            self.busy = False
            return
        seconds, latency, finish = plan
        self.busy = True
        start = self.sim.now
        if self.cluster.speed is not None:
            factor = self.cluster.speed(start)
            seconds, latency = seconds * factor, latency * factor
        gap = spec.latency.step_gap  # the engine's own time before it starts the next step

        def free() -> None:
            self.busy = False
            self.step()

        if latency == seconds:
            def done() -> None:
                finish(self.sim.now)
                if gap:
                    self.sim.at(self.sim.now + gap, free)
                else:
                    free()

            self.sim.at(start + seconds, done)
        else:  # a pipelined prefill: the next batch may enter after one stage
            self.sim.at(start + seconds + gap, free)
            self.sim.at(start + latency, lambda: (finish(self.sim.now), self.wake()))

    def _admit_prompts(self) -> list[SimRequest]:
        spec = self.spec
        pending = self.waiting
        if spec.policy == "sjf" and len(pending) > 1:
            order = sorted(pending, key=lambda r: (r.prompt_len, r.arrival))
        else:
            order = pending
        batch: list[SimRequest] = []
        tokens = 0
        running = self.pool.size
        extra = 0 if spec.role == "prefill" else 1
        for r in order:
            if running + len(batch) >= spec.max_num_seqs:
                break
            if batch and tokens + r.prompt_len > spec.max_num_batched_tokens:
                break
            need = self.rounded(r.prompt_len + extra)
            if need > self.free:
                break
            self.used += need
            tokens += r.prompt_len
            batch.append(r)
        if batch:
            if order is pending:
                for _ in batch:
                    pending.popleft()
            else:
                chosen = {id(r) for r in batch}
                self.waiting = deque(r for r in pending if id(r) not in chosen)
        return batch

    def _plan_prefill(self):  # noqa: ANN202 - (stage seconds, latency seconds, finish)
        batch = self._admit_prompts()
        if not batch:
            return None
        now = self.sim.now
        for r in batch:
            r.prefill_start = now
        stage = self.spec.latency.prefill_time([r.prompt_len for r in batch])

        def finish(t: float) -> None:
            for r in batch:
                self.queued_tokens -= r.prompt_len
                r.first_token = r.last_token = t
                need = self.rounded(r.prompt_len + (0 if self.spec.role == "prefill" else 1))
                if r.remaining <= 0:
                    r.done = True
                    self.used -= need
                elif self.spec.role == "prefill":
                    r.held = need
                    self.cluster.route_to_decode(r, self)
                else:
                    self.pool.add(r, r.prompt_len + 1, need)

        return stage, stage * self.pp, finish

    def release(self, r: SimRequest) -> None:
        """The decode instance pulled the request's KV: free it and maybe admit more."""
        self.used -= r.held
        r.held = 0
        self.wake()

    def _reserve_growth(self) -> None:
        """Room for every running request's next token; the newest are swapped out if not."""
        while self.pool.size and self.used + self.pool.size > self.capacity:
            victim = self.pool.newest()
            if victim is None:
                break
            context, charge = self.pool.remove(victim)
            self.used -= charge
            self.swapped.append((victim, context))

    def _plan_decode(self):  # noqa: ANN202
        spec = self.spec
        now = self.sim.now
        while self.swapped and self.pool.size < spec.max_num_seqs:
            r, context = self.swapped[0]
            if self.rounded(context + 1) > self.free:
                break
            self.swapped.popleft()
            self.used += self.rounded(context)
            self.pool.add(r, context, self.rounded(context))
        transfer = 0.0
        while self.migrations and not self.swapped and self.pool.size < spec.max_num_seqs:
            r = self.migrations[0]
            need = self.rounded(r.prompt_len + 1)
            if need > self.free:
                break
            self.migrations.popleft()
            self.promised -= need
            self.used += need
            r.migration_start = now + transfer
            transfer += self.cluster.transfer_time(r.prompt_len)
            r.migration_end = now + transfer
            self.pool.add(r, r.prompt_len + 1, need)
            self.sim.at(r.migration_end, lambda r=r: self.cluster.source[r.rid].release(r))
        self._reserve_growth()
        if self.pool.size == 0:
            return None
        seconds = transfer + self.decode_seconds()
        self.used += self.pool.size

        def finish(t: float) -> None:
            for r in self.pool.advance(t):
                self.used -= self.pool.charge_of(r)

        return seconds, seconds, finish

    def _plan_chunked(self):  # noqa: ANN202
        spec = self.spec
        budget = spec.max_num_batched_tokens - self.pool.size
        chunks: list[tuple[int, int]] = []  # (index into prefilling, tokens)
        for i, (r, done) in enumerate(self.prefilling):
            if budget <= 0:
                break
            n = min(budget, r.prompt_len - done)
            chunks.append((i, n))
            budget -= n
        while self.waiting and budget > 0 and self.pool.size + len(self.prefilling) < spec.max_num_seqs:
            r = self.waiting[0]
            need = self.rounded(r.prompt_len + 1)
            if need > self.free:
                break
            self.waiting.popleft()
            self.used += need
            r.prefill_start = self.sim.now
            self.prefilling.append((r, 0))
            n = min(budget, r.prompt_len)
            chunks.append((len(self.prefilling) - 1, n))
            budget -= n
        self._reserve_growth()
        if not chunks and self.pool.size == 0:
            return None
        chunk_time = self.spec.latency.prefill_time([n for _, n in chunks]) if chunks else 0.0
        decode_time = self.decode_seconds()
        if chunks and self.pool.size:  # one forward pass: the decode part's fixed cost is paid once
            decode_time -= self.spec.latency.decode_time([]) * self.pp
        seconds = chunk_time * self.pp + decode_time
        decoding = self.pool.size
        self.used += decoding

        def finish(t: float) -> None:
            if decoding:
                for r in self.pool.advance(t):
                    self.used -= self.pool.charge_of(r)
            still = []
            progressed = {i: n for i, n in chunks}
            for i, (r, done) in enumerate(self.prefilling):
                done += progressed.get(i, 0)
                if done < r.prompt_len:
                    still.append((r, done))
                    continue
                self.queued_tokens -= r.prompt_len
                r.first_token = r.last_token = t
                if r.remaining <= 0:
                    r.done = True
                    self.used -= self.rounded(r.prompt_len + 1)
                else:
                    self.pool.add(r, r.prompt_len + 1, self.rounded(r.prompt_len + 1))
            self.prefilling = still

        return seconds, seconds, finish


@dataclass
class ClusterSpec:
    instances: list[InstanceSpec]
    transfer_time: Callable[[int], float] = field(default=lambda tokens: 0.0)
    # the machine's speed at a time (a factor on every step starting then), shared by every
    # instance; None: steady
    speed: Callable[[float], float] | None = None


class Cluster:
    def __init__(self, sim: Simulation, spec: ClusterSpec) -> None:
        self.sim = sim
        self.transfer_time = spec.transfer_time
        self.speed = spec.speed
        self.instances = [Instance(sim, s, self, f"{s.role}-{i}") for i, s in enumerate(spec.instances)]
        self.front = [i for i in self.instances if i.spec.role in ("prefill", "colocated")]
        self.decode = [i for i in self.instances if i.spec.role == "decode"]
        self.source: dict[int, Instance] = {}
        if not self.front:
            raise ValueError("a cluster needs a prefill or colocated instance")
        if any(i.spec.role == "prefill" for i in self.front) and not self.decode:
            raise ValueError("prefill instances need a decode instance")

    def arrive(self, r: SimRequest) -> None:
        target = min(self.front, key=lambda i: (i.queued_tokens, i.pool.size)) if len(self.front) > 1 else self.front[0]
        target.queued_tokens += r.prompt_len
        target.waiting.append(r)
        self.sim.at(self.sim.now, target.wake)  # after every arrival of this instant, as an instance drains its inbox

    def route_to_decode(self, r: SimRequest, source: Instance) -> None:
        target = max(self.decode, key=lambda i: i.free - i.promised) if len(self.decode) > 1 else self.decode[0]
        self.source[r.rid] = source
        target.promised += target.rounded(r.prompt_len + 1)
        target.migrations.append(r)
        target.wake()


def simulate(spec: ClusterSpec, arrivals: Sequence[float], lengths: Sequence[tuple[int, int]]) -> list[RequestRecord]:
    """Run the requests (arrival time, (prompt, output) length) through the cluster."""
    sim = Simulation()
    cluster = Cluster(sim, spec)
    requests = [SimRequest(i, t, p, o) for i, (t, (p, o)) in enumerate(zip(arrivals, lengths))]
    capacity = max(inst.capacity for inst in cluster.instances)
    for r in requests:
        if r.prompt_len + r.output_len > capacity:
            raise ValueError(f"a request of {r.prompt_len} + {r.output_len} tokens does not fit any instance's KV cache")
        sim.at(r.arrival, lambda r=r: cluster.arrive(r))
    sim.run()
    return [
        RequestRecord(
            prompt_len=r.prompt_len,
            output_len=r.output_len,
            send_time=r.arrival,
            token_times=[r.first_token, r.last_token] if r.done else [],
            num_tokens=r.output_len if r.done else 0,
            error=None if r.done else "not finished (the cluster could not hold it)",
            server_metrics={
                "prefill_queueing": r.prefill_start - r.arrival,
                "transfer_seconds": 0.0 if math.isnan(r.migration_start) else r.migration_end - r.migration_start,
            },
        )
        for r in requests
    ]
