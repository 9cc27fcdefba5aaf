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
from distserve.engine.errors import EngineDeadError, RequestTimeoutError
from distserve.engine.input_processor import ProcessedPrompt, PromptType
from distserve.engine.llm_engine import LLMEngine
from distserve.engine.messages import InstanceStats, InstanceStatus
from distserve.engine.supervisor import Health
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
        max_queue_len: int | None = None,
        trust_request_chat_template: bool = False,
        **kwargs: Any,
    ) -> None:
        """`max_queue_len`: prompts that may wait per instance before new requests are refused
        (EngineOverloadedError); `trust_request_chat_template`: render chat templates a request
        brings (they run on this machine)."""
        self.engine = LLMEngine.from_args(model, mode, config, kwargs, max_queue_len=max_queue_len,
                                          trust_request_chat_template=trust_request_chat_template)
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

    async def submit(
        self, requests: list[tuple[PromptType | ProcessedPrompt, SamplingParams, str | None]], timeout: float | None = None
    ) -> list[RequestStream]:
        """Admit requests (prompt, params, id or None) together, or none of them (ValueError,
        EngineDeadError, EngineOverloadedError); a stream of outputs for each, which aborts
        its request if closed (or dropped) before the end. `timeout`: seconds each may run."""
        prepared = []
        for prompt, params, request_id in requests:
            if not isinstance(prompt, ProcessedPrompt):
                prompt = await self.process(prompt, params)
            prepared.append((prompt, params, request_id or f"req-{uuid.uuid4().hex}"))
        loop = asyncio.get_running_loop()
        streams = []
        with self._streams_lock:
            if any(rid in self._streams for _, _, rid in prepared):
                raise ValueError("a request id is already in use.")
            for _, _, rid in prepared:
                queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
                self._streams[rid] = (loop, queue)
                streams.append(RequestStream(self, rid, queue, None if timeout is None else loop.time() + timeout))
        try:
            self.engine.add_requests(prepared)
        except BaseException:
            for stream in streams:
                stream.forget()
            raise
        return streams

    async def generate(
        self,
        prompt: PromptType | ProcessedPrompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that produced a token, the last
        with `finished=True`."""
        (stream,) = await self.submit([(prompt, sampling_params or SamplingParams(), request_id)])
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def fail_all(self, message: str) -> None:
        """End every unfinished request with an error (each stream raises EngineDeadError)."""
        self.engine.fail_all(message)

    def num_unfinished_requests(self) -> int:
        with self._streams_lock:
            return len(self._streams)

    # -- state ------------------------------------------------------------------------------
    async def get_stats(self) -> list[InstanceStats]:
        return await asyncio.to_thread(self.engine.get_stats)

    async def reset_prefix_cache(self) -> bool:
        return await asyncio.to_thread(self.engine.reset_prefix_cache)

    def instance_status(self) -> list[InstanceStatus]:
        """Every instance, alive or not, with its latest stats (no round trip)."""
        return self.engine.instance_status()

    def is_healthy(self) -> bool:
        """Whether requests are served now: every role has an instance running."""
        return self.engine.is_healthy()

    def health(self) -> Health:
        return self.engine.health()

    def shutdown(self) -> None:
        """Stop polling and stop every instance (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.engine.shutdown()


class RequestStream:
    """The outputs of one admitted request, as the engine makes them; closing it (or dropping
    it) before the last output aborts the request on every instance."""

    def __init__(self, llm: AsyncLLM, request_id: str, queue: asyncio.Queue[RequestOutput], deadline: float | None) -> None:
        self.llm = llm
        self.request_id = request_id
        self._queue = queue
        self._deadline = deadline  # on the event loop's clock
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._deadline is None:
                output = await self._queue.get()
            else:
                output = await asyncio.wait_for(self._queue.get(), max(0.0, self._deadline - asyncio.get_running_loop().time()))
        except TimeoutError:
            await self.aclose()
            raise RequestTimeoutError(f"request {self.request_id} ran past its timeout and was aborted.") from None
        while not self._queue.empty() and not output.finished:
            output = _merge(output, self._queue.get_nowait())
        if output.finished:
            self.forget()
        if output.error:
            raise EngineDeadError(output.error)
        return output

    async def aclose(self) -> None:
        if not self._done:
            self.forget()
            self.llm.engine.abort(self.request_id)

    def forget(self) -> None:
        """Stop listening (the request finished, or was never added)."""
        self._done = True
        with self.llm._streams_lock:
            self.llm._streams.pop(self.request_id, None)

    def __del__(self) -> None:
        if not self._done:  # dropped unread (a client gone before its stream began): abort it
            self.forget()
            self.llm.engine.abort(self.request_id)


def _merge(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """Two outputs of a request the consumer had not taken yet, as one."""
    newer.delta_text = older.delta_text + newer.delta_text
    newer.delta_token_ids = older.delta_token_ids + newer.delta_token_ids
    return newer
