"""The controller: the engine a user talks to, in front of the instances.

    add_request ──tokenize, validate──> least-loaded prefill (or colocated) instance
    StepOutput    tokens -> detokenize, stop strings, timeline; finished -> done
    PrefillDone   KV ready on a prefill instance -> decode instance with the most room
                  (MigrateRequest: it pulls the KV when it has the blocks)
    MigrationDone the decode instance has the KV -> ReleaseKV to the prefill instance
    abort         AbortRequest to every instance that may hold the request's blocks
    instance died the requests it held fail with EngineDeadError's message

Thread-safe: `AsyncLLM` adds and aborts from its event loop while a thread polls.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from dataclasses import dataclass

from distserve.config import DeploymentConfig, InstanceConfig, resolve_instances
from distserve.engine.backends.base import Backend
from distserve.engine.messages import (
    AbortRequest,
    AddRequest,
    ConnectSources,
    InstanceFailed,
    InstanceReady,
    InstanceStats,
    MigrateRequest,
    MigrationDone,
    PrefillDone,
    ReleaseKV,
    StatsRequest,
    StepOutput,
)
from distserve.engine.request_state import EngineDeadError, RequestState
from distserve.engine.scheduler import admission_capacity
from distserve.outputs import RequestMetrics
from distserve.sampling_params import SamplingParams
from distserve.tokenizer import IncrementalDetokenizer, eos_token_ids, load_tokenizer
from distserve.weights.source import load_model_config

PromptType = str | list[int] | dict
DEATH_CHECK_INTERVAL = 0.2


@dataclass
class InstanceView:
    """What the controller knows of an instance, for routing."""

    config: InstanceConfig
    ready: InstanceReady
    stats: InstanceStats | None = None
    alive: bool = True

    def __post_init__(self) -> None:
        self.queued: dict[str, int] = {}  # prompt tokens sent and not prefilled yet
        self.assigned: set[str] = set()  # unfinished requests whose KV is or will be here
        self.promised: dict[str, int] = {}  # decode: blocks for migrations not pulled yet
        self.queued_tokens = 0
        self.promised_blocks = 0

    @property
    def role(self) -> str:
        return self.config.role

    @property
    def free_blocks(self) -> int:
        free = self.stats.kv_blocks_free if self.stats else self.ready.num_blocks
        return free - self.promised_blocks

    def assign(self, request_id: str, prompt_tokens: int = 0, blocks: int = 0) -> None:
        self.assigned.add(request_id)
        if prompt_tokens:
            self.queued[request_id] = prompt_tokens
            self.queued_tokens += prompt_tokens
        if blocks:
            self.promised[request_id] = blocks
            self.promised_blocks += blocks

    def prefilled(self, request_id: str) -> None:
        self.queued_tokens -= self.queued.pop(request_id, 0)

    def pulled(self, request_id: str) -> None:
        self.promised_blocks -= self.promised.pop(request_id, 0)

    def unassign(self, request_id: str) -> None:
        self.prefilled(request_id)
        self.pulled(request_id)
        self.assigned.discard(request_id)


def make_backend(deployment: DeploymentConfig) -> Backend:
    if deployment.backend == "ray":
        from distserve.engine.backends.ray import RayBackend

        return RayBackend(deployment.ray_address, deployment.pair_placement)
    from distserve.engine.backends.local import LocalBackend

    return LocalBackend()


class Controller:
    def __init__(self, deployment: DeploymentConfig, start_timeout: float = 900.0) -> None:
        deployment.validate()
        self.deployment = deployment
        self.model_config = load_model_config(
            deployment.model, deployment.dtype, deployment.device, deployment.max_model_len
        )
        self.tokenizer = load_tokenizer(self.model_config, deployment.tokenizer)
        self.eos_token_ids = eos_token_ids(self.model_config, self.tokenizer)
        self.instance_configs = resolve_instances(deployment, self.model_config)
        self.backend = make_backend(deployment)
        self._kv_store = self._kv_transfer_group()
        try:
            ready = self.backend.start(self.model_config, self.instance_configs, start_timeout)
        except BaseException:  # a failed start, or Ctrl-C / SIGTERM while models load
            self.backend.shutdown()
            raise
        self.instances = {c.name: InstanceView(c, ready[c.name]) for c in self.instance_configs}
        sources = [h for view in self.instances.values() if view.role == "prefill" for h in view.ready.kv_handles]
        for view in self.instances.values():
            if view.role == "decode":
                self.backend.send(view.config.name, ConnectSources(sources))
        self.requests: dict[str, RequestState] = {}
        self.dead: dict[str, str] = {}
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._last_death_check = 0.0
        self._pending_stats: dict[str, InstanceStats] = {}
        self._updated: dict[str, RequestState] = {}  # news not handed out by poll() yet
        self._closed = False
        # AsyncLLM polls from its own thread; get_stats then waits for it instead of polling
        self.external_poller = False

    @property
    def disaggregated(self) -> bool:
        return self.deployment.mode == "disaggregated"

    def _kv_transfer_group(self) -> object | None:
        """Host the store of the KV transfer group (torch.distributed pulls) when KV may move
        between machines (Ray) or the deployment asks for it, and give every worker its rank."""
        d = self.deployment
        if not self.disaggregated or not (d.kv_transport == "torch" or (d.backend == "ray" and d.kv_transport == "auto")):
            return None
        import torch.distributed

        from distserve.kv.torch_transport import KVGroupSpec, data_backend, host_store

        host = self.backend.advertise_host()
        store = host_store(host)
        world = sum(c.num_workers for c in self.instance_configs)
        carrier = data_backend(self.instance_configs, d.backend, torch.distributed.is_nccl_available())
        first = 0
        for i, config in enumerate(self.instance_configs):
            spec = KVGroupSpec(host, store.port, world, first, carrier)
            self.instance_configs[i] = dataclasses.replace(config, kv_group=spec)
            first += config.num_workers
        return store

    @property
    def max_model_len(self) -> int:
        return self.model_config.max_model_len

    # -- requests in ------------------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                    raise ValueError("prompt_token_ids must be a list of integers.")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'.")
        if isinstance(prompt, list):
            if not all(isinstance(t, int) for t in prompt):
                raise ValueError("a token-id prompt must be a list of integers.")
            return None, list(prompt)
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string or token ids, got {type(prompt).__name__}.")
        return prompt, self.tokenizer(prompt)["input_ids"]

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, template_kwargs: dict | None = None
    ) -> dict:
        """A conversation rendered with the model's chat template, as a prompt dict."""
        if not self.tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead.")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts.")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(template_kwargs or {})
            )
        except Exception as exc:  # jinja2 errors from the template itself
            raise ValueError(f"the chat template could not render these messages: {exc}") from None
        return {"prompt": text, "prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]}

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty; give at least one token.")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens, but this model's context is {self.max_model_len} tokens "
                "(prompt and at least one generated token must fit); shorten the prompt."
            )
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1}).")
        for view in self.instances.values():
            capacity = admission_capacity(view.ready.num_blocks) * view.ready.block_size
            if n + 1 > capacity:
                raise ValueError(
                    f"the prompt has {n} tokens but instance {view.config.name} holds only {capacity} "
                    "tokens of KV cache; raise its kv_cache_gb (or num_kv_blocks)."
                )

    def add_request(
        self,
        prompt: PromptType,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> RequestState:
        params = params or SamplingParams()
        params.validate()
        text, ids = self.tokenize(prompt)
        self.validate_prompt(ids)
        with self._lock:
            self._check_alive()
            request_id = request_id or f"req-{next(self._ids)}"
            if request_id in self.requests:
                raise ValueError(f"request id {request_id!r} is already in use.")
            now = time.time()
            metrics = RequestMetrics(arrival_time=arrival_time or now, num_prompt_tokens=len(ids))
            state = RequestState(
                request_id=request_id,
                prompt=text,
                prompt_token_ids=ids,
                params=params,
                metrics=metrics,
                detokenizer=IncrementalDetokenizer(self.tokenizer, ids, params),
            )
            target = self._pick_first_instance()
            state.prefill_instance = target.config.name
            state.holders.add(target.config.name)
            metrics.prefill_instance = target.config.name
            metrics.prefill_queued_time = now
            target.assign(request_id, prompt_tokens=len(ids))
            self.requests[request_id] = state
            self.backend.send(
                target.config.name,
                AddRequest(request_id, ids, params, metrics.arrival_time, self.eos_token_ids),
            )
            return state

    def abort(self, request_id: str) -> None:
        with self._lock:
            state = self.requests.get(request_id)
            if state is None or state.finished:
                return
            state.finish("abort", None, time.time())
            self._release(state)
            self._updated[state.request_id] = state

    # -- routing ----------------------------------------------------------------------------
    def _alive(self, role: str) -> list[InstanceView]:
        return [v for v in self.instances.values() if v.role == role and v.alive]

    def _pick_first_instance(self) -> InstanceView:
        role = "prefill" if self.disaggregated else "colocated"
        candidates = self._alive(role)
        if role == "prefill":
            return min(candidates, key=lambda v: (v.queued_tokens, len(v.assigned)))
        return min(candidates, key=lambda v: (len(v.assigned), v.queued_tokens))

    def _pick_decode_instance(self) -> InstanceView:
        return max(self._alive("decode"), key=lambda v: (v.free_blocks, -len(v.assigned)))

    def _check_alive(self) -> None:
        roles = ("prefill", "decode") if self.disaggregated else ("colocated",)
        for role in roles:
            if not self._alive(role):
                raise EngineDeadError(f"no {role} instance is alive ({self._death_summary()}); restart the engine.")

    def _death_summary(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in self.dead.items()) or "none died"

    # -- events -----------------------------------------------------------------------------
    def poll(self, timeout: float = 0.05) -> list[RequestState]:
        """Handle what the instances sent; returns the requests with news (each once)."""
        self._receive(timeout)
        with self._lock:
            updated, self._updated = self._updated, {}
            for rid, state in updated.items():
                if state.finished:
                    self.requests.pop(rid, None)
            return list(updated.values())

    def _receive(self, timeout: float) -> None:
        events = self.backend.recv(timeout)
        with self._lock:
            for event in events:
                self._handle(event, self._updated)
            now = time.monotonic()
            if now - self._last_death_check > DEATH_CHECK_INTERVAL:
                self._last_death_check = now
                self._check_deaths(self._updated)

    def _handle(self, event: object, updated: dict[str, RequestState]) -> None:
        if isinstance(event, StepOutput):
            self._on_step(event, updated)
        elif isinstance(event, PrefillDone):
            self._on_prefill_done(event, updated)
        elif isinstance(event, MigrationDone):
            self._on_migration_done(event, updated)
        elif isinstance(event, InstanceStats):
            self.instances[event.name].stats = event
            self._pending_stats[event.name] = event
        elif isinstance(event, InstanceFailed):
            self._on_instance_death(event.name, f"failed: {event.error.strip().splitlines()[-1]}", updated)

    def _on_step(self, out: StepOutput, updated: dict[str, RequestState]) -> None:
        view = self.instances[out.instance]
        if out.stats is not None:
            view.stats = out.stats
        for rid in out.started:
            state = self.requests.get(rid)
            if state is None:
                continue
            if view.role == "decode":
                state.metrics.decode_start_time = state.metrics.decode_start_time or out.step_start
            else:
                state.metrics.prefill_start_time = state.metrics.prefill_start_time or out.step_start
        for rid in out.preempted:
            state = self.requests.get(rid)
            if state is not None:
                state.metrics.num_preemptions += 1
        for token in out.tokens:
            state = self.requests.get(token.request_id)
            if state is None or state.finished:
                continue
            if not state.token_ids and view.role != "decode":
                state.metrics.prefill_end_time = out.step_end
                view.prefilled(state.request_id)
            state.add_token(token, self.tokenizer, out.step_end)
            updated[state.request_id] = state
            if state.finished:
                if token.finish_reason is not None:
                    state.holders.discard(out.instance)  # the instance freed the blocks itself
                self._release(state)

    def _on_prefill_done(self, done: PrefillDone, updated: dict[str, RequestState]) -> None:
        state = self.requests.get(done.request_id)
        if state is None or state.finished:
            self.backend.send(done.instance, ReleaseKV(done.request_id))
            return
        decode = self._pick_decode_instance()
        decode.assign(state.request_id, blocks=-(-(done.num_tokens + 1) // decode.ready.block_size))
        state.decode_instance = decode.config.name
        state.metrics.decode_instance = decode.config.name
        state.holders.add(decode.config.name)
        source = self.instances[done.instance]
        self.backend.send(
            decode.config.name,
            MigrateRequest(
                request=AddRequest(
                    state.request_id, state.prompt_token_ids, state.params, state.metrics.arrival_time, self.eos_token_ids
                ),
                output_token_ids=list(state.token_ids),
                source=done.instance,
                source_handles=source.ready.kv_handles,
                source_blocks=done.blocks,
                num_prefill_preemptions=done.num_preemptions,
            ),
        )

    def _on_migration_done(self, done: MigrationDone, updated: dict[str, RequestState]) -> None:
        self.backend.send(done.source, ReleaseKV(done.request_id))
        self.instances[done.instance].pulled(done.request_id)
        self.instances[done.source].unassign(done.request_id)
        state = self.requests.get(done.request_id)
        if state is None:
            return
        state.holders.discard(done.source)
        m = state.metrics
        m.migration_start_time, m.migration_end_time = done.start, done.end
        m.transfer_tokens += done.num_tokens
        m.transfer_bytes += done.num_bytes
        m.transfer_seconds += done.end - done.start
        m.transfer_transport = "+".join(done.transports) or None

    def _release(self, state: RequestState) -> None:
        """A finished request: tell every instance still holding it, and settle the books."""
        for name in state.holders:
            if self.instances[name].alive:
                self.backend.send(name, AbortRequest(state.request_id))
        state.holders.clear()
        for name in (state.prefill_instance, state.decode_instance):
            if name is not None:
                self.instances[name].unassign(state.request_id)

    # -- failures -----------------------------------------------------------------------------
    def _check_deaths(self, updated: dict[str, RequestState]) -> None:
        for died in self.backend.dead():
            if died.name not in self.dead:
                self._on_instance_death(died.name, f"process {died.pid} exited with code {died.exitcode}", updated)

    def _on_instance_death(self, name: str, why: str, updated: dict[str, RequestState]) -> None:
        if name in self.dead:
            return
        self.dead[name] = why
        self.instances[name].alive = False
        message = f"instance {name} died ({why})"
        now = time.time()
        for state in list(self.requests.values()):
            if name in state.holders and not state.finished:
                state.holders.discard(name)
                state.finish("abort", None, now, error=message)
                self._release(state)
                updated[state.request_id] = state

    # -- stats and shutdown ----------------------------------------------------------------
    def get_stats(self, timeout: float = 10.0) -> list[InstanceStats]:
        """Fresh stats from every live instance (the last known ones for a dead one)."""
        with self._lock:
            self._pending_stats.clear()
            alive = [v.config.name for v in self.instances.values() if v.alive]
            for name in alive:
                self.backend.send(name, StatsRequest())
        deadline = time.monotonic() + timeout
        while not all(name in self._pending_stats for name in alive) and time.monotonic() < deadline:
            if self.external_poller:
                time.sleep(0.01)
            else:
                self._receive(0.02)  # request news stays buffered for the next poll()
        return [v.stats for v in self.instances.values() if v.stats is not None]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.backend.shutdown()
        self._kv_store = None
