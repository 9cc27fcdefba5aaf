"""The Ray backend: instances as Ray actors in placement groups, on a local cluster that
distserve starts (or one the test starts and distserve joins); same outputs as the local
backend, and nothing of Ray left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from distserve import LLM, SamplingParams
from distserve.distributed.group import free_port
from distserve.engine.backends.ray import LOCAL_RAY_ENV
from tests.tiny_models import mixed_prompts

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
RAY_DAEMONS = ("raylet", "gcs_server")
# `ray start` turns token authentication on; a client joining must say so
JOIN_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


def ray_daemons() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        text = " ".join([p.info["name"] or "", *(p.info["cmdline"] or [])])
        if any(d in text for d in RAY_DAEMONS):
            found.append(p)
    return found


def run(path, prompts, **kw) -> tuple[list[list[int]], list]:
    with LLM(str(path), mode="disaggregated", num_kv_blocks=64, **kw) as engine:
        outputs = engine.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        stats = engine.get_stats()
    return [o.outputs[0].token_ids for o in outputs], stats


@pytest.fixture(scope="module")
def expected(checkpoints):
    prompts = mixed_prompts(6, seed=11)
    tokens, _ = run(checkpoints("llama-gqa"), prompts)
    return prompts, tokens


@pytest.mark.slow
def test_ray_backend_starts_and_stops_its_own_cluster(checkpoints, expected) -> None:
    assert not ray_daemons(), "a Ray cluster is already running"
    prompts, tokens = expected
    with LLM(str(checkpoints("llama-gqa")), mode="disaggregated", num_kv_blocks=64, backend="ray",
             prefill={"tensor_parallel_size": 2}) as engine:
        outputs = engine.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        stats = engine.get_stats()
        # the liveness check polls: an instance that does not answer (stopped) does not block it
        backend, pid = engine.engine._controller.backend, engine.engine.pids()["decode-0"]
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            assert backend.dead() == []
            assert time.monotonic() - start < 1.0
        finally:
            os.kill(pid, signal.SIGCONT)
        os.environ["DISTSERVE_TEST_SET_WHILE_RAY_RAN"] = "kept"  # not Ray's: shutdown leaves it
    got = [o.outputs[0].token_ids for o in outputs]
    import ray
    assert os.environ.pop("DISTSERVE_TEST_SET_WHILE_RAY_RAN") == "kept"
    assert got == tokens
    assert all(s.kv_blocks_free == s.kv_blocks_total for s in stats)
    assert sum(s.num_transfers for s in stats if s.role == "decode") == len(prompts)
    assert not ray.is_initialized()
    psutil.wait_procs(ray_daemons(), timeout=15)
    assert not ray_daemons(), "Ray processes left behind"


# run in a process of its own: a Ray driver that was connected before in this process
# (the other tests here) has its new actors cancelled on Ray's in-process test cluster
TWO_NODES = r"""
import json, sys
from ray.cluster_utils import Cluster
from distserve import LLM, SamplingParams
path, prompts = sys.argv[1], json.loads(sys.argv[2])
# 4 (logical) CPUs a node: both 1-CPU instances fit on either node; only placement parts them
node_args = {"num_cpus": 4, "node_ip_address": "127.0.0.1", "object_store_memory": 80 << 20}
cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
report = {}
try:
    cluster.add_node(**node_args)
    cluster.wait_for_nodes()
    for paired in (False, True):
        with LLM(path, mode="disaggregated", num_kv_blocks=64, backend="ray", ray_address=cluster.address,
                 pair_placement=paired) as engine:
            outputs = engine.generate([{"prompt_token_ids": p} for p in prompts],
                                      SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
            report[str(paired)] = {
                "tokens": [o.outputs[0].token_ids for o in outputs],
                "transports": sorted({str(o.metrics.transfer_transport) for o in outputs}),
                "stats": {s.role: [s.transferred_bytes, s.transferred_bytes_by_transport, s.kv_blocks_free == s.kv_blocks_total]
                          for s in engine.get_stats()},
                "nodes": {c.role.value: sorted({h.machine for h in engine.engine._controller.ready[name].kv_handles})
                          for name, c in engine.engine._controller.configs.items()},
            }
finally:
    cluster.shutdown()
print(json.dumps(report))
"""


@pytest.mark.slow
def test_ray_nodes_stand_for_machines(checkpoints, expected) -> None:
    """Two Ray nodes on this machine (Ray's own test cluster) stand for two machines: placed
    apart, the KV crosses between them over the torch.distributed group; paired, prefill and
    decode share a node and the KV moves through shared memory. Same tokens either way."""
    prompts, tokens = expected
    env = {**os.environ, **LOCAL_RAY_ENV}
    out = subprocess.run([sys.executable, "-c", TWO_NODES, str(checkpoints("llama-gqa")), json.dumps(prompts)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for paired, transport in (("False", "torch"), ("True", "shm")):
        run = report[paired]
        assert run["tokens"] == tokens
        nodes = run["nodes"]
        assert len(nodes["prefill"]) == len(nodes["decode"]) == 1  # an instance's workers on one node
        assert (nodes["prefill"] == nodes["decode"]) == (paired == "True")
        assert run["transports"] == [transport]
        moved, by_transport, all_free = run["stats"]["decode"]
        assert by_transport == {transport: moved} and moved > 0
        assert all_free and run["stats"]["prefill"][2]
    psutil.wait_procs(ray_daemons(), timeout=15)
    assert not ray_daemons(), "Ray processes left behind"


@pytest.mark.slow
def test_ray_backend_joins_an_existing_cluster(checkpoints, expected, monkeypatch) -> None:
    prompts, tokens = expected
    for key, value in JOIN_ENV.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    env = dict(os.environ)
    subprocess.run([ray_bin, "start", "--head", "--num-cpus=2", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True, capture_output=True)
    try:
        got, _ = run(checkpoints("llama-gqa"), prompts, backend="ray", ray_address=f"127.0.0.1:{port}")
        assert got == tokens
        # the cluster is still up, with none of distserve's actors or placement groups in it
        check = (
            "import ray\n"
            f"ray.init(address='127.0.0.1:{port}', log_to_driver=False)\n"
            "actors = ray._private.state.actors().values()\n"  # the GCS's tables (no dashboard here)
            "groups = ray.util.placement_group_table().values()\n"
            "print(sum(a['State'] == 'ALIVE' for a in actors), sum(g['state'] == 'CREATED' for g in groups))\n"
        )
        out = subprocess.run([sys.executable, "-c", check], env=env, check=True, capture_output=True, text=True)
        assert out.stdout.split()[-2:] == ["0", "0"], out.stdout
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
    psutil.wait_procs(ray_daemons(), timeout=15)
    assert not ray_daemons()
