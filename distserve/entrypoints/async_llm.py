"""The asynchronous API: `AsyncLLM.generate` streams a request's outputs as tokens arrive.

A background thread polls the controller and hands each request's outputs to the asyncio
loop that asked for it. Leaving the stream early (the consumer stops iterating, or its task
is cancelled, say by a disconnected HTTP client) aborts the request on every instance.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

from distserve.config import DeploymentConfig, build_deployment
from distserve.engine.controller import Controller, PromptType
from distserve.engine.messages import InstanceStats
from distserve.engine.request_state import EngineDeadError
from distserve.outputs import RequestOutput
from distserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncLLM:
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
        self.controller.external_poller = True
        self.tokenizer = self.controller.tokenizer
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._streams_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="distserve-poll", daemon=True)
        self._thread.start()

    @property
    def model_config(self):  # noqa: ANN201 - a ModelConfig
        return self.controller.model_config

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                states = self.controller.poll(0.05)
            except Exception:  # keep serving the other requests; the log says what broke
                logger.exception("polling the instances failed")
                continue
            for state in states:
                output = state.output()
                with self._streams_lock:
                    stream = self._streams.get(state.request_id)
                if stream is not None:
                    loop, queue = stream
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, output)
                    except RuntimeError:  # the caller's loop is closed; nobody is listening
                        self.controller.abort(state.request_id)

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that produced a token, the last
        with `finished=True`."""
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use.")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            self.controller.add_request(prompt, sampling_params, request_id=request_id)
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
                self.controller.abort(request_id)

    async def abort(self, request_id: str) -> None:
        self.controller.abort(request_id)

    async def get_stats(self) -> list[InstanceStats]:
        return await asyncio.to_thread(self.controller.get_stats)

    def shutdown(self) -> None:
        """Stop polling and stop every instance (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.controller.shutdown()


def _merge(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """Two outputs of a request the consumer had not taken yet, as one."""
    newer.delta_text = older.delta_text + newer.delta_text
    newer.delta_token_ids = older.delta_token_ids + newer.delta_token_ids
    return newer
