"""The controller: the event loop over the instances.

    add_requests  AddRequest to the instance the router picks for each prompt
    StepOutput    tokens -> RequestUpdates for the front; stamps of the request's timeline
    PrefillDone   KV ready on a prefill instance -> MigrateRequest to the decode instance the
                  router picks (it pulls the KV when it has the blocks)
    MigrationDone the decode instance has the KV -> ReleaseKV to the prefill instance
    release       a request the front finished (abort, stop string): AbortRequest to every
                  instance that may hold its blocks
    instance died its requests that have streamed nothing and were only on it go to another
                  instance (or wait for it to come back); the others fail with the cause. It
                  is started again, within a budget (`supervisor.py`); work for its role waits
                  while it comes back

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
    ResetPrefixCache,
    StatsRequest,
    StepOutput,
)
from distserve.engine.router import InstanceLoad, Router, RoutingPolicy
from distserve.engine.scheduler import admission_capacity
from distserve.engine.supervisor import Health, Supervisor
from distserve.outputs import RequestMetrics

logger = logging.getLogger(__name__)

DEATH_CHECK_INTERVAL = 0.2


@dataclass
class TrackedRequest:
    """Where a request is: what was sent for it, the instances that may hold its KV."""

    add: AddRequest
    metrics: RequestMetrics
    output_token_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # its prompt's block names, as the router weighs them
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
        max_restarts: int = 0,
        restart_window: float = 600.0,
        routing_policy: RoutingPolicy = RoutingPolicy.LEAST_LOADED,
        conditional_prefill_tokens: int = 0,
    ) -> None:
        self.backend = backend
        self.clock = clock
        self.max_queue_len = max_queue_len  # prompts waiting per instance before new ones are refused
        self.configs: dict[str, InstanceConfig] = {c.name: c for c in configs}
        self.ready = ready
        self.roles = {c.role for c in configs}
        loads = [InstanceLoad(c.name, c.role, ready[c.name].num_blocks, ready[c.name].block_size) for c in configs]
        self.router = Router(loads, routing_policy, conditional_prefill_tokens, shared_cores=any(c.take_turns for c in configs))
        self.stats: dict[str, InstanceStats] = {}
        self.requests: dict[str, TrackedRequest] = {}
        self.dead: dict[str, str] = {}  # why each instance last died
        # an instance in a torch.distributed KV transfer group cannot join it again alone
        self.supervisor = Supervisor({c.name: c.role for c in configs}, max_restarts, restart_window, can_restart=kv_store is None)
        self._parked: list[TrackedRequest] = []  # prompts waiting for an instance to come back
        self._starting: set[str] = set()  # instances started again, not ready yet
        self._parked_migrations: list[PrefillDone] = []  # prefilled, waiting for a decode instance to come back
        self._kv_store = kv_store  # kept alive: the KV transfer group meets at it
        self._lock = threading.RLock()
        self._outgoing: dict[str, list[InstanceMessage]] = {}
        self._pending_stats: dict[str, InstanceStats] = {}
        self._updates: list[RequestUpdate] = []  # news not handed out by poll() yet
        self._last_death_check = 0.0
        self._closed = False
        # the front polls from its own thread; get_stats then waits for it instead of polling
        self.external_poller = False
        self._connect_sources(self.configs)
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
        return cls(configs, ready, backend, kv_store=kv_store, max_queue_len=max_queue_len,
                   max_restarts=deployment.max_restarts, restart_window=deployment.restart_window,
                   routing_policy=RoutingPolicy(deployment.routing_policy),
                   conditional_prefill_tokens=deployment.conditional_prefill_tokens)

    def kv_capacity_tokens(self) -> dict[str, int]:
        """Tokens of KV one request may hold on each instance (the rest is the watermark)."""
        return {name: admission_capacity(r.num_blocks) * r.block_size for name, r in self.ready.items()}

    # -- outgoing messages ------------------------------------------------------------------
    def _send(self, instance: str, message: InstanceMessage) -> None:
        self._outgoing.setdefault(instance, []).append(message)

    def _connect_sources(self, decode_instances: list[str] | dict) -> None:  # noqa: ANN001
        """Tell decode instances the caches of the running prefill instances (all of them:
        they let go of any other)."""
        sources = [h for name, c in self.configs.items() if c.role is Role.PREFILL and self.supervisor.running(name)
                   for h in self.ready[name].kv_handles]
        for name in decode_instances:
            if self.configs[name].role is Role.DECODE and self.supervisor.running(name):
                self._send(name, ConnectSources(sources))

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
                live = self.router.prompt_instances()
                room = sum(max(0, limit - len(i.queued)) for i in live) if live else limit - len(self._parked)
                if room < len(requests):
                    raise EngineOverloadedError(
                        f"every instance already has {limit} requests waiting (--max-queue-len); retry later."
                    )
            for add, metrics in requests:
                tracked = TrackedRequest(add, metrics)
                metrics.prefill_queued_time = now
                self.requests[add.request_id] = tracked
                self._route_prompt(tracked)
            self._flush()

    def _route_prompt(self, tracked: TrackedRequest) -> None:
        """Send a request's prompt to an instance, or park it until one comes back."""
        prompt = tracked.add.prompt_token_ids
        if not tracked.block_hashes:
            tracked.block_hashes = self.router.hashes(prompt)
        target = self.router.route_prompt(tracked.request_id, prompt, tracked.block_hashes, self.max_queue_len)
        if target is None:
            target = self.router.route_prompt(tracked.request_id, prompt, tracked.block_hashes)  # re-queued: no limit
        if target is None:
            self._parked.append(tracked)
            return
        tracked.prefill_instance = target.name
        tracked.holders = {target.name}
        tracked.metrics.prefill_instance = target.name
        self._send(target.name, tracked.add)

    def release(self, request_id: str) -> None:
        """The front finished the request (aborted, or stopped by a stop string): free it on
        every instance that may hold its blocks."""
        with self._lock:
            tracked = self.requests.pop(request_id, None)
            if tracked is not None:
                self._release(tracked)
                self._parked = [t for t in self._parked if t is not tracked]
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
            if not self.supervisor.serving(role):
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
                logger.error("instance %s (pid %d) failed:\n%s", event.name, event.pid, event.error.rstrip())
                # while it starts again, its last incarnation's failure may still come in
                if not (event.name in self._starting and event.pid == self.ready[event.name].pid):
                    self._on_instance_death(event.name, f"failed: {event.error.strip().splitlines()[-1]}", updates)
            case InstanceReady():
                self._on_instance_ready(event)

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
            if role is Role.DECODE and tracked.output_token_ids:
                tracked.metrics.decode_start_time = tracked.metrics.decode_start_time or out.step_start
            else:
                tracked.metrics.prefill_start_time = tracked.metrics.prefill_start_time or out.step_start
                tracked.metrics.num_cached_tokens = out.cached_tokens.get(rid, 0)
        for rid in out.preempted:
            tracked = self.requests.get(rid)
            if tracked is not None:
                tracked.metrics.num_preemptions += 1
        news: dict[str, RequestUpdate] = {}
        for token in out.tokens:
            tracked = self.requests.get(token.request_id)
            if tracked is None:
                continue
            if not tracked.output_token_ids and out.instance == tracked.prefill_instance:
                tracked.metrics.prefill_end_time = out.step_end
                self.router.prefilled(out.instance, tracked.request_id)
            tracked.output_token_ids.append(token.token_id)
            update = news.get(token.request_id)
            if update is None:
                update = news[token.request_id] = RequestUpdate(token.request_id, out.step_end)
            update.tokens.append(token)
            if token.finish_reason is not None:
                tracked.holders.discard(out.instance)  # the instance freed the blocks itself (its cache keeps them)
                tokens = tracked.add.prompt_token_ids + tracked.output_token_ids[:-1]  # the last has no KV
                self.router.finished(out.instance, tracked.request_id, self.router.hashes(tokens, tracked.block_hashes))
                self.requests.pop(tracked.request_id, None)
                self._release(tracked)
        updates.extend(news.values())

    def _on_prefill_done(self, done: PrefillDone, updates: list[RequestUpdate]) -> None:
        tracked = self.requests.get(done.request_id)
        if tracked is None:
            self._send(done.instance, ReleaseKV(done.request_id))
            return
        decode = self.router.route_decode(tracked.request_id, tracked.add.prompt_token_ids, tracked.block_hashes)
        if decode is None and self.supervisor.coming_back(Role.DECODE):
            self._parked_migrations.append(done)  # its KV waits on the prefill instance
            return
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
        m.transfer_blocks_pulled += done.num_pulled_blocks
        m.transfer_blocks_reused += done.num_reused_blocks

    # -- failures and restarts ---------------------------------------------------------------
    def _check_deaths(self, updates: list[RequestUpdate]) -> None:
        for died in self.backend.dead():
            if self.supervisor.running(died.name) or died.name in self._starting:
                self._on_instance_death(died.name, f"process {died.pid} exited with code {died.exitcode}", updates)

    def _on_instance_death(self, name: str, why: str, updates: list[RequestUpdate]) -> None:
        """Its requests go elsewhere (nothing streamed yet) or fail; it starts again, or stays down."""
        if not (self.supervisor.running(name) or name in self._starting):
            return  # this death was handled already (its process exit and its error both tell)
        logger.error("instance %s died: %s", name, why)
        self.dead[name] = why
        self._starting.discard(name)
        self.router.reset(name, self.ready[name].num_blocks, alive=False)
        restart = self.supervisor.died(name)
        message = f"instance {name} died ({why})"
        for tracked in list(self.requests.values()):
            if name not in tracked.holders:
                continue
            tracked.holders.discard(name)
            if not tracked.output_token_ids and not tracked.holders:  # nothing streamed: run it elsewhere
                tracked.prefill_instance = None
                self._route_prompt(tracked)
            else:
                self._fail(tracked, message, updates)
        for done in [d for d in self._parked_migrations if d.instance == name]:  # their KV is gone
            self._parked_migrations.remove(done)
            tracked = self.requests.get(done.request_id)
            if tracked is not None:
                self._fail(tracked, message, updates)
        self.backend.reclaim(self.ready[name])
        self._connect_sources(list(self.configs))  # decode instances let go of its cache
        if restart:
            logger.warning("starting %s again (restart %d)", name, self.supervisor.restarts[name])
            self._starting.add(name)
            self.backend.restart(self.configs[name])
        else:
            logger.error("%s stays down: %s", name, "its restart budget is spent" if self.supervisor.max_restarts
                         else "restarts are off (or not possible with a torch.distributed KV transfer group)")
            self._fail_parked(updates)

    def _on_instance_ready(self, ready: InstanceReady) -> None:
        """A restarted instance is up: it takes work again, and what waited for it."""
        if ready.name not in self._starting:
            return
        self._starting.discard(ready.name)
        self.ready[ready.name] = ready
        self.router.reset(ready.name, ready.num_blocks, alive=True)
        self.supervisor.ready(ready.name)
        self.dead.pop(ready.name, None)
        logger.warning("%s is serving again (pid %d)", ready.name, ready.pid)
        self._connect_sources(list(self.configs))
        parked, self._parked = self._parked, []
        for tracked in parked:
            self._route_prompt(tracked)
        migrations, self._parked_migrations = self._parked_migrations, []
        for done in migrations:
            self._on_prefill_done(done, self._updates)

    def _fail_parked(self, updates: list[RequestUpdate]) -> None:
        """Requests waiting for a role that no instance serves any more fail."""
        for role in self.roles:
            if self.supervisor.serving(role):
                continue
            message = f"no {role} instance is alive ({self._death_summary()})"
            for tracked in [t for t in self._parked if role.takes_prompts]:
                self._parked.remove(tracked)
                self._fail(tracked, message, updates)
            for done in [d for d in self._parked_migrations if role is Role.DECODE]:
                self._parked_migrations.remove(done)
                tracked = self.requests.get(done.request_id)
                if tracked is not None:
                    self._fail(tracked, message, updates)

    def health(self) -> Health:
        with self._lock:
            return self.supervisor.health()

    def serving_now(self) -> bool:
        """Whether every role has an instance running (requests are served, not parked)."""
        with self._lock:
            return all(any(self.supervisor.running(n) for n, c in self.configs.items() if c.role is role) for role in self.roles)

    # -- stats and shutdown ----------------------------------------------------------------
    def instance_status(self) -> list[InstanceStatus]:
        with self._lock:
            return [
                InstanceStatus(name, c.role, self.supervisor.running(name), self.ready[name].num_blocks, self.stats.get(name),
                               self.ready[name].pid, str(self.supervisor.state[name]), self.supervisor.restarts[name])
                for name, c in self.configs.items()
            ]

    def get_stats(self, timeout: float = 10.0) -> list[InstanceStats]:
        """Fresh stats from every live instance (the last known ones for a dead one)."""
        return self._ask_all(StatsRequest, timeout)

    def reset_prefix_cache(self, timeout: float = 10.0) -> bool:
        """Every instance forgets its cached blocks, and the router its index of them; False
        when an instance kept some (requests held them)."""
        stats = self._ask_all(ResetPrefixCache, timeout)
        with self._lock:
            self.router.forget_cached()
        return all(s.prefix_cache_blocks == 0 for s in stats)

    def _ask_all(self, message: type[StatsRequest] | type[ResetPrefixCache], timeout: float) -> list[InstanceStats]:
        """Send every live instance `message` and wait for the stats each answers with."""
        with self._lock:
            self._pending_stats.clear()
            alive = [name for name, load in self.router.instances.items() if load.alive]
            for name in alive:
                self._send(name, message())
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
