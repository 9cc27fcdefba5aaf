"""A deployment (as a placement file describes it) as the simulator's cluster: each phase's
instances with the engine's own settings, a latency model and a KV capacity."""

from __future__ import annotations

from collections.abc import Callable

from distserve.config import GIB, DeploymentConfig, Mode, PhaseConfig, Role, batched_token_budget, default_kv_cache_gb
from distserve.engine.router import RoutingPolicy
from distserve.planner.latency_model import FittedLatencyModel, LatencyModel
from distserve.planner.simulator import ClusterSpec, InstanceSpec

# a phase's step times and, unless the deployment sets one, its KV capacity in tokens
PhaseModel = Callable[[Role, PhaseConfig], tuple[LatencyModel, int]]


def simulated_cluster(
    deployment: DeploymentConfig, phase_model: PhaseModel, kv_bytes_per_token: int, transfer_time: Callable[[int], float]
) -> ClusterSpec:
    """Every instance of the deployment, with its phase's latency model; the KV capacity is
    what the deployment sets (blocks or GiB), else the phase model's."""
    instances = []
    for role in deployment.phases():
        cfg = deployment.phase(role)
        latency, default_capacity = phase_model(role, cfg)
        if cfg.num_kv_blocks:
            capacity = cfg.num_kv_blocks * deployment.block_size
        elif cfg.kv_cache_gb:
            capacity = int(cfg.kv_cache_gb * GIB // kv_bytes_per_token)
        else:
            capacity = default_capacity
        for _ in range(cfg.num_instances):
            instances.append(InstanceSpec(
                role, latency, capacity, cfg.max_num_seqs, batched_token_budget(cfg, deployment.mode), cfg.policy,
                deployment.mode is Mode.CHUNKED, deployment.block_size, deployment.enable_prefix_caching,
            ))
    return ClusterSpec(instances, transfer_time, routing_policy=RoutingPolicy(deployment.routing_policy),
                       conditional_prefill_tokens=deployment.conditional_prefill_tokens)


def fitted_phase_model(files: dict[str, str], kv_bytes_per_token: int, scale: float = 1.0) -> PhaseModel:
    """Latency models fitted to this engine (`distserve profile`), one file per phase or one
    for `all`, on this engine's default CPU KV budget."""

    def model(role: Role, cfg: PhaseConfig) -> tuple[LatencyModel, int]:
        path = files.get(str(role), files.get("all"))
        if path is None:
            raise ValueError(f"no fitted profile for the {role} phase; give {role}=PATH or all=PATH.")
        latency = FittedLatencyModel.load(path)
        return (latency.scaled(scale) if scale != 1.0 else latency), int(default_kv_cache_gb(role) * GIB // kv_bytes_per_token)

    return model
