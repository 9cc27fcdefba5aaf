"""The planner's simulator: the engine itself, on a virtual clock, with a latency model where
the model would run.

Every instance is the engine's own `Instance` (its `Scheduler` and `BlockManager`), and the
engine's own `Controller` and `Router` route the requests and move them from prefill to
decode instances. Two things are simulated:

    SimulatedExecutor  what an instance runs its steps on: a step takes the time the latency
                       model gives its batch (pipeline stages as the engine runs them), a KV
                       pull the transfer time; either advances the instance's clock
    SimulatedBackend   carries the controller's messages to the instances' inboxes

and a discrete-event loop does what the instance processes do: an idle instance that gets a
message takes its inbox and steps; a step's events reach the controller when it ends; after
`step_gap` (the engine's own time between two steps, which a fit to serving logs measures)
the instance takes its inbox and steps again. So a scheduling or routing policy is written
once, in the engine, and simulated as it runs.

A machine whose speed wanders (a shared CPU: `SpeedDrift`) stretches every step that starts
in a slow stretch of time; queueing is convex in step time, so the slow stretches cost
attainment that the fast ones do not give back, which steps at their mean time leave out.

Requests come out as `RequestRecord`s scored by the benchmark's own code (`bench.metrics`).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from distserve.bench.metrics import RequestRecord
from distserve.config import InstanceConfig, PhaseConfig, Policy, Role
from distserve.engine.backends.base import Backend, InstanceDied
from distserve.engine.controller import Controller
from distserve.engine.instance import Instance
from distserve.engine.messages import AddRequest, InstanceMessage, RequestUpdate, StatsRequest, StepOutput
from distserve.engine.model_runner import micro_batches
from distserve.engine.router import RoutingPolicy
from distserve.engine.scheduler import BatchShape, ScheduledBatch
from distserve.kv.transfer import KVPull
from distserve.layers.sampler import SampleResult
from distserve.outputs import RequestMetrics
from distserve.planner.latency_model import LatencyModel
from distserve.sampling_params import SamplingParams

UNBOUNDED_CONTEXT = 1 << 40  # simulated requests stop at their output length, never at a context


@dataclass
class InstanceSpec:
    """One simulated instance: the engine's settings of its phase, and its step times."""

    role: Role
    latency: LatencyModel
    kv_capacity_tokens: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    policy: Policy = Policy.FCFS
    chunked: bool = False
    block_size: int = 16
    enable_prefix_caching: bool = True

    def instance_config(self, name: str, step_log: str | None = None) -> InstanceConfig:
        """The engine's configuration of this instance (what its scheduler reads)."""
        phase = PhaseConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens, policy=self.policy)
        return InstanceConfig(name=name, role=Role(self.role), phase=phase, block_size=self.block_size, device="cpu",
                              num_threads=1, cpu_cores=None, seed=0, swap_space_gb=0.0, chunked_prefill=self.chunked,
                              step_log=step_log, enable_prefix_caching=self.enable_prefix_caching)


@dataclass
class ClusterSpec:
    instances: list[InstanceSpec]
    transfer_time: Callable[[int], float] = field(default=lambda tokens: 0.0)
    # the machine's speed at a time (a factor on every step starting then), shared by every
    # instance; None: steady
    speed: Callable[[float], float] | None = None
    # a folder: each simulated instance writes the engine's step log there (virtual times)
    step_log: str | None = None
    # the engine's routing (`engine/router.py`), as a deployment sets it
    routing_policy: RoutingPolicy = RoutingPolicy.CACHE_AWARE
    conditional_prefill_tokens: int = 128


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


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimulatedExecutor:
    """Runs an instance's steps in the time its latency model gives them (a `StepExecutor`)."""

    load_seconds = 0.0
    weight_bytes = 0
    can_rerun = True

    def __init__(self, spec: InstanceSpec, clock: VirtualClock, cluster: ClusterSpec) -> None:
        self.spec = spec
        self.clock = clock
        self.cluster = cluster
        self.num_blocks = spec.kv_capacity_tokens // spec.block_size
        self.num_swap_blocks = self.num_blocks  # a decode instance swaps; room for all it holds
        self.handles = []
        self.pp = max(1, int(getattr(spec.latency, "pp", 1)))
        self.step_gap = spec.latency.step_gap
        self.speed = 1.0  # the machine's speed factor for the step under way (read at its start)

    def start_step(self) -> None:
        """A step (its KV pulls and its batch) begins: it runs at the machine's speed now."""
        if self.cluster.speed is not None:
            self.speed = self.cluster.speed(self.clock.now)

    def _advance(self, seconds: float) -> None:
        self.clock.now += seconds * self.speed

    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        self._advance(self.step_seconds(batch))
        # a sample for every request whose last token was computed (the token's value does
        # not matter: requests stop at their output length)
        return [
            SampleResult(0) if request.num_computed_tokens + n == request.num_tokens else None
            for request, n in zip(batch.requests, batch.num_new_tokens)
        ]

    def step_seconds(self, batch: ScheduledBatch) -> float:
        """The batch's time as the engine runs it: with pipeline stages, as up to `pp`
        micro-batches (each stage's time is the latency model's, which is per stage), the
        first through every stage before the last leaves."""
        latency = self.spec.latency
        shape = batch.shape()
        if self.pp == 1:
            return latency.step_time(shape)
        # the shape's lists are in batch order within each kind: split them by micro-batch
        decodes = iter(shape.decode)
        prefills = iter(zip(shape.prefill, shape.prefill_context))
        is_decode = [n == 1 and r.num_tokens > r.num_prompt_tokens for r, n in zip(batch.requests, batch.num_new_tokens)]
        stages = []
        for part in micro_batches(batch, self.pp):
            sub = BatchShape()
            for i in part:
                if is_decode[i]:
                    sub.decode.append(next(decodes))
                else:
                    tokens, context = next(prefills)
                    sub.prefill.append(tokens)
                    sub.prefill_context.append(context)
            stages.append(latency.step_time(sub))
        return sum(stages) + (self.pp - 1) * max(stages)

    def pull(self, pulls: list[KVPull]) -> dict[str, int]:
        self._advance(self.cluster.transfer_time(sum(p.num_tokens for p in pulls)))
        return {}

    def connect(self, sources: list) -> None:  # noqa: ANN001 - nothing to map
        pass

    def close(self) -> None:
        pass


@dataclass
class _Host:
    """A simulated instance process: its instance, clock and inbox."""

    instance: Instance
    clock: VirtualClock
    executor: SimulatedExecutor
    inbox: list[InstanceMessage] = field(default_factory=list)
    busy: bool = False  # stepping, or waiting out the gap after a step


class SimulatedBackend(Backend):
    """The controller's messages into the simulated instances' inboxes."""

    def __init__(self, cluster: SimulatedCluster) -> None:
        self.cluster = cluster

    def start(self, model_config, instances, timeout):  # noqa: ANN001, ANN201 - the cluster builds its instances
        raise NotImplementedError("the simulated cluster builds its own instances")

    def send(self, instance: str, messages: list[InstanceMessage]) -> None:
        self.cluster.receive(instance, messages)

    def recv(self, timeout: float) -> list:
        return []  # events are delivered at the time their step ends

    def dead(self) -> list[InstanceDied]:
        return []

    def shutdown(self, timeout: float = 10.0) -> None:
        pass


class SimulatedCluster:
    """Simulated instances under the engine's controller; `on_updates` gets the requests'
    news (`RequestUpdate`s, stamped with the virtual time) as the controller makes it."""

    def __init__(self, spec: ClusterSpec, on_updates: Callable[[list[RequestUpdate]], None]) -> None:
        self.now = 0.0
        self.on_updates = on_updates
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.hosts: dict[str, _Host] = {}
        counts: dict[Role, int] = {}
        for instance_spec in spec.instances:
            role = Role(instance_spec.role)
            name = f"{role}-{counts.setdefault(role, 0)}"
            counts[role] += 1
            clock = VirtualClock()
            executor = SimulatedExecutor(instance_spec, clock, spec)
            instance = Instance(instance_spec.instance_config(name, spec.step_log), executor, UNBOUNDED_CONTEXT, clock)
            self.hosts[name] = _Host(instance, clock, executor)
        if not any(h.instance.config.role.takes_prompts for h in self.hosts.values()):
            raise ValueError("a cluster needs a prefill or colocated instance")
        if Role.PREFILL in counts and Role.DECODE not in counts:
            raise ValueError("prefill instances need a decode instance")
        ready = {name: h.instance.ready_message(0) for name, h in self.hosts.items()}
        self.controller = Controller([h.instance.config for h in self.hosts.values()], ready, SimulatedBackend(self),
                                     clock=lambda: self.now, routing_policy=spec.routing_policy,
                                     conditional_prefill_tokens=spec.conditional_prefill_tokens)

    # -- the event loop ----------------------------------------------------------------------
    def at(self, time: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (time, next(self._seq), action))

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Run until nothing is left to happen, or `stop()` says so after an event."""
        events = self._events
        while events and not stop():
            self.now, _, action = heapq.heappop(events)
            action()

    def close(self) -> None:
        for host in self.hosts.values():
            host.instance.close()

    def receive(self, name: str, messages: list[InstanceMessage]) -> None:
        host = self.hosts[name]
        host.inbox.extend(messages)
        if not host.busy:
            host.busy = True
            # after every other event of this instant, as an instance drains its inbox
            self.at(self.now, lambda: self._step(host))

    def _step(self, host: _Host) -> None:
        """What an instance process does: take the inbox, step, send the events when the step ends."""
        instance = host.instance
        messages, host.inbox = host.inbox, []
        for message in messages:
            if not isinstance(message, StatsRequest):
                instance.handle(message)
        start = host.clock.now = self.now
        host.executor.start_step()
        events = instance.step()
        if not events:  # nothing to run until a message comes
            host.busy = False
            return
        end = host.clock.now
        gap = host.executor.step_gap if any(isinstance(e, StepOutput) for e in events) else 0.0

        def done() -> None:
            self.controller.deliver(events)
            self.on_updates(self.controller.take_updates())
            if gap:
                self.at(self.now + gap, lambda: self._step(host))
            else:
                self._step(host)

        self.at(end if end > start else start, done)


@dataclass
class Cutoff:
    """Stop a simulation once more than `max_misses` requests missed an SLO: whether a rate
    meets an attainment target is then known (it does not), and the rest is not simulated.
    `part` is what a miss is: `both` (TTFT or TPOT over), `ttft`, `tpot`, or `separate`
    (more than `max_misses` TTFT misses, or more than that many TPOT misses)."""

    ttft: float
    tpot: float
    max_misses: int
    part: str = "both"
    ttft_misses: int = 0
    tpot_misses: int = 0
    misses: int = 0

    def first_token(self, ttft: float) -> None:
        if ttft > self.ttft:
            self.ttft_misses += 1
            if self.part == "both":
                self.misses += 1

    def finished(self, ttft: float, tpot: float) -> None:
        if tpot > self.tpot:
            self.tpot_misses += 1
            if self.part == "both" and ttft <= self.ttft:
                self.misses += 1

    def reached(self) -> bool:
        if self.part == "ttft":
            return self.ttft_misses > self.max_misses
        if self.part == "tpot":
            return self.tpot_misses > self.max_misses
        if self.part == "separate":
            return max(self.ttft_misses, self.tpot_misses) > self.max_misses
        return self.misses > self.max_misses


def simulate(
    spec: ClusterSpec, arrivals: Sequence[float], lengths: Sequence[tuple[int, int]], cutoff: Cutoff | None = None
) -> list[RequestRecord]:
    """Run the requests (arrival time, (prompt, output) length) through the cluster; with a
    `cutoff`, only until it is reached (the requests not finished then come out failed)."""
    metrics = [RequestMetrics(arrival_time=t, num_prompt_tokens=p) for t, (p, _) in zip(arrivals, lengths)]
    tokens = [0] * len(metrics)

    def record(updates: list[RequestUpdate]) -> None:
        for update in updates:
            i = int(update.request_id)
            if update.tokens:
                m = metrics[i]
                if m.first_token_time is None:
                    m.first_token_time = update.time
                    if cutoff is not None:
                        cutoff.first_token(update.time - m.arrival_time)
                m.last_token_time = update.time
                tokens[i] += len(update.tokens)
                if cutoff is not None and tokens[i] == lengths[i][1]:
                    n = tokens[i]
                    tpot = 0.0 if n < 2 else (m.last_token_time - m.first_token_time) / (n - 1)
                    cutoff.finished(m.first_token_time - m.arrival_time, tpot)

    cluster = SimulatedCluster(spec, record)
    capacity = max(h.executor.num_blocks * h.executor.spec.block_size for h in cluster.hosts.values())
    for i, (m, (prompt_len, output_len)) in enumerate(zip(metrics, lengths)):
        if prompt_len + output_len > capacity:
            raise ValueError(f"a request of {prompt_len} + {output_len} tokens does not fit any instance's KV cache")
        # tokens of its own: no two simulated prompts share a prefix (cached blocks are only
        # a request's own, taken again after a recompute preemption)
        add = AddRequest(str(i), [i + 1] * prompt_len, SamplingParams(max_tokens=output_len, ignore_eos=True), m.arrival_time,
                         frozenset())
        cluster.at(m.arrival_time, lambda add=add, m=m: cluster.controller.add_requests([(add, m)]))
    cluster.run(cutoff.reached if cutoff is not None else lambda: False)
    cluster.close()
    out = []
    for (prompt_len, output_len), m, n in zip(lengths, metrics, tokens):
        done = n == output_len
        out.append(RequestRecord(
            prompt_len=prompt_len,
            output_len=output_len,
            send_time=m.arrival_time,
            token_times=[m.first_token_time, m.last_token_time] if done else [],
            num_tokens=n if done else 0,
            error=None if done else "not finished (the cluster could not hold it)",
            server_metrics={
                "prefill_queueing": (m.prefill_start_time or m.arrival_time) - m.arrival_time,
                "transfer_seconds": m.migration_end_time - m.migration_start_time if m.migration_start_time is not None else 0.0,
            },
        ))
    return out
