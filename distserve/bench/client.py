"""An asynchronous streaming client for any OpenAI-compatible server (distserve, vLLM, ...).

Each request goes to `/v1/completions` as token ids with `max_tokens` = its output length
and `ignore_eos`, streamed; the client records the send time, the arrival of every streamed
chunk, the token count the server reports, errors, and distserve's request timeline when
the server sends one.

Conversations (`run_conversations`) are replayed turn by turn: a turn is sent once the last
one's answer arrived (and a think time passed), with that answer in its prompt, re-tokenized
from its text as a chat client's next message would carry it.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from tqdm.auto import tqdm

from distserve.bench.metrics import RequestRecord
from distserve.bench.workloads import BenchRequest, Conversation


async def send_request(
    client: httpx.AsyncClient, url: str, model: str | None, request: BenchRequest, headers: dict[str, str],
    text: list[str] | None = None,
) -> RequestRecord:
    """Send one request and record it; the answer's text pieces go to `text` if given."""
    body = {
        "prompt": request.prompt_token_ids,
        "max_tokens": request.output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if model:
        body["model"] = model
    record = RequestRecord(request.prompt_len, request.output_len, send_time=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = str(chunk["error"].get("message", chunk["error"]))
                    break
                now = time.perf_counter()
                choices = chunk.get("choices") or []
                if choices:  # a step's tokens, its text possibly empty (held back), as vLLM counts them
                    record.token_times.append(now)
                    if text is not None:
                        text.append(choices[0].get("text") or "")
                if chunk.get("usage"):
                    record.num_tokens = chunk["usage"].get("completion_tokens", 0)
                    record.cached_tokens = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                if chunk.get("metrics"):
                    record.server_metrics = chunk["metrics"]
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    if not record.num_tokens:
        record.num_tokens = len(record.token_times)
    return record


async def run_requests(
    base_url: str,
    model: str | None,
    requests: list[BenchRequest],
    send_times: list[float],
    api_key: str | None = None,
    description: str = "requests",
    progress: bool = True,
) -> list[RequestRecord]:
    """Send each request at its time (seconds from now) and wait for all of them."""
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    bar = tqdm(total=len(requests), desc=description, unit="req", disable=not progress, leave=False)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for when, request in zip(send_times, requests):
            delay = start + when - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send_request(client, url, model, request, headers))
            task.add_done_callback(lambda _: bar.update(1))
            tasks.append(task)
        records = await asyncio.gather(*tasks)
    bar.close()
    return list(records)


async def run_conversations(
    base_url: str,
    model: str | None,
    conversations: list[Conversation],
    start_times: list[float],
    tokenizer,  # noqa: ANN001 - the served model's tokenizer: it reads the answers into the next prompts
    think_time: float = 0.0,
    api_key: str | None = None,
    description: str = "conversations",
    progress: bool = True,
) -> list[RequestRecord]:
    """Start each conversation at its time (seconds from now); each of its turns is a request,
    sent `think_time` seconds after the answer to the last one arrived. The turns of a
    conversation cut short by an error are recorded as failed."""
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    bar = tqdm(total=sum(len(c.turns) for c in conversations), desc=description, unit="turn", disable=not progress, leave=False)

    async def replay(client: httpx.AsyncClient, conversation: Conversation, start: float) -> list[RequestRecord]:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        history = list(conversation.system_token_ids)
        records: list[RequestRecord] = []
        for k, (user, answer_len) in enumerate(conversation.turns):
            prompt = history + user
            pieces: list[str] = []
            record = await send_request(client, url, model, BenchRequest(prompt, answer_len), headers, pieces)
            records.append(record)
            bar.update(1)
            if record.error:
                records += [RequestRecord(len(prompt), n, time.perf_counter(), error=f"not sent: turn {k} failed")
                            for _, n in conversation.turns[k + 1 :]]
                bar.update(len(conversation.turns) - k - 1)
                break
            history = prompt + tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]
            await asyncio.sleep(think_time)
        return records

    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        now = time.perf_counter()
        per_conversation = await asyncio.gather(*(replay(client, c, now + t) for c, t in zip(conversations, start_times)))
    bar.close()
    return [r for records in per_conversation for r in records]
