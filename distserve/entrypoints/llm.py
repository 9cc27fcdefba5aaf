"""The offline API, vLLM-style: `LLM(model, mode=...)`, `generate`, `chat`, `get_stats`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from distserve.config import DeploymentConfig, build_deployment
from distserve.engine.controller import Controller, PromptType
from distserve.engine.messages import InstanceStats
from distserve.engine.request_state import EngineDeadError
from distserve.outputs import RequestOutput
from distserve.sampling_params import SamplingParams

ChatMessages = list[dict[str, Any]]


class LLM:
    """A model served by distserve, for batch use in a Python process.

    `mode` is `colocated` (continuous batching), `chunked` (chunked prefill) or
    `disaggregated` (prefill and decode instances in their own processes). Keyword
    arguments are those of `build_deployment`; `config` takes a whole `DeploymentConfig`
    or the path of a placement file instead.
    """

    def __init__(
        self,
        model: str | None = None,
        mode: str = "colocated",
        *,
        config: DeploymentConfig | str | None = None,
        **kwargs: Any,
    ) -> None:
        if config is not None:
            deployment = config if isinstance(config, DeploymentConfig) else DeploymentConfig.load(config)
            if model is not None:
                deployment.model = model
        else:
            deployment = build_deployment(model, mode, **kwargs)
        self.deployment = deployment
        self.controller = Controller(deployment)
        self.tokenizer = self.controller.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string, or `{"prompt_token_ids": [...]}`); outputs
        come back in the order of the prompts."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params; give one or one each.")
        return self._run(prompts, params, use_tqdm)

    def chat(
        self,
        messages: ChatMessages | Sequence[ChatMessages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to conversations, rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            self.controller.render_chat(c, add_generation_prompt, chat_template_kwargs or {}) for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[PromptType], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.controller.add_request(prompt, p).request_id)
        except BaseException:
            for rid in ids:
                self.controller.abort(rid)
            raise
        outputs: dict[str, RequestOutput] = {}
        errors: list[str] = []
        mine = set(ids)
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while len(outputs) < len(ids):
                for state in self.controller.poll(0.05):
                    if state.finished and state.request_id in mine and state.request_id not in outputs:
                        outputs[state.request_id] = state.output()
                        if state.error:
                            errors.append(state.error)
                        bar.update(1)
        except BaseException:
            for rid in ids:
                if rid not in outputs:
                    self.controller.abort(rid)
            raise
        finally:
            bar.close()
        if errors:
            raise EngineDeadError(f"{len(errors)} of {len(ids)} requests failed: {errors[0]}")
        return [outputs[rid] for rid in ids]

    def get_stats(self) -> list[InstanceStats]:
        """Per instance: role, queue lengths, running requests, KV blocks, transfers."""
        return self.controller.get_stats()

    def shutdown(self) -> None:
        self.controller.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        controller = getattr(self, "controller", None)
        if controller is not None:
            controller.shutdown()
