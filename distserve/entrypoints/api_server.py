"""The OpenAI-compatible HTTP server (FastAPI) in front of an `AsyncLLM`.

    POST /v1/completions, /v1/chat/completions   non-streaming or Server-Sent Events
    GET  /v1/models, /health, /metrics           model list, liveness, Prometheus
    POST /generate                               DistServe's endpoint for old clients

Errors use OpenAI's body (`{"error": {"message", "type", "param", "code"}}`): 400 for
invalid parameters or a prompt too long for the context, 401 without the API key, 404 for
an unknown model, 413 for a body past the limit, 503 (with Retry-After) when the queues are
full or the server drains, 504 past the request timeout. A client that goes away, streaming
or not, aborts its request on every instance. On SIGTERM or SIGINT the server drains: it
refuses new requests, lets running ones finish for up to the shutdown timeout, then ends
each remaining stream with an error event and `[DONE]`. The server talks to the engine only
through `AsyncLLM`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distserve.engine.errors import EngineDeadError, EngineOverloadedError, RequestTimeoutError
from distserve.engine.input_processor import ProcessedPrompt
from distserve.entrypoints.async_llm import AsyncLLM, RequestStream
from distserve.entrypoints.http_gate import RETRY_AFTER_SECONDS, HTTPGate
from distserve.entrypoints.openai_protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest
from distserve.entrypoints.openai_responses import (
    APIError,
    chat_logprobs,
    completion_logprobs,
    error_body,
    error_response,
    sse,
    timeline,
    usage,
)
from distserve.entrypoints.server_metrics import ServerMetrics
from distserve.outputs import RequestOutput, merge_samples
from distserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DISCONNECT_POLL = 0.5
SHUTDOWN_MESSAGE = "the server is shutting down; the request was cut short."


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_request_bytes: int = 8 << 20  # a request body past this gets a 413
    shutdown_timeout: float = 30.0  # seconds running requests may take to finish on SIGTERM / SIGINT
    request_timeout: float | None = None  # seconds a request may run before it is aborted (504)


class OpenAIServer:
    """The routes, sharing the engine, the served model names, the metrics and the settings."""

    def __init__(self, engine: AsyncLLM, served_model_names: list[str], settings: ServerSettings | None = None) -> None:
        self.engine = engine
        self.names = served_model_names
        self.settings = settings or ServerSettings()
        self.metrics = ServerMetrics(engine.instance_status)
        self.max_model_len = engine.max_model_len
        self.draining = False

    async def drain(self) -> None:
        """Refuse new requests; let the running ones finish for up to the shutdown timeout;
        then end the rest with an error (streams get an error event and [DONE])."""
        self.draining = True
        deadline = time.monotonic() + self.settings.shutdown_timeout
        logger.info("draining: %d requests running, up to %.0f s", self.engine.num_unfinished_requests(), self.settings.shutdown_timeout)
        while self.engine.num_unfinished_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine.num_unfinished_requests():
            logger.warning("drain timeout: ending %d requests", self.engine.num_unfinished_requests())
            self.engine.fail_all(SHUTDOWN_MESSAGE)
            end = time.monotonic() + 5.0  # their last events reach the clients
            while self.engine.num_unfinished_requests() and time.monotonic() < end:
                await asyncio.sleep(0.02)

    # -- routes -----------------------------------------------------------------------------
    async def health(self) -> Response:
        """200 while requests are served, else 503; the body says healthy, degraded (an instance
        restarts or is down) or unhealthy (a role has no instance left), and each instance's state."""
        status = {"status": str(self.engine.health()),
                  "instances": {s.name: {"state": s.state, "restarts": s.restarts} for s in self.engine.instance_status()}}
        return JSONResponse(status, status_code=200 if self.engine.is_healthy() else 503)

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def reset_prefix_cache(self) -> Response:
        """vLLM's POST /reset_prefix_cache: every instance forgets its cached prompt blocks (so
        that benchmark runs start cold); 409 while running requests hold some."""
        if not await self.engine.reset_prefix_cache():
            raise APIError(409, "the prefix cache was not reset: running requests hold cached blocks; retry when idle",
                           "conflict_error")
        return JSONResponse({"status": "reset"})

    async def models(self) -> dict[str, Any]:
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "distserve",
                 "root": self.engine.model_config.name, "max_model_len": self.max_model_len}
                for name in self.names
            ],
        }

    async def completions(self, body: CompletionRequest, raw: Request) -> Response:
        model = self.check_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported.", param="echo")
        prompts = [await self.prompt(p) for p in _completion_prompts(body.prompt)]
        params = [
            self.params(lambda p=p: body.sampling_params(self.max_tokens(body.max_tokens, len(p.prompt_token_ids)), body.logprobs))
            for p in prompts
        ]
        base_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        self.check_streamable(body.stream, params)
        streams = await self.admit(_samples(prompts, params, base_id))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._stream_completions(streams, params, base_id, created, model, include_usage), media_type="text/event-stream"
            )
        samples = await _until_disconnected(raw, asyncio.gather(*(self.collect(stream) for stream in streams)))
        outputs = _merged(samples, params)
        choices = []
        for i, (out, p) in enumerate(zip(outputs, params)):
            for c in out.outputs:
                choices.append({
                    "index": i * p.n + c.index,
                    "text": c.text,
                    "logprobs": completion_logprobs(c.logprobs or [], c.token_ids, body.logprobs, 0) if body.logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                })
        return JSONResponse({
            "id": base_id, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": _usage_of(outputs, samples), "metrics": [timeline(o) for o in outputs],
        })

    async def chat_completions(self, body: ChatCompletionRequest, raw: Request) -> Response:
        model = self.check_model(body.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            prompt = await self.engine.render_chat(messages, body.add_generation_prompt, body.chat_template_kwargs)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = body.top_logprobs if body.top_logprobs is not None else 0
        top_logprobs = top if body.logprobs else None
        params = self.params(lambda: body.sampling_params(self.max_tokens(requested, len(prompt.prompt_token_ids)), top_logprobs))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        self.check_streamable(body.stream, [params])
        streams = await self.admit(_samples([prompt], [params], request_id))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._stream_chat(streams, request_id, created, model, include_usage, top_logprobs),
                media_type="text/event-stream",
            )
        samples = await _until_disconnected(raw, asyncio.gather(*(self.collect(stream) for stream in streams)))
        (out,) = _merged(samples, [params])
        return JSONResponse({
            "id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c.logprobs or [], c.token_ids, top) if body.logprobs else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            } for c in out.outputs],
            "usage": _usage_of([out], samples),
            "metrics": timeline(out),
        })

    async def generate(self, body: GenerateRequest, raw: Request) -> Response:
        prompt = await self.prompt(body.prompt)
        params = self.params(body.sampling_params)
        self.max_tokens(params.max_tokens, len(prompt.prompt_token_ids))
        (stream,) = await self.admit([(prompt, params, f"gen-{uuid.uuid4().hex}")])
        prefix = prompt.prompt or ""
        if body.stream:
            async def chunks() -> AsyncIterator[bytes]:
                try:
                    async for out in self.outputs(stream):
                        yield (json.dumps({"text": [prefix + out.outputs[0].text]}) + "\0").encode()
                except (EngineDeadError, RequestTimeoutError) as exc:
                    yield (json.dumps(error_body(str(exc), "ServiceUnavailableError")) + "\0").encode()

            return StreamingResponse(chunks(), media_type="application/octet-stream")
        out = await _until_disconnected(raw, self.collect(stream))
        return JSONResponse({"text": [prefix + out.outputs[0].text], "metrics": timeline(out)})

    # -- request pieces -----------------------------------------------------------------------
    def check_model(self, model: str | None) -> str:
        if model is not None and model not in self.names:
            raise APIError(404, f"The model `{model}` does not exist; this server serves {self.names}.", "NotFoundError",
                           "model", "model_not_found")
        return self.names[0]

    @staticmethod
    def check_streamable(stream: bool, params: list[SamplingParams]) -> None:
        if stream and any(p.num_samples > p.n for p in params):
            raise APIError(400, "best_of larger than n cannot be streamed: the best are known only at the end.", param="best_of")

    async def prompt(self, prompt: Any) -> ProcessedPrompt:
        """Tokenized and validated (off the event loop)."""
        try:
            return await self.engine.process(prompt)
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None

    def max_tokens(self, requested: int | None, prompt_len: int) -> int:
        room = self.max_model_len - prompt_len
        if requested is None:
            return room
        if requested < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {requested}.", param="max_tokens")
        if requested > room:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the completion). "
                "Please reduce the prompt or max_tokens.",
                param="max_tokens",
            )
        return requested

    @staticmethod
    def params(build: Callable[[], SamplingParams]) -> SamplingParams:
        try:
            return build()
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    async def admit(self, requests: list[tuple[ProcessedPrompt, SamplingParams, str]]) -> list[RequestStream]:
        """The requests in the engine, all or none; 503 (Retry-After) when full or dead."""
        try:
            return await self.engine.submit(requests, timeout=self.settings.request_timeout)
        except EngineOverloadedError as exc:
            self.metrics.observe_status("rejected")
            raise APIError(503, str(exc), "ServiceUnavailableError", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except EngineDeadError as exc:
            self.metrics.observe_status("error")
            raise APIError(503, str(exc), "ServiceUnavailableError") from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    async def outputs(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        """A request's outputs; every request is counted once in the metrics, by how it ended:
        its finish reason, `error` (it failed, or timed out), or `abort` (its client left)."""
        finished, status = False, "abort"
        try:
            async for out in stream:
                if out.finished:
                    finished = True
                    self.metrics.observe(out)
                yield out
        except (EngineDeadError, RequestTimeoutError):
            status = "error"
            raise
        finally:
            await stream.aclose()
            if not finished:
                self.metrics.observe_status(status)

    async def collect(self, stream: RequestStream) -> RequestOutput:
        """A request's final output (503 if it failed, 504 if it timed out)."""
        final: RequestOutput | None = None
        try:
            async for out in self.outputs(stream):
                final = out
        except EngineDeadError as exc:
            raise APIError(503, str(exc), "ServiceUnavailableError") from None
        except RequestTimeoutError as exc:
            raise APIError(504, str(exc), "TimeoutError") from None
        assert final is not None
        return final

    # -- streams ------------------------------------------------------------------------------
    async def _interleaved(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The outputs of several requests as they come: (which stream, output); the first
        error of any ends it (EngineDeadError, a timeout), and leaving it closes them all."""
        queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()

        async def pump(k: int, stream: RequestStream) -> None:
            try:
                async for out in self.outputs(stream):
                    await queue.put((k, out))
            except BaseException as exc:  # EngineDeadError, a timeout, or cancellation when the client left
                await queue.put(exc)
                raise

        tasks = [asyncio.ensure_future(pump(k, stream)) for k, stream in enumerate(streams)]
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item[1].finished
                yield item
        finally:
            for task in tasks:
                task.cancel()

    async def _stream_completions(
        self, streams: list[RequestStream], params: list[SamplingParams], base_id: str, created: int, model: str,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        # stream k is sample j of prompt i: choice i * n + j
        where = [(i, i * p.n + j) for i, p in enumerate(params) for j in range(p.num_samples)]
        offsets = [0] * len(streams)
        finals: dict[int, RequestOutput] = {}
        try:
            async for k, out in self._interleaved(streams):
                i, index = where[k]
                c = out.outputs[0]
                logprobs = None
                if params[i].logprobs is not None and out.delta_token_ids:
                    n = len(out.delta_token_ids)
                    logprobs = completion_logprobs((c.logprobs or [])[-n:], out.delta_token_ids, params[i].logprobs, offsets[k])
                offsets[k] += len(out.delta_text)
                choice = {"index": index, "text": out.delta_text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                          "stop_reason": c.stop_reason}
                chunk: dict[str, Any] = {"id": base_id, "object": "text_completion", "created": created, "model": model,
                                         "choices": [choice]}
                if out.finished:
                    finals[k] = out
                    chunk["metrics"] = timeline(out)
                # a chunk for every step that made tokens, also when their text is held back (a
                # partial character, a special token, the tail of a possible stop string): the
                # client sees each token when it is made, as vLLM streams
                if out.delta_token_ids or out.delta_text or out.finished:
                    yield sse(chunk)
        except (EngineDeadError, RequestTimeoutError) as exc:
            yield sse(error_body(str(exc), "ServiceUnavailableError"))
            yield sse("[DONE]")
            return
        if include_usage:
            samples = [finals[k] for k in range(len(streams))]
            yield sse({"id": base_id, "object": "text_completion", "created": created, "model": model, "choices": [],
                       "usage": _usage_of(_merged(samples, params), samples)})
        yield sse("[DONE]")

    async def _stream_chat(
        self, streams: list[RequestStream], request_id: str, created: int, model: str, include_usage: bool, top_logprobs: int | None,
    ) -> AsyncIterator[bytes]:
        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            choice = {"index": index, "delta": delta, "logprobs": extra.pop("logprobs", None), "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = extra.pop("stop_reason", None)
            return sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [choice], **extra})

        # each choice's first chunk (its role) goes out with its first output, as vLLM's server
        # sends it: clients that time the first token by the first chunk (vLLM's `bench serve`)
        # then measure the prefill, not the request's arrival
        started: set[int] = set()
        finals: dict[int, RequestOutput] = {}
        try:
            async for index, out in self._interleaved(streams):
                if index not in started:
                    started.add(index)
                    yield chunk(index, {"role": "assistant", "content": ""})
                c = out.outputs[0]
                logprobs = None
                if top_logprobs is not None and out.delta_token_ids:
                    n = len(out.delta_token_ids)
                    logprobs = chat_logprobs((c.logprobs or [])[-n:], out.delta_token_ids, top_logprobs)
                if out.finished:
                    finals[index] = out
                    yield chunk(index, {"content": out.delta_text} if out.delta_text else {}, c.finish_reason, logprobs=logprobs,
                                stop_reason=c.stop_reason, metrics=timeline(out))
                elif out.delta_token_ids or out.delta_text:  # as for completions: a chunk per step
                    yield chunk(index, {"content": out.delta_text}, logprobs=logprobs)
        except (EngineDeadError, RequestTimeoutError) as exc:
            yield sse(error_body(str(exc), "ServiceUnavailableError"))
            yield sse("[DONE]")
            return
        if include_usage:
            samples = [finals[k] for k in range(len(streams))]
            yield sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                       "usage": _usage_of(samples[:1], samples)})
        yield sse("[DONE]")

    # -- errors and authentication --------------------------------------------------------------
    async def on_api_error(self, _: Request, exc: APIError) -> JSONResponse:
        if exc.status in (400, 404):
            self.metrics.observe_status("rejected")
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    async def on_validation_error(self, _: Request, exc: RequestValidationError) -> JSONResponse:
        self.metrics.observe_status("rejected")
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        return error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error", param)

    async def on_http_error(self, _: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    async def on_unexpected_error(self, request: Request, exc: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        self.metrics.observe_status("error")
        return error_response(500, f"the server failed on this request: {type(exc).__name__}", "InternalServerError")


def build_app(engine: AsyncLLM, served_model_names: list[str], settings: ServerSettings | None = None) -> FastAPI:
    server = OpenAIServer(engine, served_model_names, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()  # on the server's graceful shutdown (SIGINT / SIGTERM)

    app = FastAPI(title="distserve", version="0.1.0", lifespan=lifespan)
    app.state.server = server
    app.add_exception_handler(APIError, server.on_api_error)
    app.add_exception_handler(RequestValidationError, server.on_validation_error)
    app.add_exception_handler(StarletteHTTPException, server.on_http_error)
    app.add_exception_handler(Exception, server.on_unexpected_error)
    s = server.settings
    app.add_middleware(HTTPGate, api_key=s.api_key, max_body_bytes=s.max_request_bytes, draining=lambda: server.draining,
                       on_refused=server.metrics.observe_status)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.prometheus, methods=["GET"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/generate", server.generate, methods=["POST"])
    app.add_api_route("/reset_prefix_cache", server.reset_prefix_cache, methods=["POST"])
    return app


def _samples(
    prompts: list[ProcessedPrompt], params: list[SamplingParams], base_id: str
) -> list[tuple[ProcessedPrompt, SamplingParams, str]]:
    """Every sample of every prompt, as a request of its own (sample j of prompt i:
    `base_id-i-j`); a prompt's samples are admitted together and share its blocks."""
    return [(prompt, sample, f"{base_id}-{i}-{j}") for i, (prompt, p) in enumerate(zip(prompts, params))
            for j, sample in enumerate(p.samples())]


def _merged(outputs: list[RequestOutput], params: list[SamplingParams]) -> list[RequestOutput]:
    """The outputs of every sample, in `_samples` order, as one output per prompt."""
    merged, start = [], 0
    for p in params:
        samples = outputs[start : start + p.num_samples]
        start += p.num_samples
        merged.append(samples[0] if p.num_samples == 1 else merge_samples(samples[0].request_id, samples, p))
    return merged


def _usage_of(outputs: list[RequestOutput], samples: list[RequestOutput]) -> dict[str, Any]:
    """Usage of a request's prompts (`outputs`, one per prompt: each counted once, with the
    tokens the prefix cache served) and of every sample generated (`samples`, the best_of
    ones not returned included)."""
    generated = sum(len(s.outputs[0].token_ids) for s in samples)
    return usage(sum(len(o.prompt_token_ids) for o in outputs), generated, sum(o.metrics.num_cached_tokens for o in outputs))


def _completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Any]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty.", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [{"prompt_token_ids": list(p)} for p in prompt]


async def _until_disconnected(raw: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it (and so aborting its requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL)
        if done:
            return task.result()
        if await raw.is_disconnected():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, APIError):
                pass
            raise APIError(499, "client disconnected", "ClientClosedRequest")


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM or SIGINT drains the server (`OpenAIServer.drain`)
    before it stops; a second one stops it at once."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._draining: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is not None or not self.started:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # uvicorn raises it again once stopped
        self._draining = asyncio.get_event_loop().create_task(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        try:
            await self._drain()
        finally:
            self.should_exit = True


def run_server(engine: AsyncLLM, served_model_names: list[str], settings: ServerSettings, host: str, port: int,
               log_level: str = "warning") -> None:
    """Serve until SIGTERM or SIGINT, then drain and return."""
    app = build_app(engine, served_model_names, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    DrainingServer(config, app.state.server.drain).run()
