"""The placement search: which parallelism for prefill and for decode, and how many of each,
maximise goodput per device under the SLOs (DistServe, Section 4).

- Algorithm 1 (fast links between nodes): prefill and decode configurations are chosen
  independently (each simulated alone: TTFT for prefill, TPOT for decode), then replicated
  until both sustain the requested rate.
- Algorithm 2 (slow links between nodes): a prefill and a decode instance share a node so
  the KV moves over the node's own links; each pair that fits a node is simulated as a
  whole, and pairs are replicated.

Every candidate's goodput is the highest rate whose simulated attainment reaches the target
(bisection, `bench.metrics.search_goodput`); candidates that do not fit in memory are never
simulated. Candidates run in parallel on all cores.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from distserve.bench.arrivals import arrival_times
from distserve.bench.metrics import RequestRecord, find_goodput, slo_attainment
from distserve.config import DEFAULT_CHUNK_SIZE, DeploymentConfig, Mode, PhaseConfig, Role
from distserve.planner.calibration import CalibratedLatencyModel, Calibration
from distserve.planner.deployment import PhaseModel
from distserve.planner.hardware import Cluster, ModelShape, fits_in_memory, kv_capacity_tokens
from distserve.planner.latency_model import (
    AnalyticalLatencyModel,
    FittedLatencyModel,
    LatencyModel,
    kv_transfer_time,
    published_kv_capacity,
    published_model,
    published_tp_degrees,
)
from distserve.planner.simulator import ClusterSpec, Cutoff, InstanceSpec, simulate

INSTANT = FittedLatencyModel((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))


@dataclass(frozen=True)
class Parallelism:
    tp: int
    pp: int

    @property
    def devices(self) -> int:
        return self.tp * self.pp


@dataclass
class PlanProblem:
    """Everything a candidate's simulation needs (picklable, for the worker processes)."""

    shape: ModelShape
    cluster: Cluster
    lengths: list[tuple[int, int]]
    ttft: float
    tpot: float
    target: float = 0.9
    criterion: str = "joint"  # joint: TTFT and TPOT both met; separate: each met by the target share
    latency: str = "analytical"  # analytical (calibrated) | roofline | published | published-vllm | fitted:PATH
    calibration: str | None = None  # the analytical model's calibration (default: the package's, on A100 profiles)
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    chunk_size: int = DEFAULT_CHUNK_SIZE  # chunked prefill's token budget per step
    iterations: int = 6  # bisection steps after the doubling search
    duration: float = 60.0  # seconds of arrivals simulated per rate (steady state, not a burst)
    min_requests: int = 200
    max_requests: int = 2000
    seed: int = 0

    def latency_model(self, par: Parallelism) -> LatencyModel:
        if self.latency.startswith("published"):
            engine = "vllm" if self.latency == "published-vllm" else "distserve"
            return published_model(self.shape.name, par.tp, par.pp, engine)
        if self.latency.startswith("fitted:"):
            model = FittedLatencyModel.load(self.latency.split(":", 1)[1])
            if (par.tp, par.pp) != (1, 1):
                raise ValueError("a fitted profile describes one TP/PP layout; plan with --latency analytical for others.")
            return model
        if self.latency == "roofline":
            return AnalyticalLatencyModel(self.shape, self.cluster.device, par.tp, par.pp)
        if self.latency != "analytical":
            raise ValueError(f"--latency {self.latency!r}: use analytical, roofline, published or fitted:PROFILE.json.")
        calibration = Calibration.load(self.calibration) if self.calibration else Calibration.load()
        return CalibratedLatencyModel(self.shape, self.cluster.device, calibration, par.tp, par.pp)

    def kv_capacity(self, par: Parallelism) -> int:
        if self.latency.startswith("published"):
            measured = published_kv_capacity(self.shape.name, par.tp, par.pp)
            if measured is not None:
                return measured
        return kv_capacity_tokens(self.shape, self.cluster.device, par.tp, par.pp)

    def candidates(self, max_devices: int) -> list[Parallelism]:
        """TP dividing the heads, PP dividing the layers, fitting the memory."""
        tps = [t for t in (1, 2, 3, 4, 6, 8) if self.shape.num_heads % t == 0 and t <= self.cluster.devices_per_node]
        if self.latency.startswith("published"):
            engine = "vllm" if self.latency == "published-vllm" else "distserve"
            tps = [t for t in tps if t in published_tp_degrees(self.shape.name, engine)]
        if self.latency.startswith("fitted:"):
            tps = [1]
        pps = [p for p in range(1, self.shape.num_layers + 1) if self.shape.num_layers % p == 0]
        longest = max(p + o for p, o in self.lengths)
        out = []
        for tp in tps:
            for pp in pps:
                par = Parallelism(tp, pp)
                fits = fits_in_memory(self.shape, self.cluster.device, tp, pp, longest) and self.kv_capacity(par) >= longest
                if par.devices <= max_devices and fits:
                    out.append(par)
                    if self.latency.startswith("fitted:"):
                        return out
        return out

    def attainment(self, records: list[RequestRecord], part: str = "both") -> float:
        a = slo_attainment(records, self.ttft, self.tpot)
        if part == "ttft":
            return a.ttft
        if part == "tpot":
            return a.tpot
        return a.both if self.criterion == "joint" else min(a.ttft, a.tpot)

    def run(self, spec: ClusterSpec, rate: float, prefill_only: bool = False, part: str | None = None) -> list[RequestRecord]:
        """`duration` seconds of Poisson arrivals at `rate` (within the request bounds),
        lengths drawn in turn from the workload. `prefill_only` stops every request at its
        first token (TTFT of a prefill instance alone). With `part`, the simulation stops
        as soon as the attainment of that part can no longer reach the target."""
        n = min(self.max_requests, max(self.min_requests, math.ceil(rate * self.duration)))
        lengths = [self.lengths[i % len(self.lengths)] for i in range(n)]
        if prefill_only:
            lengths = [(p, 1) for p, _ in lengths]
        cutoff = None
        if part is not None:
            kind = "separate" if part == "both" and self.criterion == "separate" else part
            cutoff = Cutoff(self.ttft, self.tpot, math.floor(n * (1 - self.target) + 1e-9), kind)
        return simulate(spec, arrival_times(n, rate, seed=self.seed), lengths, cutoff)

    def goodput(self, spec: ClusterSpec, part: str = "both") -> float:
        """Highest simulated rate (req/s) whose attainment reaches the target."""
        prefill_only = part == "ttft"
        return find_goodput(lambda rate: self.attainment(self.run(spec, rate, prefill_only, part), part), self.target, 1.0,
                            self.iterations)

    def instance(
        self, role: Role, par: Parallelism, latency: LatencyModel | None = None, capacity: int | None = None, chunked: bool = False
    ) -> InstanceSpec:
        return InstanceSpec(
            role,
            latency or self.latency_model(par),
            capacity if capacity is not None else self.kv_capacity(par),
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.chunk_size if chunked else self.max_num_batched_tokens,
            chunked=chunked,
        )

    def transfer(self, link: str) -> Callable[[int], float]:
        shape, device = self.shape, self.cluster.device
        return lambda tokens: kv_transfer_time(shape, device, tokens, link)

    def phase_model(self, scale: float = 1.0) -> PhaseModel:
        """Each phase's latency model and KV capacity from its parallelism (for
        `simulated_cluster`), every step `scale` times as long."""

        def model(role: Role, cfg: PhaseConfig) -> tuple[LatencyModel, int]:
            par = Parallelism(cfg.tensor_parallel_size, cfg.pipeline_parallel_size)
            latency = self.latency_model(par)
            if scale != 1.0:
                if not isinstance(latency, FittedLatencyModel):
                    raise ValueError("a latency scale needs a fitted or published latency model (--latency fitted:... or published).")
                latency = latency.scaled(scale)
            return latency, self.kv_capacity(par)

        return model


@dataclass
class Candidate:
    kind: str  # prefill | decode | pair | colocated
    prefill: Parallelism | None = None
    decode: Parallelism | None = None
    goodput: float = 0.0  # req/s of one instance (or pair)
    devices: int = 0

    @property
    def per_device(self) -> float:
        return self.goodput / self.devices if self.devices else 0.0


def _evaluate(args: tuple[PlanProblem, Candidate]) -> Candidate:
    problem, cand = args
    big = 1 << 40
    if cand.kind == "prefill":  # a prefill instance alone: decode costs nothing
        spec = ClusterSpec([problem.instance(Role.PREFILL, cand.prefill), problem.instance(Role.DECODE, Parallelism(1, 1), INSTANT, big)])
        cand.goodput = problem.goodput(spec, "ttft")
    elif cand.kind == "decode":  # a decode instance alone: prompts arrive prefilled, over the slowest link there is
        link = "network" if problem.cluster.num_nodes > 1 else "node"
        spec = ClusterSpec([problem.instance(Role.PREFILL, Parallelism(1, 1), INSTANT, big), problem.instance(Role.DECODE, cand.decode)],
                           problem.transfer(link))
        cand.goodput = problem.goodput(spec, "tpot")
    elif cand.kind == "pair":
        spec = ClusterSpec([problem.instance(Role.PREFILL, cand.prefill), problem.instance(Role.DECODE, cand.decode)],
            problem.transfer("node"))
        cand.goodput = problem.goodput(spec)
    else:  # colocated or chunked: one instance does both phases
        spec = ClusterSpec([problem.instance(Role.COLOCATED, cand.prefill, chunked=cand.kind == "chunked")])
        cand.goodput = problem.goodput(spec)
    return cand


def evaluate_all(problem: PlanProblem, candidates: list[Candidate], workers: int | None = None, progress: bool = True) -> list[Candidate]:
    workers = workers or os.cpu_count() or 1
    jobs = [(problem, c) for c in candidates]
    bar = tqdm(total=len(jobs), desc="simulating candidates", unit="cfg", disable=not progress)
    results: list[Candidate] = []
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            results.append(_evaluate(job))
            bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(_evaluate, jobs):
                results.append(result)
                bar.update(1)
    bar.close()
    return results


@dataclass
class Placement:
    algorithm: int
    prefill: Parallelism
    decode: Parallelism
    num_prefill: int
    num_decode: int
    goodput: float  # req/s of the whole placement
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def devices(self) -> int:
        return self.num_prefill * self.prefill.devices + self.num_decode * self.decode.devices

    @property
    def per_device_goodput(self) -> float:
        return self.goodput / self.devices

    def cluster_spec(self, problem: PlanProblem) -> ClusterSpec:
        """The placement as the simulator runs it."""
        return ClusterSpec(
            [problem.instance(Role.PREFILL, self.prefill)] * self.num_prefill
            + [problem.instance(Role.DECODE, self.decode)] * self.num_decode,
            problem.transfer("node" if self.algorithm == 2 else "network"),
        )

    def deployment(self, model: str | None, max_num_batched_tokens: int, max_num_seqs: int) -> DeploymentConfig:
        def phase(n: int, par: Parallelism) -> PhaseConfig:
            return PhaseConfig(num_instances=n, tensor_parallel_size=par.tp, pipeline_parallel_size=par.pp,
                               max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)

        # Algorithm 2 places each prefill instance with its decode instance on one node
        return DeploymentConfig(model=model, mode=Mode.DISAGGREGATED, prefill=phase(self.num_prefill, self.prefill),
                                decode=phase(self.num_decode, self.decode), pair_placement=self.algorithm == 2)


def algorithm1(problem: PlanProblem, rate: float, progress: bool = True) -> Placement:
    """High node affinity: best prefill and best decode configurations, each replicated."""
    total = problem.cluster.num_devices
    cands = [Candidate("prefill", prefill=p, devices=p.devices) for p in problem.candidates(total)]
    cands += [Candidate("decode", decode=d, devices=d.devices) for d in problem.candidates(total)]
    if not cands:
        raise ValueError("no parallelism fits this model in the cluster's memory.")
    done = evaluate_all(problem, cands, progress=progress)

    def cheapest(kind: str) -> Candidate:
        """Fewest devices to sustain `rate` once replicated; then the best per device."""
        ok = [c for c in done if c.kind == kind and c.goodput > 0]
        if not ok:
            raise ValueError(f"no {kind} configuration meets the SLOs even at the lowest rate; loosen the SLOs.")
        return min(ok, key=lambda c: (math.ceil(rate / c.goodput) * c.devices, -c.per_device))

    best_p, best_d = cheapest("prefill"), cheapest("decode")
    n_p = max(1, math.ceil(rate / best_p.goodput))
    n_d = max(1, math.ceil(rate / best_d.goodput))
    placement = Placement(1, best_p.prefill, best_d.decode, n_p, n_d,
                          min(n_p * best_p.goodput, n_d * best_d.goodput), done)
    if placement.devices > total:
        raise ValueError(f"rate {rate} needs {placement.devices} devices; the cluster has {total}.")
    return placement


def algorithm2(problem: PlanProblem, rate: float, progress: bool = True) -> Placement:
    """Low node affinity: a prefill and a decode instance share a node; pairs replicated."""
    per_node = problem.cluster.devices_per_node
    singles = problem.candidates(per_node)
    cands = [Candidate("pair", prefill=p, decode=d, devices=p.devices + d.devices)
             for p in singles for d in singles if p.devices + d.devices <= per_node]
    if not cands:
        raise ValueError("no prefill + decode pair fits in one node's memory.")
    done = evaluate_all(problem, cands, progress=progress)
    ok = [c for c in done if c.goodput > 0]
    if not ok:
        raise ValueError("no configuration meets the SLOs even at the lowest rate; loosen the SLOs.")
    best = min(ok, key=lambda c: (math.ceil(rate / c.goodput) * c.devices, -c.per_device))
    pairs_per_node = per_node // best.devices
    n = max(1, math.ceil(rate / best.goodput))
    if n > pairs_per_node * problem.cluster.num_nodes:
        raise ValueError(f"rate {rate} needs {n} prefill/decode pairs; the cluster holds {pairs_per_node * problem.cluster.num_nodes}.")
    return Placement(2, best.prefill, best.decode, n, n, n * best.goodput, done)


def best_colocated(problem: PlanProblem, progress: bool = True, chunked: bool = False) -> Candidate:
    """The best per-device configuration of one instance doing both phases: continuous
    batching with whole prompts riding along the decodes, or (`chunked`) chunked prefill."""
    kind = "chunked" if chunked else "colocated"
    cands = [Candidate(kind, prefill=p, devices=p.devices) for p in problem.candidates(problem.cluster.devices_per_node)]
    done = evaluate_all(problem, cands, progress=progress)
    return max(done, key=lambda c: (c.per_device, -c.devices))


@dataclass
class ModePlan:
    """One mode's best placement for a rate: how many of its unit (a disaggregated placement's
    pairs or replicas, one colocated or chunked instance) and what they sustain."""

    mode: Mode
    goodput: float  # req/s of the whole placement
    devices: int
    per_device_goodput: float
    placement: Placement | None = None  # disaggregated
    instance: Candidate | None = None  # colocated, chunked
    num_instances: int = 0

    def describe(self) -> str:
        if self.placement is not None:
            p = self.placement
            return (f"prefill TP{p.prefill.tp}PP{p.prefill.pp} x{p.num_prefill} + decode TP{p.decode.tp}PP{p.decode.pp} "
                    f"x{p.num_decode} (algorithm {p.algorithm})")
        assert self.instance is not None
        return f"TP{self.instance.prefill.tp}PP{self.instance.prefill.pp} x{self.num_instances}"

    def deployment(self, model: str | None, problem: PlanProblem) -> DeploymentConfig:
        if self.placement is not None:
            return self.placement.deployment(model, problem.max_num_batched_tokens, problem.max_num_seqs)
        assert self.instance is not None
        par = self.instance.prefill
        budget = problem.chunk_size if self.mode is Mode.CHUNKED else problem.max_num_batched_tokens
        phase = PhaseConfig(num_instances=self.num_instances, tensor_parallel_size=par.tp, pipeline_parallel_size=par.pp,
                            max_num_batched_tokens=budget, max_num_seqs=problem.max_num_seqs)
        return DeploymentConfig(model=model, mode=self.mode, colocated=phase)

    def cluster_spec(self, problem: PlanProblem) -> ClusterSpec:
        if self.placement is not None:
            return self.placement.cluster_spec(problem)
        assert self.instance is not None
        return ClusterSpec([problem.instance(Role.COLOCATED, self.instance.prefill, chunked=self.mode is Mode.CHUNKED)]
                           * self.num_instances)


def replicated(mode: Mode, candidate: Candidate, rate: float, problem: PlanProblem) -> ModePlan | None:
    """Enough copies of one colocated (or chunked) instance for `rate`, if the cluster has
    the devices (None if it has not, or the instance meets the SLOs at no rate)."""
    if candidate.goodput <= 0:
        return None
    n = max(1, math.ceil(rate / candidate.goodput))
    if n * candidate.devices > problem.cluster.num_devices:
        return None
    return ModePlan(mode, n * candidate.goodput, n * candidate.devices, candidate.per_device, instance=candidate, num_instances=n)


def choose_mode(problem: PlanProblem, rate: float, algorithms: Sequence[int] = (1, 2), progress: bool = True) -> list[ModePlan]:
    """Each mode's best placement for `rate` (disaggregated: the better of the algorithms),
    best per device first; the modes that cannot sustain it on the cluster are left out."""
    plans: list[ModePlan] = []
    for algorithm in algorithms:
        try:
            placement = (algorithm1 if algorithm == 1 else algorithm2)(problem, rate, progress)
        except ValueError:
            continue
        plans.append(ModePlan(Mode.DISAGGREGATED, placement.goodput, placement.devices, placement.per_device_goodput, placement))
    disaggregated = max(plans, key=lambda p: p.per_device_goodput, default=None)
    plans = [disaggregated] if disaggregated else []
    for mode in (Mode.COLOCATED, Mode.CHUNKED):
        plan = replicated(mode, best_colocated(problem, progress, chunked=mode is Mode.CHUNKED), rate, problem)
        if plan is not None:
            plans.append(plan)
    return sorted(plans, key=lambda p: -p.per_device_goodput)
