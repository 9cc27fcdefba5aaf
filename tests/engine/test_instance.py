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
