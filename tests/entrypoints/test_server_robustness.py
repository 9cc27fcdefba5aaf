"""The server against hostile input, overload, clients that leave, and shutdown: every bad
request gets a 4xx with OpenAI's error body and the next one is served; a full queue gets 503
with Retry-After; a client that leaves frees its blocks; SIGTERM drains."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.entrypoints.serving import metrics, serving

NAN_BODIES = [
    ('{"prompt": "the", "max_tokens": 3, "temperature": NaN}', "temperature"),
    ('{"prompt": "the", "max_tokens": 3, "repetition_penalty": NaN}', "repetition_penalty"),
    ('{"prompt": "the", "max_tokens": 3, "top_p": Infinity}', "top_p"),
    ('{"prompt": "the", "max_tokens": 3, "min_p": NaN}', "min_p"),
    ('{"prompt": "the", "max_tokens": 3, "presence_penalty": -Infinity}', "presence_penalty"),
    ('{"prompt": "the \\ud800 end", "max_tokens": 3}', "Unicode"),
    ('{"prompt": "the", "max_tokens": 3, "stop": ["\\udfff"]}', "stop"),
]
CHAT_BODIES = [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}],
      "chat_template_kwargs": {"chat_template": "{% for a in range(10**4) %}{% for b in range(10**4) %}x{% endfor %}{% endfor %}"}},
     "--trust-request-chat-template"),
]


@pytest.fixture(scope="module")
def server(checkpoints):
    with serving(checkpoints("llama-gqa"), "--mode", "colocated", "--num-kv-blocks", "128", "--max-model-len", "512",
                 "--max-request-bytes", "200000", "--max-queue-len", "3") as (base, _):
        yield base


def completion(server: str, body: dict | str, timeout: float = 30.0) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(f"{server}/v1/completions", json=body, timeout=timeout)
    return httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=timeout)


def still_serving(server: str) -> None:
    out = completion(server, {"prompt": "the", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3


def blocks_used(server: str) -> float:
    return sum(s.value for s in metrics(server)["distserve_kv_blocks_used"])


@pytest.mark.parametrize("body, names", NAN_BODIES)
def test_bad_numbers_and_text_are_400_and_the_server_stays_up(server, body: str, names: str) -> None:
    with httpx.Client() as client:  # the next request on the same connection is served too
        response = client.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert names in response.json()["error"]["message"]
        assert client.post(f"{server}/v1/completions", json={"prompt": "the", "max_tokens": 2}).status_code == 200
    still_serving(server)


@pytest.mark.parametrize("body, message", CHAT_BODIES)
def test_bad_chat_requests_are_400(server, body: dict, message: str) -> None:
    start = time.monotonic()
    response = httpx.post(f"{server}/v1/chat/completions", json={"max_tokens": 2, **body}, timeout=30)
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    assert time.monotonic() - start < 5  # the template was never run
    still_serving(server)


def test_a_body_past_the_limit_is_413_and_health_answers(server) -> None:
    response = completion(server, {"prompt": "the " * 100_000, "max_tokens": 2})
    assert response.status_code == 413 and "--max-request-bytes" in response.json()["error"]["message"]
    assert httpx.get(f"{server}/health").status_code == 200
    still_serving(server)


def instance_pid(server: str) -> int:
    return int(next(s.value for s in metrics(server)["distserve_instance_pid"]))


def aborted(server: str) -> float:
    return sum(s.value for s in metrics(server)["distserve_requests"] if s.labels.get("status") == "abort")


def test_a_non_streaming_client_that_leaves_frees_its_blocks(server) -> None:
    """The instance is held (SIGSTOP) mid-request so that the request cannot finish by itself:
    the server notices the client leave and aborts it; the blocks are free as soon as the
    instance runs again."""
    before = aborted(server)
    body = {"prompt": "the", "max_tokens": 500, "temperature": 0, "ignore_eos": True}
    client = threading.Thread(target=lambda: pytest.raises(httpx.ReadTimeout, completion, server, body, 1.0))
    client.start()
    while blocks_used(server) == 0:
        time.sleep(0.01)
    pid = instance_pid(server)
    os.kill(pid, signal.SIGSTOP)
    try:
        client.join()
        left = time.monotonic()
        while aborted(server) == before:
            assert time.monotonic() - left < 1.0, "the server did not abort the request of the client that left"
            time.sleep(0.05)
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = time.monotonic()
    while blocks_used(server) > 0:
        assert time.monotonic() - resumed < 1.0, "the abandoned request still holds its blocks"
        time.sleep(0.05)


def test_a_full_queue_gets_503_with_retry_after_and_admitted_requests_finish(server) -> None:
    pid = instance_pid(server)
    os.kill(pid, signal.SIGSTOP)  # nothing is prefilled: requests pile up in the queue
    results: dict[int, httpx.Response] = {}
    try:
        def send(i: int) -> None:
            results[i] = completion(server, {"prompt": f"the {i}", "max_tokens": 4, "temperature": 0, "ignore_eos": True}, timeout=60)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while len(results) < 3:  # the three past the queue's room are answered at once
            assert time.monotonic() < deadline, results
            time.sleep(0.05)
    finally:
        os.kill(pid, signal.SIGCONT)
    for t in threads:
        t.join(timeout=60)
    refused = [r for r in results.values() if r.status_code == 503]
    served = [r for r in results.values() if r.status_code == 200]
    assert len(refused) == 3 and len(served) == 3
    assert all(r.headers["retry-after"] and "--max-queue-len" in r.json()["error"]["message"] for r in refused)
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in served)
    still_serving(server)


@pytest.mark.slow
def test_sigterm_drains_every_stream(checkpoints) -> None:
    """SIGTERM while 10 streams run: the 5 short ones finish within the shutdown timeout, the 5
    long ones are ended at it with an error event and [DONE]; a request after SIGTERM gets 503."""
    with serving(checkpoints("llama-gqa"), "--mode", "colocated", "--num-kv-blocks", "512", "--max-model-len", "512",
                 "--shutdown-timeout", "1") as (base, proc):
        streams: dict[int, list[bytes]] = {}
        started = threading.Barrier(11)

        def stream(i: int) -> None:
            body = {"prompt": "the", "max_tokens": 8 if i < 5 else 500, "temperature": 0, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
                events = r.iter_bytes()
                first = next(events)
                started.wait()
                streams[i] = [e for e in (first + b"".join(events)).split(b"\n\n") if e]

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        started.wait()
        pid = instance_pid(base)
        proc.send_signal(signal.SIGTERM)
        for t in threads[:5]:  # the short ones finish while the server drains
            t.join(timeout=30)
        os.kill(pid, signal.SIGSTOP)  # the long ones can no longer finish: the timeout ends them
        try:
            refused = httpx.post(f"{base}/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=10)
            assert refused.status_code == 503 and refused.headers["retry-after"]
            for t in threads[5:]:
                t.join(timeout=30)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert sorted(streams) == list(range(10))
        for i, events in streams.items():
            assert events[-1] == b"data: [DONE]", (i, events[-2:])
            last = json.loads(events[-2][len(b"data: "):])
            if i < 5:
                assert last["choices"][0]["finish_reason"] == "length"
            else:
                assert "shutting down" in last["error"]["message"]
