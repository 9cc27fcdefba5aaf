"""The controller: the event loop over the instances.

    add_requests  AddRequest to the instance the router picks for each prompt
    StepOutput    tokens -> RequestUpdates for the front; stamps of the request's timeline
    PrefillDone   KV ready on a prefill instance -> MigrateRequest to the decode instance the
                  router picks (it pulls the KV when it has the blocks)
    MigrationDone the decode instance has the KV -> ReleaseKV to the prefill instance
    release       a request the front finished (abort, stop string): AbortRequest to every
                  instance that may hold its blocks
    instance died the requests it held fail with EngineDeadError's message

It knows requests by their tokens, never their text: tokenizing and validating happen before
(`input_processor.py`), detokenizing and stop strings after (`output_processor.py`), in the
engine's front (`llm_engine.py`). Messages for an instance gather while the controller works
and leave in one send per instance. Thread-safe: the front adds and releases from one thread
while another polls.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from distserve.config import DeploymentConfig, InstanceConfig, Mode, ModelConfig, Role, resolve_instances
from distserve.engine.backends.base import Backend
from distserve.engine.errors import EngineDeadError, EngineOverloadedError
from distserve.engine.messages import (
    AbortRequest,
    AddRequest,
    ConnectSources,
    InstanceEvent,
    InstanceFailed,
    InstanceMessage,
    InstanceReady,
    InstanceStats,
    InstanceStatus,
    MigrateRequest,
    MigrationDone,
    PrefillDone,
    ReleaseKV,
    RequestFailed,
    RequestUpdate,
    StatsRequest,
    StepOutput,
)
from distserve.engine.router import InstanceLoad, Router
from distserve.engine.scheduler import admission_capacity
from distserve.outputs import RequestMetrics

logger = logging.getLogger(__name__)

DEATH_CHECK_INTERVAL = 0.2


@dataclass
class TrackedRequest:
    """Where a request is: what was sent for it, the instances that may hold its KV."""

    add: AddRequest
    metrics: RequestMetrics
    output_token_ids: list[int] = field(default_factory=list)
    holders: set[str] = field(default_factory=set)
    prefill_instance: str | None = None
    decode_instance: str | None = None

    @property
    def request_id(self) -> str:
        return self.add.request_id


def make_backend(deployment: DeploymentConfig) -> Backend:
    if deployment.backend == "ray":
        from distserve.engine.backends.ray import RayBackend

        return RayBackend(deployment.ray_address, deployment.pair_placement)
    from distserve.engine.backends.local import LocalBackend

    return LocalBackend()


def _kv_transfer_group(deployment: DeploymentConfig, configs: list[InstanceConfig], backend: Backend) -> object | None:
    """Host the store of the KV transfer group (torch.distributed pulls) when KV may move
    between machines (Ray) or the deployment asks for it, and give every worker its rank
    (in `configs`, in place)."""
    d = deployment
    if d.mode is not Mode.DISAGGREGATED or not (d.kv_transport == "torch" or (d.backend == "ray" and d.kv_transport == "auto")):
        return None
    import torch.distributed

    from distserve.kv.torch_transport import KVGroupSpec, data_backend, host_store

    host = backend.advertise_host()
    store = host_store(host)
    world = sum(c.num_workers for c in configs)
    carrier = data_backend(configs, d.backend, torch.distributed.is_nccl_available())
    first = 0
    for i, config in enumerate(configs):
        configs[i] = dataclasses.replace(config, kv_group=KVGroupSpec(host, store.port, world, first, carrier))
        first += config.num_workers
    return store


class Controller:
    """The event loop over started instances. `Controller.start` starts a deployment's on its
    backend; the planner's simulator builds one over simulated instances."""

    def __init__(
        self,
        configs: list[InstanceConfig],
        ready: dict[str, InstanceReady],
        backend: Backend,
        clock: Callable[[], float] = time.time,
        kv_store: object | None = None,
        max_queue_len: int | None = None,
    ) -> None:
        self.backend = backend
        self.clock = clock
        self.max_queue_len = max_queue_len  # prompts waiting per instance before new ones are refused
        self.configs: dict[str, InstanceConfig] = {c.name: c for c in configs}
        self.ready = ready
        self.roles = {c.role for c in configs}
        self.router = Router([InstanceLoad(c.name, c.role, ready[c.name].num_blocks, ready[c.name].block_size) for c in configs])
        self.stats: dict[str, InstanceStats] = {}
        self.requests: dict[str, TrackedRequest] = {}
        self.dead: dict[str, str] = {}
        self._kv_store = kv_store  # kept alive: the KV transfer group meets at it
        self._lock = threading.RLock()
        self._outgoing: dict[str, list[InstanceMessage]] = {}
        self._pending_stats: dict[str, InstanceStats] = {}
        self._updates: list[RequestUpdate] = []  # news not handed out by poll() yet
        self._last_death_check = 0.0
        self._closed = False
        # the front polls from its own thread; get_stats then waits for it instead of polling
        self.external_poller = False
        sources = [h for c in configs if c.role is Role.PREFILL for h in ready[c.name].kv_handles]
        for c in configs:
            if c.role is Role.DECODE:
                self._send(c.name, ConnectSources(sources))
        self._flush()

    @classmethod
    def start(
        cls, deployment: DeploymentConfig, model_config: ModelConfig, start_timeout: float = 900.0, max_queue_len: int | None = None
    ) -> Controller:
        """Start every instance of the deployment on its backend and wait until each is ready."""
        deployment.validate()
        configs = resolve_instances(deployment, model_config)
        backend = make_backend(deployment)
        kv_store = _kv_transfer_group(deployment, configs, backend)
        try:
            ready = backend.start(model_config, configs, start_timeout)
        except BaseException:  # a failed start, or Ctrl-C / SIGTERM while models load
            backend.shutdown()
            raise
        return cls(configs, ready, backend, kv_store=kv_store, max_queue_len=max_queue_len)

    def kv_capacity_tokens(self) -> dict[str, int]:
        """Tokens of KV one request may hold on each instance (the rest is the watermark)."""
        return {name: admission_capacity(r.num_blocks) * r.block_size for name, r in self.ready.items()}

    # -- outgoing messages ------------------------------------------------------------------
    def _send(self, instance: str, message: InstanceMessage) -> None:
        self._outgoing.setdefault(instance, []).append(message)

    def _flush(self) -> None:
        if not self._outgoing:
            return
        outgoing, self._outgoing = self._outgoing, {}
        for instance, messages in outgoing.items():
            if self.router.instances[instance].alive:
                self.backend.send(instance, messages)

    # -- requests in ------------------------------------------------------------------------
    def add_requests(self, requests: list[tuple[AddRequest, RequestMetrics]]) -> None:
        """Route each request's prompt; adds none, raising EngineDeadError, when no instance
        can take prompts, or EngineOverloadedError, when their queues have no room for all."""
        with self._lock:
            self._check_alive()
            now = self.clock()
            for add, _ in requests:
                if add.request_id in self.requests:
                    raise ValueError(f"request id {add.request_id!r} is already in use.")
            limit = self.max_queue_len
            if limit is not None:
                room = sum(max(0, limit - len(i.queued)) for i in self.router.prompt_instances())
                if room < len(requests):
                    raise EngineOverloadedError(
                        f"every instance already has {limit} requests waiting (--max-queue-len); retry later."
                    )
            for add, metrics in requests:
                target = self.router.route_prompt(add.request_id, len(add.prompt_token_ids), limit)
                assert target is not None  # checked above
                tracked = TrackedRequest(add, metrics, prefill_instance=target.name, holders={target.name})
                metrics.prefill_instance = target.name
                metrics.prefill_queued_time = now
                self.requests[add.request_id] = tracked
                self._send(target.name, add)
            self._flush()

    def release(self, request_id: str) -> None:
        """The front finished the request (aborted, or stopped by a stop string): free it on
        every instance that may hold its blocks."""
        with self._lock:
            tracked = self.requests.pop(request_id, None)
            if tracked is not None:
                self._release(tracked)
                self._flush()

    def _release(self, tracked: TrackedRequest) -> None:
        for name in tracked.holders:
            if self.router.instances[name].alive:
                self._send(name, AbortRequest(tracked.request_id))
        tracked.holders.clear()
        for name in (tracked.prefill_instance, tracked.decode_instance):
            if name is not None:
                self.router.unassign(name, tracked.request_id)

    def _fail(self, tracked: TrackedRequest, message: str, updates: list[RequestUpdate]) -> None:
        self.requests.pop(tracked.request_id, None)
        self._release(tracked)
        updates.append(RequestUpdate(tracked.request_id, self.clock(), error=message))

    def _check_alive(self) -> None:
        for role in self.roles:
            if not self.router.alive(role):
                raise EngineDeadError(f"no {role} instance is alive ({self._death_summary()}); restart the engine.")

    def _death_summary(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in self.dead.items()) or "none died"

    # -- events -----------------------------------------------------------------------------
    def poll(self, timeout: float = 0.05) -> list[RequestUpdate]:
        """Handle what the instances sent (waiting up to `timeout` for it); the news of each
        request, in the order it happened."""
        self._receive(timeout)
        return self.take_updates()

    def take_updates(self) -> list[RequestUpdate]:
        """The news gathered since the last call, without receiving more."""
        with self._lock:
            updates, self._updates = self._updates, []
        return updates

    def _receive(self, timeout: float) -> None:
        events = self.backend.recv(timeout)
        with self._lock:
            self.deliver(events)
            now = time.monotonic()
            if now - self._last_death_check > DEATH_CHECK_INTERVAL:
                self._last_death_check = now
                self._check_deaths(self._updates)
            self._flush()

    def deliver(self, events: list[InstanceEvent]) -> None:
        """Handle instances' events (what `poll` receives; the simulator delivers its own)."""
        with self._lock:
            for event in events:
                self._handle(event, self._updates)
            self._flush()

    def _handle(self, event: InstanceEvent, updates: list[RequestUpdate]) -> None:
        match event:
            case StepOutput():
                self._on_step(event, updates)
            case PrefillDone():
                self._on_prefill_done(event, updates)
            case MigrationDone():
                self._on_migration_done(event)
            case InstanceStats():
                self._on_stats(event)
                self._pending_stats[event.name] = event
            case RequestFailed():
                tracked = self.requests.get(event.request_id)
                if tracked is not None:
                    tracked.holders.discard(event.instance)  # it freed the blocks itself
                    self._fail(tracked, event.error, updates)
            case InstanceFailed():
                logger.error("instance %s failed:\n%s", event.name, event.error.rstrip())
                self._on_instance_death(event.name, f"failed: {event.error.strip().splitlines()[-1]}", updates)
            case InstanceReady():
                pass  # only while starting

    def _on_stats(self, stats: InstanceStats) -> None:
        self.stats[stats.name] = stats
        self.router.report_free_blocks(stats.name, stats.kv_blocks_free)

    def _on_step(self, out: StepOutput, updates: list[RequestUpdate]) -> None:
        role = self.configs[out.instance].role
        if out.stats is not None:
            self._on_stats(out.stats)
        for rid in out.started:
            tracked = self.requests.get(rid)
            if tracked is None:
                continue
            if role is Role.DECODE:
                tracked.metrics.decode_start_time = tracked.metrics.decode_start_time or out.step_start
            else:
                tracked.metrics.prefill_start_time = tracked.metrics.prefill_start_time or out.step_start
        for rid in out.preempted:
            tracked = self.requests.get(rid)
            if tracked is not None:
                tracked.metrics.num_preemptions += 1
        news: dict[str, RequestUpdate] = {}
        for token in out.tokens:
            tracked = self.requests.get(token.request_id)
            if tracked is None:
                continue
            if not tracked.output_token_ids and role is not Role.DECODE:
                tracked.metrics.prefill_end_time = out.step_end
                self.router.prefilled(out.instance, tracked.request_id)
            tracked.output_token_ids.append(token.token_id)
            update = news.get(token.request_id)
            if update is None:
                update = news[token.request_id] = RequestUpdate(token.request_id, out.step_end)
            update.tokens.append(token)
            if token.finish_reason is not None:
                tracked.holders.discard(out.instance)  # the instance freed the blocks itself
                self.requests.pop(tracked.request_id, None)
                self._release(tracked)
        updates.extend(news.values())

    def _on_prefill_done(self, done: PrefillDone, updates: list[RequestUpdate]) -> None:
        tracked = self.requests.get(done.request_id)
        if tracked is None:
            self._send(done.instance, ReleaseKV(done.request_id))
            return
        decode = self.router.route_decode(tracked.request_id, done.num_tokens)
        if decode is None:
            self._fail(tracked, f"no decode instance is alive to take the prefilled request ({self._death_summary()})", updates)
            return
        tracked.decode_instance = decode.name
        tracked.metrics.decode_instance = decode.name
        tracked.holders.add(decode.name)
        self._send(
            decode.name,
            MigrateRequest(
                request=tracked.add,
                output_token_ids=list(tracked.output_token_ids),
                source=done.instance,
                source_handles=self.ready[done.instance].kv_handles,
                source_blocks=done.blocks,
                num_prefill_preemptions=done.num_preemptions,
            ),
        )

    def _on_migration_done(self, done: MigrationDone) -> None:
        self._send(done.source, ReleaseKV(done.request_id))
        self.router.pulled(done.instance, done.request_id)
        self.router.unassign(done.source, done.request_id)
        tracked = self.requests.get(done.request_id)
        if tracked is None:
            return
        tracked.holders.discard(done.source)
        m = tracked.metrics
        m.migration_start_time, m.migration_end_time = done.start, done.end
        m.transfer_tokens += done.num_tokens
        m.transfer_bytes += done.num_bytes
        m.transfer_seconds += done.end - done.start
        m.transfer_transport = "+".join(done.transports) or None

    # -- failures -----------------------------------------------------------------------------
    def _check_deaths(self, updates: list[RequestUpdate]) -> None:
        for died in self.backend.dead():
            if died.name not in self.dead:
                self._on_instance_death(died.name, f"process {died.pid} exited with code {died.exitcode}", updates)

    def _on_instance_death(self, name: str, why: str, updates: list[RequestUpdate]) -> None:
        if name in self.dead:
            return
        self.dead[name] = why
        self.router.instances[name].alive = False
        message = f"instance {name} died ({why})"
        for tracked in list(self.requests.values()):
            if name in tracked.holders:
                tracked.holders.discard(name)
                self._fail(tracked, message, updates)

    # -- stats and shutdown ----------------------------------------------------------------
    def instance_status(self) -> list[InstanceStatus]:
        with self._lock:
            return [
                InstanceStatus(name, c.role, self.router.instances[name].alive, self.ready[name].num_blocks, self.stats.get(name),
                               self.ready[name].pid)
                for name, c in self.configs.items()
            ]

    def get_stats(self, timeout: float = 10.0) -> list[InstanceStats]:
        """Fresh stats from every live instance (the last known ones for a dead one)."""
        with self._lock:
            self._pending_stats.clear()
            alive = [name for name, load in self.router.instances.items() if load.alive]
            for name in alive:
                self._send(name, StatsRequest())
            self._flush()
        deadline = time.monotonic() + timeout
        while not all(name in self._pending_stats for name in alive) and time.monotonic() < deadline:
            if self.external_poller:
                time.sleep(0.01)
            else:
                self._receive(0.02)  # request news stays buffered for the next poll()
        return [self.stats[name] for name in self.configs if name in self.stats]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.backend.shutdown()
        self._kv_store = None
