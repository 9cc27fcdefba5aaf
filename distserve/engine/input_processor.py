"""Requests in: prompts tokenized, conversations rendered with the chat template, and every
request validated once, before it reaches the engine.

A prompt is a string, a list of token ids, or a dict with `prompt_token_ids` (and optionally
the `prompt` text they came from) or `prompt`. What comes out, `ProcessedPrompt`, is what the
engine takes: its ids are known to fit the model's vocabulary, its context and every
instance's KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from distserve.config import ModelConfig
from distserve.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


@dataclass
class ProcessedPrompt:
    """A prompt the engine can take: its text (if it had one) and its token ids."""

    prompt: str | None
    prompt_token_ids: list[int]


def check_text(what: str, text: str) -> None:
    """Text that can be encoded (JSON lets a client send half of a surrogate pair)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode: {exc.reason} at position {exc.start}.") from None


class InputProcessor:
    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: PreTrainedTokenizerBase,
        kv_capacity_tokens: dict[str, int],
        trust_request_chat_template: bool = False,
    ) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.max_model_len = model_config.max_model_len
        self.kv_capacity_tokens = kv_capacity_tokens  # instance -> tokens one request may hold
        self.trust_request_chat_template = trust_request_chat_template

    def process(self, prompt: PromptType | ProcessedPrompt, params: SamplingParams | None = None) -> ProcessedPrompt:
        """Tokenize (unless it is already) and validate the prompt, and the parameters if
        given; ValueError says what to change."""
        if params is not None:
            params.validate()
        processed = prompt if isinstance(prompt, ProcessedPrompt) else self.tokenize(prompt)
        self.validate(processed.prompt_token_ids)
        return processed

    def tokenize(self, prompt: PromptType) -> ProcessedPrompt:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                    raise ValueError("prompt_token_ids must be a list of integers.")
                return ProcessedPrompt(prompt.get("prompt"), list(ids))
            if "prompt" not in prompt:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'.")
            prompt = prompt["prompt"]
        if isinstance(prompt, list):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise ValueError("a token-id prompt must be a list of integers.")
            return ProcessedPrompt(None, list(prompt))
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string or token ids, got {type(prompt).__name__}.")
        check_text("the prompt", prompt)
        return ProcessedPrompt(prompt, self.tokenizer(prompt)["input_ids"])

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, template_kwargs: dict[str, Any] | None = None
    ) -> ProcessedPrompt:
        """A conversation rendered with the model's chat template."""
        kwargs = dict(template_kwargs or {})
        if "chat_template" in kwargs and not self.trust_request_chat_template:
            raise ValueError(
                "a chat template given with the request is refused (it runs on the server); use the model's "
                "template, or start the server with --trust-request-chat-template."
            )
        if not (kwargs.get("chat_template") or self.tokenizer.chat_template):
            raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead.")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts.")
        for i, m in enumerate(messages):
            if isinstance(m["content"], str):
                check_text(f"message {i}", m["content"])
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except Exception as exc:  # jinja2 errors from the template itself
            raise ValueError(f"the chat template could not render these messages: {exc}") from None
        return ProcessedPrompt(text, self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def validate(self, prompt_token_ids: list[int]) -> None:
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
        for name, capacity in self.kv_capacity_tokens.items():
            if n + 1 > capacity:
                raise ValueError(
                    f"the prompt has {n} tokens but instance {name} holds only {capacity} "
                    "tokens of KV cache; raise its kv_cache_gb (or num_kv_blocks)."
                )
