"""The `ray` backend: each instance is a set of Ray actors in a placement group.

Worker 0 of an instance (its driver) runs the same instance loop as a local process, in a
thread of its actor: the controller's messages arrive through an actor method, its events
leave through one Ray queue shared by every instance. The other workers serve the driver's
steps. Workers meet through torch.distributed at the driver's node address.

With no address, distserve starts a local Ray cluster from this machine's cores (and GPUs)
and stops it at shutdown; with `ray_address` it joins that cluster and removes only its own
actors and placement groups. A bundle is one worker: {"CPU": cores} on CPU, {"GPU": 1} on
GPU. Each instance's bundles are packed on one node; with `pair_placement`, prefill instance
i and decode instance i share one placement group (one node), as the planner's Algorithm 2
places them; otherwise each instance goes (as a hint to Ray) to the node with the most room
left, so instances spread over the nodes.

A Ray node is a machine: a decode worker pulls KV through shared memory from prefill workers
of its own node, and over the KV transfer group (torch.distributed) from other nodes.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

from distserve.config import InstanceConfig, ModelConfig, Role, available_cores
from distserve.distributed.group import GroupSpec, free_port
from distserve.engine.backends.base import Backend, InstanceDied
from distserve.engine.instance_loop import OPENMP_SPIN, group_spec, instance_main, worker_main
from distserve.engine.messages import InstanceEvent, InstanceMessage, InstanceReady, Shutdown

# Ray routes its own traffic over the machine's first interface unless told; this keeps a
# local cluster on 127.0.0.1 (see docs/multi_node.md)
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class InstanceDriver:
    """Ray actor: worker 0 of an instance, hosting its scheduler."""

    def __init__(self) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.ended = threading.Event()

    def address(self) -> tuple[str, int]:
        import ray

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def run(self, model_config: ModelConfig, config: InstanceConfig, outbox: Any, group: GroupSpec | None) -> None:
        """Start the instance loop in a thread (returns at once)."""
        threading.Thread(target=self._main, args=(model_config, config, outbox, group), daemon=True).start()

    def _main(self, model_config: ModelConfig, config: InstanceConfig, outbox: Any, group: GroupSpec | None) -> None:
        try:
            self._serve(model_config, config, outbox, group)
        finally:
            self.ended.set()

    def _serve(self, model_config: ModelConfig, config: InstanceConfig, outbox: Any, group: GroupSpec | None) -> None:
        _where_am_i()
        # Ray ends the actor when the controller's job ends: no parent to watch
        instance_main(model_config, config, self.inbox.get, outbox.put, lambda: True, group)

    def send(self, messages: list[InstanceMessage]) -> None:
        self.inbox.put(messages)

    def wait(self, timeout: float) -> bool:
        """Whether the instance loop has ended (after a Shutdown, or an error)."""
        return self.ended.wait(timeout)

    def ended_ref(self) -> bool:
        """Returns when the instance loop ends: a reference the backend polls for liveness
        (it fails with the actor, if the actor dies)."""
        self.ended.wait()
        return True


class InstanceWorker:
    """Ray actor: a worker other than the driver; `run` serves the driver's steps until stop."""

    def run(self, model_config: ModelConfig, config: InstanceConfig, group: GroupSpec, rank: int) -> None:
        _where_am_i()
        worker_main(model_config, config, group, rank)


class RayBackend(Backend):
    def __init__(self, address: str | None = None, pair_placement: bool = False) -> None:
        if address is None or address.split(":")[0] in ("127.0.0.1", "localhost"):
            # read by Ray when it is imported: set before the first import
            os.environ.update(LOCAL_RAY_ENV)
        import ray

        self.ray = ray
        self._address = address
        self._started_cluster = False
        self._ray_environ: dict[str, str | None] = {}  # what ray.init set, and what it replaced
        self._outbox: Any = None
        self._drivers: dict[str, Any] = {}
        self._workers: dict[str, list[Any]] = {}
        self._runs: dict[str, list[Any]] = {}  # refs that end only when an actor stops (driver's first)
        self._groups: list[Any] = []
        self._pids: dict[str, int] = {}
        self._stopping = False
        self._pair_placement = pair_placement
        self._model_config: ModelConfig | None = None
        self._where: dict[str, tuple[Any, int]] = {}  # instance -> (placement group, first bundle)

    def advertise_host(self) -> str:
        # 127.0.0.1 for a local cluster (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), else this node's address
        return self.ray.util.get_node_ip_address()

    # -- start ---------------------------------------------------------------------------------
    def _bundle(self, config: InstanceConfig) -> dict[str, float]:
        if config.device.startswith("cuda"):
            return {"GPU": 1, "CPU": 1}
        return {"CPU": float(config.num_threads)}

    def _placement_groups(self, instances: list[InstanceConfig], pair: bool) -> dict[str, tuple[Any, int]]:
        """(placement group, first bundle index) of each instance."""
        from ray.util.placement_group import placement_group

        sets: list[list[InstanceConfig]] = []
        if pair:
            prefill = [c for c in instances if c.role is Role.PREFILL]
            decode = [c for c in instances if c.role is Role.DECODE]
            for i in range(max(len(prefill), len(decode))):
                sets.append(prefill[i : i + 1] + decode[i : i + 1])
        else:
            sets = [[c] for c in instances]
        where: dict[str, tuple[Any, int]] = {}
        free = {n["NodeID"]: dict(n["Resources"]) for n in self.ray.nodes() if n["Alive"]}
        for members in sets:
            bundles = [self._bundle(c) for c in members for _ in range(c.num_workers)]
            # each set on one node; the sets spread: each goes, as a hint, to the node with the
            # most of what it needs left
            need = {key: sum(b.get(key, 0) for b in bundles) for key in ("CPU", "GPU")}
            fits = [n for n, r in free.items() if all(r.get(k, 0) >= v for k, v in need.items())]
            target = max(fits, key=lambda n: (free[n].get("GPU", 0), free[n].get("CPU", 0)), default=None)
            if target is not None:
                for key, value in need.items():
                    free[target][key] = free[target].get(key, 0) - value
            group = placement_group(bundles, strategy="STRICT_PACK", _soft_target_node_id=target)
            self._groups.append(group)
            index = 0
            for c in members:
                where[c.name] = (group, index)
                index += c.num_workers
        for group in self._groups:
            self.ray.get(group.ready(), timeout=300)
        return where

    def _actor(self, cls: type, config: InstanceConfig, group: Any, bundle: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        resources = self._bundle(config)
        remote = self.ray.remote(
            num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0), max_concurrency=4,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle),
        )(cls)
        return remote.remote()

    def _connect(self, instances: list[InstanceConfig]) -> None:
        from ray.util.queue import Queue

        ray = self.ray
        before = dict(os.environ)  # ray.init sets variables; shutdown undoes those, and only those
        if not ray.is_initialized():
            env = {"GOMP_SPINCOUNT": OPENMP_SPIN}
            if self._address is None:
                import torch

                # a local cluster of this machine's cores, or of the workers asked for when
                # there are more of them (they share the cores, as local processes would)
                cpus = max(len(available_cores()), sum(self._bundle(c).get("CPU", 0) * c.num_workers for c in instances))
                ray.init(num_cpus=int(cpus), num_gpus=torch.cuda.device_count(), include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False, runtime_env={"env_vars": env})
                self._started_cluster = True
            else:
                ray.init(address=self._address, log_to_driver=False, runtime_env={"env_vars": env})
        self._ray_environ = {k: before.get(k) for k, v in os.environ.items() if before.get(k) != v}
        self._outbox = Queue()

    def start(self, model_config: ModelConfig, instances: list[InstanceConfig], timeout: float) -> dict[str, InstanceReady]:
        self._connect(instances)
        self._model_config = model_config
        self._where = self._placement_groups(instances, self._pair_placement)
        for config in instances:
            self._start_instance(config)
        ready = self.wait_ready(list(self._drivers), timeout)
        self._pids = {name: r.pid for name, r in ready.items()}
        return ready

    def _start_instance(self, config: InstanceConfig) -> None:
        group, first = self._where[config.name]
        # Ray gives each actor its GPU as cuda:0; cores are Ray's to assign
        worker_config = [_for_ray(config.for_worker(rank)) for rank in range(config.num_workers)]
        driver = self._actor(InstanceDriver, worker_config[0], group, first)
        self._drivers[config.name] = driver
        host, port = self.ray.get(driver.address.remote())
        spec = group_spec(config, f"tcp://{host}:{port}")
        driver.run.remote(self._model_config, worker_config[0], self._outbox, spec)
        self._runs[config.name] = [driver.ended_ref.remote()]
        self._workers[config.name] = []
        for rank in range(1, config.num_workers):
            worker = self._actor(InstanceWorker, worker_config[rank], group, first + rank)
            self._workers[config.name].append(worker)
            self._runs[config.name].append(worker.run.remote(self._model_config, worker_config[rank], spec, rank))

    def restart(self, config: InstanceConfig) -> None:
        """Its actors killed, new ones in the same bundles of its placement group."""
        for actor in [self._drivers.pop(config.name), *self._workers.pop(config.name, [])]:
            self.ray.kill(actor, no_restart=True)
        self._start_instance(config)

    # -- messages ------------------------------------------------------------------------------
    def send(self, instance: str, messages: list[InstanceMessage]) -> None:
        self._drivers[instance].send.remote(messages)

    def recv(self, timeout: float) -> list[InstanceEvent]:
        from ray.util.queue import Empty

        events: list[InstanceEvent] = []
        try:
            events.extend(self._outbox.get(block=timeout > 0, timeout=timeout if timeout > 0 else None))
            while True:
                events.extend(self._outbox.get_nowait())
        except Empty:
            pass
        return events

    def dead(self) -> list[InstanceDied]:
        """Instances one of whose actors ended or failed: the driver's loop ending, or a
        worker's `run` returning, is a failure too. Polls references; never blocks."""
        if self._stopping:
            return []
        dead = []
        for name, refs in self._runs.items():
            ended, _ = self.ray.wait(refs, num_returns=1, timeout=0)
            if ended:
                dead.append(InstanceDied(name, self._pids.get(name, -1), None))
        return dead

    # -- stop ----------------------------------------------------------------------------------
    def shutdown(self, timeout: float = 10.0) -> None:
        if self._outbox is None:
            if self._started_cluster:
                self.ray.shutdown()
                self._restore_environ()
            return
        self._stopping = True
        from ray.util.placement_group import remove_placement_group

        for driver in self._drivers.values():
            try:
                driver.send.remote(Shutdown())
            except self.ray.exceptions.RayError:
                pass
        deadline = time.monotonic() + timeout
        for name, driver in self._drivers.items():
            try:
                self.ray.get(driver.wait.remote(max(0.1, deadline - time.monotonic())), timeout=timeout + 5)
                self.ray.wait(self._runs[name][1:], num_returns=len(self._runs[name]) - 1,
                              timeout=max(0.1, deadline - time.monotonic()))
            except self.ray.exceptions.RayError:
                pass
        for actor in [*self._drivers.values(), *(w for ws in self._workers.values() for w in ws)]:
            self.ray.kill(actor)
        for group in self._groups:
            remove_placement_group(group)
        self.ray.kill(self._outbox.actor)
        self._outbox = None
        self._drivers.clear()
        self._workers.clear()
        self._runs.clear()
        self._groups.clear()
        # stops the cluster this backend started; only disconnects from one it joined
        self.ray.shutdown()
        self._restore_environ()

    def _restore_environ(self) -> None:
        """Undo what ray.init set in this process's environment (and nothing else)."""
        for key, value in self._ray_environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._ray_environ = {}


def _where_am_i() -> None:
    """A worker's address for its peers, and its machine: its Ray node (workers of one node
    share memory; the KV between nodes goes over the network)."""
    import ray

    os.environ["DISTSERVE_HOST"] = ray.util.get_node_ip_address()
    os.environ["DISTSERVE_MACHINE"] = ray.get_runtime_context().get_node_id()


def _for_ray(config: InstanceConfig) -> InstanceConfig:
    import dataclasses

    device = "cuda:0" if config.device.startswith("cuda") else config.device
    return dataclasses.replace(config, cpu_cores=None, device=device, gpu_ids=None)
