"""Shared fixtures: tiny checkpoints (built once per session) and process hygiene checks."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

# Ray reads this when it is imported: with it, a local cluster keeps all its traffic on 127.0.0.1
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import pytest

from tests.tiny_models import save_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """checkpoints(name) -> path of a tiny random checkpoint of that variant (cached)."""
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = save_checkpoint(name, root / name)
        return made[name]

    return get


@pytest.fixture(autouse=True, scope="module")
def no_leftover_processes():
    """Every test module leaves no instance process and no shared-memory KV cache behind
    (checked after the module's engines are shut down)."""
    yield
    children = [p for p in psutil.Process().children(recursive=True) if _is_instance(p)]
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"instance processes left behind: {[p.pid for p in alive]}"
    leaked = [f for f in os.listdir("/dev/shm") if f.startswith("ds-")] if os.path.isdir("/dev/shm") else []
    assert not leaked, f"shared-memory KV caches left behind: {leaked}"


def _is_instance(p: psutil.Process) -> bool:
    """An instance process: forked by multiprocessing's fork server (the server itself and
    the resource tracker live as long as the test session)."""
    try:
        parent = p.parent()
        return parent is not None and "forkserver" in " ".join(parent.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
