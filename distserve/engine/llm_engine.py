"""The engine as its users see it: requests in, outputs out. `LLM`, `AsyncLLM` and through
them the HTTP server and the CLI all drive this one class.

    add_request   InputProcessor (tokenize, chat template, validate: once)
                  -> Controller (route, send to the instances)
    step          Controller.poll (the instances' events, as RequestUpdates)
                  -> OutputProcessor (detokenize, stop strings) -> RequestOutputs
                  -> requests a stop string finished are released on their instances

Thread-safe: one thread may call `step` while others add and abort.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from distserve.config import DeploymentConfig, Mode, ModelConfig, deployment_from
from distserve.engine.controller import Controller
from distserve.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from distserve.engine.messages import AddRequest, InstanceStats, InstanceStatus
from distserve.engine.output_processor import OutputProcessor
from distserve.engine.supervisor import Health
from distserve.outputs import RequestMetrics, RequestOutput
from distserve.sampling_params import SamplingParams
from distserve.tokenizer import eos_token_ids, load_tokenizer
from distserve.weights.source import load_model_config


class LLMEngine:
    def __init__(
        self,
        deployment: DeploymentConfig,
        start_timeout: float = 900.0,
        max_queue_len: int | None = None,
        trust_request_chat_template: bool = False,
    ) -> None:
        deployment.validate()
        self.deployment = deployment
        self.model_config: ModelConfig = load_model_config(
            deployment.model, deployment.dtype, deployment.device, deployment.max_model_len
        )
        self.tokenizer = load_tokenizer(self.model_config, deployment.tokenizer)
        self.eos_token_ids = eos_token_ids(self.model_config, self.tokenizer)
        self._controller = Controller.start(deployment, self.model_config, start_timeout, max_queue_len)
        self.input_processor = InputProcessor(
            self.model_config, self.tokenizer, self._controller.kv_capacity_tokens(), trust_request_chat_template
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._aborted: list[RequestOutput] = []  # final outputs of aborted requests, for the next step

    @classmethod
    def from_args(
        cls, model: str | None, mode: Mode | str, config: DeploymentConfig | str | None, kwargs: dict[str, Any], **engine: Any
    ) -> LLMEngine:
        """The engine `LLM(...)` and `AsyncLLM(...)` describe (see `config.deployment_from`);
        `engine` holds this class's own settings."""
        return cls(deployment_from(model, mode, config, kwargs), **engine)

    @property
    def max_model_len(self) -> int:
        return self.model_config.max_model_len

    def set_external_poller(self, external: bool) -> None:
        """Another thread calls `step` for good: `get_stats` waits for it instead of polling."""
        self._controller.external_poller = external

    # -- requests in ----------------------------------------------------------------------
    def process(self, prompt: PromptType | ProcessedPrompt, params: SamplingParams | None = None) -> ProcessedPrompt:
        """Tokenize and validate a prompt (and the parameters, if given); ValueError says
        what to change. Adding what this returns validates the prompt no more."""
        return self.input_processor.process(prompt, params)

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, template_kwargs: dict[str, Any] | None = None
    ) -> ProcessedPrompt:
        """A conversation rendered with the chat template, tokenized and validated."""
        return self.input_processor.process(self.input_processor.render_chat(messages, add_generation_prompt, template_kwargs))

    def add_requests(
        self, requests: list[tuple[PromptType | ProcessedPrompt, SamplingParams, str | None]], arrival_time: float | None = None
    ) -> list[str]:
        """Add requests (prompt, params, request id or None) in one go; their ids. Nothing is
        added if one is invalid."""
        prepared = []
        for prompt, params, request_id in requests:
            params.validate()
            processed = prompt if isinstance(prompt, ProcessedPrompt) else self.process(prompt, params)
            prepared.append((processed, params, request_id))
        now = time.time()
        adds = []
        with self._lock:
            taken = {rid for _, _, rid in prepared if rid is not None}
            if len(taken) < sum(rid is not None for _, _, rid in prepared):
                raise ValueError("request ids must be unique.")
            for processed, params, request_id in prepared:
                request_id = request_id or f"req-{next(self._ids)}"
                if request_id in self.output_processor.states:
                    raise ValueError(f"request id {request_id!r} is already in use.")
                ids = processed.prompt_token_ids
                metrics = RequestMetrics(arrival_time=arrival_time or now, num_prompt_tokens=len(ids))
                add = AddRequest(request_id, ids, params, metrics.arrival_time, self.eos_token_ids)
                adds.append((add, metrics, processed))
            self._controller.add_requests([(add, metrics) for add, metrics, _ in adds])
            for add, metrics, processed in adds:
                self.output_processor.add(add.request_id, processed.prompt, add.prompt_token_ids, add.sampling_params, metrics)
        return [add.request_id for add, _, _ in adds]

    def add_request(
        self, prompt: PromptType | ProcessedPrompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        return self.add_requests([(prompt, params or SamplingParams(), request_id)])[0]

    def fail_all(self, message: str) -> None:
        """End every unfinished request with an error (its last output comes from the next
        `step`), and free them on their instances: a server shutting down does this last."""
        with self._lock:
            now = time.time()
            for request_id in list(self.output_processor.states):
                output = self.output_processor.fail(request_id, message, now)
                if output is not None:
                    self._aborted.append(output)
                self._controller.release(request_id)

    def abort(self, request_id: str) -> None:
        """Finish the request (its last output, `finish_reason="abort"`, comes from the next
        `step`) and free it on its instances."""
        with self._lock:
            output = self.output_processor.abort(request_id, time.time())
            if output is not None:
                self._aborted.append(output)
            self._controller.release(request_id)

    # -- outputs ---------------------------------------------------------------------------
    def step(self, timeout: float = 0.05) -> list[RequestOutput]:
        """The outputs of the requests with news, waiting up to `timeout` for some."""
        updates = self._controller.poll(timeout)
        with self._lock:
            aborted, self._aborted = self._aborted, []
            if not updates:
                return aborted
            outputs, stopped = self.output_processor.process(updates)
            for request_id in stopped:
                self._controller.release(request_id)
        return aborted + outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.states)

    # -- state -----------------------------------------------------------------------------
    def get_stats(self) -> list[InstanceStats]:
        """Per instance: role, queues, running requests, KV blocks, transfers (fresh)."""
        return self._controller.get_stats()

    def reset_prefix_cache(self) -> bool:
        """Every instance forgets its cached prompt blocks; False if requests held some."""
        return self._controller.reset_prefix_cache()

    def instance_status(self) -> list[InstanceStatus]:
        """Every instance, alive or not, with its latest stats (no round trip)."""
        return self._controller.instance_status()

    def pids(self) -> dict[str, int]:
        """Process id of each instance's driver."""
        return {s.name: s.pid for s in self.instance_status()}

    def health(self) -> Health:
        """healthy (every instance runs), degraded (some restart or are down, every role still
        served) or unhealthy (some role has no instance left)."""
        return self._controller.health()

    def is_healthy(self) -> bool:
        """Whether requests are served now: every role has an instance running."""
        return self._controller.serving_now()

    def shutdown(self) -> None:
        self._controller.shutdown()
