"""An instance over a step executor (here the planner's, which runs steps on a virtual clock):
what it sends out is its own copy."""

from __future__ import annotations

from distserve.config import Role
from distserve.engine.instance import Instance
from distserve.engine.messages import AddRequest, StepOutput
from distserve.planner.latency_model import FittedLatencyModel
from distserve.planner.simulator import ClusterSpec, InstanceSpec, SimulatedExecutor, VirtualClock
from distserve.sampling_params import SamplingParams

LATENCY = FittedLatencyModel((0.1, 0.0, 0.0), (0.01, 0.0, 0.0), (0.01, 0.0, 0.0))


def test_step_outputs_carry_a_snapshot_of_the_stats() -> None:
    """A step's stats go on a queue whose feeder thread pickles them later: the instance must
    not send the object it goes on updating."""
    spec = InstanceSpec(Role.COLOCATED, LATENCY, 64 * 16)
    clock = VirtualClock()
    instance = Instance(spec.instance_config("colocated-0"), SimulatedExecutor(spec, clock, ClusterSpec([spec])), 1 << 20, clock)
    instance.handle(AddRequest("a", [1] * 20, SamplingParams(max_tokens=3, ignore_eos=True), 0.0, frozenset()))
    out = instance.step()[0]
    assert isinstance(out, StepOutput) and out.stats is not None
    sent = (out.stats.num_steps, out.stats.kv_blocks_free, dict(out.stats.transferred_bytes_by_transport))
    instance.stats.transferred_bytes_by_transport["shm"] = 1
    while instance.has_work():
        instance.step()
    assert (out.stats.num_steps, out.stats.kv_blocks_free, out.stats.transferred_bytes_by_transport) == sent
    assert instance.current_stats().num_steps == 3 and instance.current_stats() is not instance.stats


def test_instance_processes_reuse_freed_step_memory() -> None:
    """An instance process keeps what a step frees: allocating and freeing a step's worth of
    activations again touches no new pages (by default glibc maps and unmaps the large ones)."""
    import subprocess
    import sys

    script = """
import resource, torch
from distserve.engine.instance_loop import keep_freed_memory

def faults(rounds):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        step = [torch.empty(n << 18).fill_(1.0) for n in (1, 8, 48)]  # 1, 8 and 48 MiB
        del step
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults(20)
assert keep_freed_memory()
faults(3)  # the heap settles in a round or two
print(default, faults(20))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    default, kept = map(int, out.stdout.split())
    assert default > 20 * 10000  # 12,288 pages a round for the 48 MiB alone
    assert kept < 200


def test_an_instance_process_runs_at_its_phase_niceness() -> None:
    """`--decode-nice N`: the instance's process, and the threads torch starts in it, run at
    niceness N, so that on shared cores the other phase's steps come first."""
    import subprocess
    import sys

    script = """
import os, threading, torch
from distserve.config import InstanceConfig, PhaseConfig
from distserve.engine.instance_loop import configure_process

config = InstanceConfig(name="decode-0", role="decode", phase=PhaseConfig(nice=7), block_size=16, device="cpu",
                        num_threads=2, cpu_cores=None, seed=0, swap_space_gb=0.0)
configure_process(config)
torch.ones(1 << 22).mul(2).sum()  # a parallel region: torch's worker threads exist now
tids = [int(t) for t in os.listdir("/proc/self/task")]
print(sorted({int(open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()[16]) for t in tids}), len(tids))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    nices, threads = out.stdout.rsplit(" ", 1)
    assert nices == "[7]" and int(threads) >= 2
