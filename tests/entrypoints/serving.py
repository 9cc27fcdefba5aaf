"""`distserve serve` started as a subprocess for a test, and read through its /metrics."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model: Path, *args: str, startup: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """A server of `model` with these flags: its base URL and process. On exit it gets SIGTERM
    (if still running) and must leave no process behind."""
    port = free_port()
    cmd = [sys.executable, "-m", "distserve.entrypoints.cli", "serve", str(model), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.3)
    children = psutil.Process(proc.pid).children(recursive=True)
    try:
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"server left processes behind: {alive}"


def metrics(server: str) -> dict[str, list]:
    text = httpx.get(f"{server}/metrics").text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}
