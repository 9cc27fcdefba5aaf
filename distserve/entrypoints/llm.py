"""The offline API, vLLM-style: `LLM(model, mode=...)`, `generate`, `chat`, `get_stats`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from distserve.config import DEFAULT_MODE, DeploymentConfig, Mode
from distserve.engine.errors import EngineDeadError
from distserve.engine.input_processor import PromptType
from distserve.engine.llm_engine import LLMEngine
from distserve.engine.messages import InstanceStats
from distserve.outputs import RequestOutput, merge_samples
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
        mode: Mode | str = DEFAULT_MODE,
        *,
        config: DeploymentConfig | str | None = None,
        **kwargs: Any,
    ) -> None:
        self.engine = LLMEngine.from_args(model, mode, config, kwargs)
        self.deployment = self.engine.deployment
        self.tokenizer = self.engine.tokenizer

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
        prompts = [self.engine.render_chat(c, add_generation_prompt, chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[PromptType], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        # each sample of a prompt (n, best_of) is a request of its own; they are added together
        for p in params:
            p.validate()
        processed = [self.engine.process(prompt) for prompt in prompts]
        ids = self.engine.add_requests([(prompt, sample, None) for prompt, p in zip(processed, params) for sample in p.samples()])
        outputs: dict[str, RequestOutput] = {}
        errors: list[str] = []
        mine = set(ids)
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while len(outputs) < len(ids):
                for out in self.engine.step(0.05):
                    if out.finished and out.request_id in mine:
                        outputs[out.request_id] = out
                        if out.error:
                            errors.append(out.error)
                        bar.update(1)
        except BaseException:
            for rid in ids:
                if rid not in outputs:
                    self.engine.abort(rid)
            raise
        finally:
            bar.close()
        if errors:
            raise EngineDeadError(f"{len(errors)} of {len(ids)} requests failed: {errors[0]}")
        merged, start = [], 0
        for p in params:
            samples = [outputs[rid] for rid in ids[start : start + p.num_samples]]
            start += p.num_samples
            merged.append(samples[0] if p.num_samples == 1 else merge_samples(samples[0].request_id, samples, p))
        return merged

    def get_stats(self) -> list[InstanceStats]:
        """Per instance: role, queue lengths, running requests, KV blocks, transfers."""
        return self.engine.get_stats()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt block (vLLM's `LLM.reset_prefix_cache`); False if
        running requests held some."""
        return self.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
