"""The demo `make demo` runs: serve the built-in model disaggregated (1 prefill + 1 decode
instance), ask it a question through the official `openai` client with streaming, print
the answer as it arrives and the request's timeline, then shut the server down."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import openai

QUESTION = "What is the capital of France?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(server: subprocess.Popen, base: str, timeout: float = 600.0) -> None:
    start = time.monotonic()
    while True:
        if server.poll() is not None:
            sys.exit(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                print(f"ready in {time.monotonic() - start:.0f} s\n", flush=True)
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() - start > timeout:
            server.terminate()
            sys.exit("the server did not become ready")
        time.sleep(0.5)


def main() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "distserve.entrypoints.cli", "serve", "--port", str(port),
               "--mode", "disaggregated", "--num-prefill-instances", "1", "--num-decode-instances", "1"]
    print("$ distserve serve --port", port, "--mode disaggregated --num-prefill-instances 1 --num-decode-instances 1")
    print("starting 1 prefill + 1 decode instance on the built-in SmolLM2-135M-Instruct ...", flush=True)
    server = subprocess.Popen(command)
    try:
        wait_until_ready(server, base)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        print(f"Q: {QUESTION}\nA: ", end="", flush=True)
        stream = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=64,
            stream=True,
        )
        timeline = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
            timeline = (chunk.model_extra or {}).get("metrics", timeline)
        print("\n")
        if timeline:
            print(f"prefill on {timeline['prefill_instance']}, decode on {timeline['decode_instance']}")
            print(f"  TTFT            {timeline['ttft'] * 1e3:8.1f} ms")
            print(f"  KV migration    {timeline['transfer_seconds'] * 1e3:8.2f} ms "
                  f"({timeline['transfer_tokens']} tokens, {timeline['transfer_bytes'] / 1e6:.2f} MB)")
            print(f"  TPOT            {timeline['tpot'] * 1e3:8.1f} ms over {timeline['num_generated_tokens']} tokens")
            print(f"  end to end      {timeline['e2e_latency'] * 1e3:8.1f} ms")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)  # uvicorn shuts down gracefully, then re-raises SIGTERM
        print("\nserver shut down")


if __name__ == "__main__":
    main()
