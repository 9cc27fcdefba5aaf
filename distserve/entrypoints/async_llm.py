"""The asynchronous API: `AsyncLLM.generate` streams a request's outputs as tokens arrive.

A background thread steps the engine and hands each request's outputs to the asyncio loop
that asked for it. Leaving the stream early (the consumer stops iterating, or its task is
cancelled, say by a disconnected HTTP client) aborts the request on every instance.
Tokenizing and chat rendering run off the event loop (`process`, `render_chat`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

from distserve.config import DEFAULT_MODE, DeploymentConfig, Mode, ModelConfig
from distserve.engine.errors import EngineDeadError
from distserve.engine.input_processor import ProcessedPrompt, PromptType
from distserve.engine.llm_engine import LLMEngine
from distserve.engine.messages import InstanceStats, InstanceStatus
from distserve.outputs import RequestOutput
from distserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# after a failed poll, wait this long (doubling up to the cap) before the next one
POLL_BACKOFF = (0.05, 2.0)


class AsyncLLM:
    def __init__(
        self,
        model: str | None = None,
        mode: Mode | str = DEFAULT_MODE,
        *,
        config: DeploymentConfig | str | None = None,
        **kwargs: Any,
    ) -> None:
        self.engine = LLMEngine.from_args(model, mode, config, kwargs)
        self.engine.set_external_poller(True)
        self.deployment = self.engine.deployment
        self.tokenizer = self.engine.tokenizer
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._streams_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="distserve-poll", daemon=True)
        self._thread.start()

    @property
    def model_config(self) -> ModelConfig:
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def _poll_loop(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                outputs = self.engine.step(0.05)
                backoff = 0.0
            except Exception:  # keep serving the other requests; the log says what broke
                logger.exception("polling the instances failed")
                backoff = min(POLL_BACKOFF[1], max(POLL_BACKOFF[0], 2 * backoff))
                self._stop.wait(backoff)
                continue
            for output in outputs:
                with self._streams_lock:
                    stream = self._streams.get(output.request_id)
                if stream is not None:
                    loop, queue = stream
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, output)
                    except RuntimeError:  # the caller's loop is closed; nobody is listening
                        self.engine.abort(output.request_id)

    # -- requests in ------------------------------------------------------------------------
    async def process(self, prompt: PromptType | ProcessedPrompt, params: SamplingParams | None = None) -> ProcessedPrompt:
        """Tokenize and validate the prompt (and the parameters, if given), off the event
        loop; ValueError says what to change."""
        return await asyncio.to_thread(self.engine.process, prompt, params)

    async def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, template_kwargs: dict[str, Any] | None = None
    ) -> ProcessedPrompt:
        """A conversation rendered with the chat template, tokenized and validated, off the
        event loop."""
        return await asyncio.to_thread(self.engine.render_chat, messages, add_generation_prompt, template_kwargs)

    async def generate(
        self,
        prompt: PromptType | ProcessedPrompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that produced a token, the last
        with `finished=True`."""
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        params = sampling_params or SamplingParams()
        if not isinstance(prompt, ProcessedPrompt):
            prompt = await self.process(prompt, params)
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use.")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            self.engine.add_request(prompt, params, request_id)
            while not finished:
                output = await queue.get()
                while not queue.empty() and not output.finished:
                    output = _merge(output, queue.get_nowait())
                finished = output.finished
                if output.error:
                    raise EngineDeadError(output.error)
                yield output
        finally:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.engine.abort(request_id)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    # -- state ------------------------------------------------------------------------------
    async def get_stats(self) -> list[InstanceStats]:
        return await asyncio.to_thread(self.engine.get_stats)

    def instance_status(self) -> list[InstanceStatus]:
        """Every instance, alive or not, with its latest stats (no round trip)."""
        return self.engine.instance_status()

    def is_healthy(self) -> bool:
        return self.engine.is_healthy()

    def shutdown(self) -> None:
        """Stop polling and stop every instance (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.engine.shutdown()


def _merge(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """Two outputs of a request the consumer had not taken yet, as one."""
    newer.delta_text = older.delta_text + newer.delta_text
    newer.delta_token_ids = older.delta_token_ids + newer.delta_token_ids
    return newer
