"""The OpenAI-compatible server, started as a subprocess, against the real `openai` client,
raw HTTP (httpx) and Prometheus' own parser."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.entrypoints.serving import metrics, serving

API_KEY = "test-key"
MODEL = "tiny"


@pytest.fixture(scope="module")
def server(checkpoints):
    with serving(checkpoints("llama-gqa"), "--mode", "disaggregated", "--api-key", API_KEY, "--served-model-name", MODEL,
                 "--prefill-num-kv-blocks", "128", "--decode-num-kv-blocks", "128", "--max-model-len", "256",
                 "--decode-quantization", "int8") as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)


@pytest.fixture
def aclient(server):
    """A factory: an async client belongs to the event loop it is first used in."""
    return lambda: openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY)


def wait_all_blocks_free(server: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        used = metrics(server)["distserve_kv_blocks_used"]
        if used and all(s.value == 0 for s in used):
            return
        assert time.monotonic() < deadline, f"KV blocks still in use: {used}"
        time.sleep(0.1)


def test_models_and_health(client, server) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{server}/health").status_code == 200


def test_completion(client) -> None:
    out = client.completions.create(model=MODEL, prompt="the café", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and len(out.choices) == 1
    assert out.choices[0].finish_reason == "length" and out.choices[0].text
    assert out.usage.completion_tokens == 7 and out.usage.prompt_tokens > 0
    timeline = out.model_extra["metrics"][0]
    assert timeline["transfer_tokens"] == out.usage.prompt_tokens and timeline["ttft"] > 0


def test_streaming_completion_matches_non_streaming(client) -> None:
    kwargs = dict(model=MODEL, prompt="the café", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stream_sends_tokens_whose_text_is_held_back(client) -> None:
    """A stop string that never matches holds the text back until the end; the tokens still
    stream as they are made (empty text), so the first chunk marks the first token, as in vLLM."""
    never = "~" * 60
    kwargs = dict(model=MODEL, prompt="the café", max_tokens=24, temperature=0, stop=[never], extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    assert 0 < len(full) < len(never)  # every token's text held back to the end
    chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert len(chunks) > 1 and chunks[0].choices[0].text == ""
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_completion_and_stream(client) -> None:
    messages = [{"role": "user", "content": "the café"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=9, temperature=0,
        extra_body={"ignore_eos": True})
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens == 9
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_stream_opens_with_its_first_token(server) -> None:
    """Each choice's role chunk goes out with its first token, as vLLM's server sends it: vLLM's
    `bench serve` takes the first chunk's arrival as the first token's. Eight prompts at once,
    so that most wait for a step before their first token."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "the café " * 60}], "max_tokens": 3,
            "temperature": 0, "stream": True, "ignore_eos": True}

    async def stream(http: httpx.AsyncClient) -> tuple[float, list[dict]]:
        received, chunks = None, []
        async with http.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60,
                               headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    received = received or time.time()
                    chunks.append(json.loads(line.removeprefix("data: ")))
        return received, chunks

    async def all_at_once() -> list[tuple[float, list[dict]]]:
        async with httpx.AsyncClient() as http:
            return await asyncio.gather(*(stream(http) for _ in range(8)))

    for received, chunks in asyncio.run(all_at_once()):
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        first_token = next(c["metrics"] for c in chunks if c.get("metrics"))["first_token_time"]
        assert received >= first_token


def test_sampling_params_reach_the_engine(client) -> None:
    kwargs = dict(model=MODEL, prompt="the", max_tokens=10, temperature=1.0, top_p=0.9, seed=11, extra_body={"ignore_eos": True})
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b
    greedy = client.completions.create(model=MODEL, prompt="the", max_tokens=10, temperature=0,
        extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy[2:5]
    cut = client.completions.create(model=MODEL, prompt="the", max_tokens=10, temperature=0, stop=[stop],
        extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == greedy[: greedy.index(stop)] and cut.finish_reason == "stop"
    penalized = client.completions.create(model=MODEL, prompt="the", max_tokens=10, temperature=0, frequency_penalty=2.0,
        presence_penalty=2.0, extra_body={"ignore_eos": True})
    assert penalized.usage.completion_tokens == 10


def test_logprobs(client) -> None:
    out = client.completions.create(model=MODEL, prompt="the", max_tokens=3, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3
    # top_logprobs is keyed by token text, so two byte tokens that both print as U+FFFD share a key
    assert all(1 <= len(t) <= 2 and max(t.values()) == v for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == max(t.logprob for t in c.top_logprobs) for c in content)


def test_async_client_streams_concurrently(aclient, server) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> int:
        stream = await client.completions.create(model=MODEL, prompt=f"the {i}", max_tokens=5 + i % 7, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    async def run() -> list[int]:
        client = aclient()
        return await asyncio.gather(*(one(client, i) for i in range(50)))

    assert asyncio.run(run()) == [5 + i % 7 for i in range(50)]
    wait_all_blocks_free(server)


def test_async_chat(aclient) -> None:
    async def run():
        return await aclient().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            temperature=0, extra_body={"ignore_eos": True})

    assert asyncio.run(run()).usage.completion_tokens == 4


def test_sse_framing_is_exact(server) -> None:
    body = {"model": MODEL, "prompt": "the", "max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_bytes())
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    for event in events[:-2]:
        assert event.startswith(b"data: ") and b"\n" not in event
        payload = json.loads(event[len(b"data: "):])
        assert payload["object"] == "text_completion"


def test_metrics_are_prometheus(server, client) -> None:
    client.completions.create(model=MODEL, prompt="the", max_tokens=2)
    families = metrics(server)
    for name in ("distserve_requests", "distserve_time_to_first_token_seconds", "distserve_time_per_output_token_seconds",
                 "distserve_e2e_request_latency_seconds", "distserve_queue_length", "distserve_kv_blocks_used",
                 "distserve_kv_blocks_free", "distserve_kv_transfers", "distserve_kv_transfer_bytes", "distserve_kv_transfer_seconds"):
        assert name in families, name
    instances = {s.labels["instance"] for s in families["distserve_kv_blocks_free"]}
    assert instances == {"prefill-0", "decode-0"}
    transfers = {s.labels["instance"]: s.value for s in families["distserve_kv_transfers"] if s.name.endswith("_total")}
    assert transfers["decode-0"] > 0
    # one machine: every byte through shared memory, all of them counted under it
    by_transport = {s.labels["transport"]: s.value for s in families["distserve_kv_transfer_transport_bytes"]
                    if s.name.endswith("_total") and s.labels["instance"] == "decode-0"}
    total = next(s.value for s in families["distserve_kv_transfer_bytes"]
                 if s.name.endswith("_total") and s.labels["instance"] == "decode-0")
    assert by_transport == {"shm": total} and total > 0
    # the decode instance runs int8 weights (--decode-quantization): its linears take a quarter
    weights = {s.labels["instance"]: s.value for s in families["distserve_weight_bytes"]}
    assert 0 < weights["decode-0"] < weights["prefill-0"]


def test_client_disconnect_aborts_the_request(server) -> None:
    body = {"model": MODEL, "prompt": "the", "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
    before = sum(s.value for s in metrics(server)["distserve_requests"] if s.labels.get("status") == "abort")
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        for i, _ in enumerate(response.iter_bytes()):
            if i == 3:
                break
    deadline = time.monotonic() + 10
    while sum(s.value for s in metrics(server)["distserve_requests"] if s.labels.get("status") == "abort") <= before:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.1)
    wait_all_blocks_free(server)


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 5}, 400, None),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x " * 400}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, None),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 3, "best_of": 2}, 400, None),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 3, "stream": True}, 400, "best_of"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ],
)
def test_errors_are_openai_shaped(server, client, path: str, body: dict, status: int, param: str | None) -> None:
    response = httpx.post(f"{server}{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param:
        assert error["param"] == param
    assert client.completions.create(model=MODEL, prompt="still up", max_tokens=2).usage.completion_tokens >= 1


def test_api_key_is_required(server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong").models.list()


def test_openai_client_sees_errors_as_exceptions(client) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=100000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")


def test_generate_endpoint(server) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    out = httpx.post(f"{server}/generate", json={"prompt": "the", "max_tokens": 3, "temperature": 0, "ignore_eos": True},
        headers=headers).json()
    assert out["text"][0].startswith("the") and out["metrics"]["num_generated_tokens"] == 3
    with httpx.stream("POST", f"{server}/generate", json={"prompt": "the", "max_tokens": 3, "stream": True, "ignore_eos": True},
        headers=headers) as r:
        chunks = [json.loads(c) for c in b"".join(r.iter_bytes()).split(b"\0") if c]
    assert chunks and chunks[-1]["text"][0].startswith("the")


def test_n_choices_and_cached_tokens_reach_the_openai_client(client, server) -> None:
    prompt = "the café and the " * 6  # a few full blocks
    greedy = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    out = client.completions.create(n=3, **greedy)
    assert [c.index for c in out.choices] == [0, 1, 2] and len({c.text for c in out.choices}) == 1
    assert out.usage.completion_tokens == 18
    again = client.completions.create(**greedy)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16 and again.choices[0].text == out.choices[0].text
    assert httpx.post(f"{server}/reset_prefix_cache").status_code == 401  # it changes state: the key is asked
    deadline = time.monotonic() + 10
    while (reset := httpx.post(f"{server}/reset_prefix_cache", headers={"Authorization": f"Bearer {API_KEY}"})).status_code != 200:
        assert reset.status_code == 409 and reset.json()["error"]["message"], reset.text  # blocks still held: retry
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cold = client.completions.create(**greedy)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0 and cold.choices[0].text == out.choices[0].text
    families = metrics(server)
    hits = {s.labels["instance"]: s.value for s in families["distserve_prefix_cache_hits"] if s.name.endswith("_total")}
    queries = {s.labels["instance"]: s.value for s in families["distserve_prefix_cache_queries"] if s.name.endswith("_total")}
    assert 0 < hits["prefill-0"] <= queries["prefill-0"]
    best = client.completions.create(n=1, best_of=3, **{**greedy, "temperature": 1.0, "seed": 4})
    assert len(best.choices) == 1 and best.usage.completion_tokens == 18
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=5,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True}))
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] and texts[0]
    finished = [choice.index for c in chunks for choice in c.choices if choice.finish_reason]
    assert sorted(finished) == [0, 1]
