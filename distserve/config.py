"""What a deployment is: the model, the mode, and each phase's instances and their settings.

`DeploymentConfig` is the one description shared by `LLM(...)`, `distserve serve` flags, and
the placement file the planner writes (`to_dict` / `from_dict` round-trip through JSON).
`resolve_instances` turns it into one `InstanceConfig` per instance, with CPU cores assigned.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig


class NamedEnum(str, enum.Enum):
    """An enum whose members are their names as users write them (in flags, JSON, messages)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: object, what: str) -> NamedEnum:
        """The member named `value`, or a ValueError that lists the names."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{what} must be one of {[m.value for m in cls]}, got {value!r}.") from None


class Mode(NamedEnum):
    """How a deployment runs prefill and decode."""

    DISAGGREGATED = "disaggregated"  # prefill instances and decode instances
    COLOCATED = "colocated"  # continuous batching: decodes and whole prompts in one step
    CHUNKED = "chunked"  # chunked prefill: prompt chunks and decodes share each step

    @property
    def phases(self) -> tuple[Role, ...]:
        """The roles of the instances this mode runs."""
        return (Role.PREFILL, Role.DECODE) if self is Mode.DISAGGREGATED else (Role.COLOCATED,)


class Role(NamedEnum):
    """What an instance does (also the name of its phase's settings in a deployment)."""

    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"

    @property
    def takes_prompts(self) -> bool:
        """Whether new requests are routed here (not to a decode instance)."""
        return self is not Role.DECODE


class Policy(NamedEnum):
    """The order an instance admits waiting prompts in."""

    FCFS = "fcfs"  # first come, first served
    SJF = "sjf"  # shortest prompt first (prefill)


class PreemptionMode(NamedEnum):
    RECOMPUTE = "recompute"  # free the blocks; prefill prompt + output again later
    SWAP = "swap"  # copy the blocks to swap space and back


# one default for LLM, AsyncLLM and `distserve serve`: chunked prefill, as vLLM schedules. With
# vLLM's own `bench serve` client at its knee and 1.5x it, it served 1.02x / 1.33x colocated's
# goodput at a lower p99 TPOT, and both at least vLLM's (benchmarks/online_serving.py)
DEFAULT_MODE = Mode.CHUNKED
DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
GIB = 1 << 30
KV_TRANSPORTS = ("auto", "shm", "torch")
QUANTIZATIONS = ("auto", "none", "int8", "int4")
DEFAULT_CHUNK_SIZE = 512
# Prompt tokens batched into one prefill step (a longer prompt runs alone). Batches past a
# few thousand tokens only make the matmuls and activations slower on CPU.
DEFAULT_BATCHED_TOKENS = 2048


def default_kv_cache_gb(role: Role) -> float:
    """An instance's KV cache on CPU when `kv_cache_gb` is not given (the engine takes less
    where max_num_seqs sequences of max_model_len tokens never fill it): 4 GiB, as vLLM's CPU
    build took by default; 1 GiB for a prefill instance, whose cache holds prompts only until
    their decode instance pulls them, and is shared memory that the decode side maps whole."""
    return 1.0 if role is Role.PREFILL else 4.0


@dataclass
class PhaseConfig:
    """Settings of every instance of one phase (prefill, decode, or colocated).

    `max_num_batched_tokens` bounds the tokens of one step (a single longer prompt still
    runs, alone); in chunked mode it is the chunk budget shared by prefill chunks and decodes. `policy` is `fcfs`, or `sjf`
    (shortest prompt first) for prefill.
    """

    num_instances: int = 1
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    policy: Policy = Policy.FCFS
    kv_cache_gb: float | None = None
    num_kv_blocks: int | None = None
    preemption_mode: PreemptionMode | None = None
    num_threads: int | None = None
    cpu_cores: list[int] | None = None
    # niceness of the instances' processes (0-19): where phases share cores, the higher yields
    nice: int | None = None
    # weights: None (the deployment's `quantization`), auto, none, int8 or int4
    quantization: str | None = None

    def __post_init__(self) -> None:
        self._parse_enums("phase")

    def _parse_enums(self, phase: str) -> None:
        self.policy = Policy.parse(self.policy, f"{phase}.policy")
        if self.preemption_mode is not None:
            self.preemption_mode = PreemptionMode.parse(self.preemption_mode, f"{phase}.preemption_mode")

    def validate(self, phase: str) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{phase}.{name} must be a positive integer, got {value!r}.")

        for name in (
            "num_instances",
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "num_kv_blocks",
            "num_threads",
        ):
            positive(name)
        self._parse_enums(phase)
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"{phase}.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}.")
        if self.policy is Policy.SJF and phase == Role.DECODE:
            raise ValueError("decode instances schedule FCFS; 'sjf' is a prefill policy.")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError(f"{phase}.kv_cache_gb must be > 0, got {self.kv_cache_gb}.")
        if self.nice is not None and (not isinstance(self.nice, int) or not 0 <= self.nice <= 19):
            raise ValueError(f"{phase}.nice must be an integer from 0 (the default) to 19, got {self.nice!r}; "
                             "to favour a phase, raise the other's.")
        if self.cpu_cores is not None:
            missing = sorted(set(self.cpu_cores) - set(available_cores()))
            if not self.cpu_cores or missing:
                raise ValueError(f"{phase}.cpu_cores must name cores this process may run on "
                                 f"({','.join(map(str, available_cores()))}), got {self.cpu_cores!r}.")


@dataclass
class DeploymentConfig:
    """A whole deployment: what `distserve serve --config FILE` reads and the planner writes."""

    model: str | None = None
    mode: Mode = DEFAULT_MODE
    prefill: PhaseConfig = field(default_factory=PhaseConfig)
    decode: PhaseConfig = field(default_factory=PhaseConfig)
    colocated: PhaseConfig = field(default_factory=PhaseConfig)
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    seed: int = 0
    backend: str = "local"
    ray_address: str | None = None
    # Ray: prefill instance i and decode instance i on one node (low node affinity, the
    # planner's Algorithm 2); otherwise each instance is packed alone and instances spread
    pair_placement: bool = False
    # how decode workers pull KV: auto (shared memory on one machine, torch.distributed across
    # machines), shm, or torch (torch.distributed point to point even on one machine)
    kv_transport: str = "auto"
    swap_space_gb: float = 1.0
    # a folder: each instance appends one JSON line per step to <folder>/<instance>.jsonl
    # (when it ran, how long, the prompt chunks and decode contexts it computed)
    step_log: str | None = None
    # an instance that dies is started again, up to `max_restarts` times in any
    # `restart_window` seconds; past that it stays down and the engine reports unhealthy
    max_restarts: int = 3
    restart_window: float = 600.0
    # automatic prefix caching: requests reuse the KV of cached blocks with the same tokens
    enable_prefix_caching: bool = True
    # how requests are spread over instances (engine/router.py): cache-aware or least-loaded
    routing_policy: str = "cache-aware"
    # disaggregated, cache-aware: a prompt a decode instance caches all but this many tokens
    # of is prefilled there (0: never)
    conditional_prefill_tokens: int = 128
    # disaggregated, local backend: prefill and decode instances on the same CPU cores run
    # their steps one at a time, a waiting prefill step first (engine/turns.py). None: where
    # their cores overlap; True: every prefill and decode instance; False: never
    time_share_cores: bool | None = None
    # weights of every phase that sets none of its own: auto (a GGUF's quantized matrices kept
    # quantized on CPU, a float checkpoint float), none (all float), int8 (per channel) or int4
    # (groups of 32), quantized at load
    quantization: str = "auto"

    def __post_init__(self) -> None:
        self.mode = Mode.parse(self.mode, "mode")

    def validate(self) -> None:
        self.mode = Mode.parse(self.mode, "mode")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be a power of two up to 256, got {self.block_size}.")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}.")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {KV_TRANSPORTS}, got {self.kv_transport!r}.")
        if self.backend not in ("local", "ray"):
            raise ValueError(f"backend must be 'local' or 'ray', got {self.backend!r}.")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}.")
        if self.routing_policy not in ("cache-aware", "least-loaded"):
            raise ValueError(f"routing_policy must be 'cache-aware' or 'least-loaded', got {self.routing_policy!r}.")
        if not isinstance(self.conditional_prefill_tokens, int) or self.conditional_prefill_tokens < 0:
            raise ValueError(f"conditional_prefill_tokens must be an integer >= 0, got {self.conditional_prefill_tokens!r}.")
        if self.time_share_cores not in (None, True, False):
            raise ValueError(f"time_share_cores must be true, false or null (where cores overlap), got {self.time_share_cores!r}.")
        if self.time_share_cores and self.backend != "local":
            raise ValueError("time_share_cores needs the local backend (instances on one machine); "
                             "leave it unset or false with backend='ray'.")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be an integer >= 0, got {self.max_restarts!r}.")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}.")
        if not self.restart_window > 0:
            raise ValueError(f"restart_window must be > 0 seconds, got {self.restart_window!r}.")
        for phase in self.phases():
            self.phase(phase).validate(phase)

    def phases(self) -> tuple[Role, ...]:
        """The phases whose instances this mode runs."""
        return Mode(self.mode).phases

    def phase(self, role: Role) -> PhaseConfig:
        """The settings of the instances of one phase."""
        return getattr(self, Role(role).value)

    def num_devices(self) -> int:
        """Devices (GPUs, or CPU worker processes) the deployment occupies."""
        total = 0
        for phase in self.phases():
            cfg = self.phase(phase)
            total += cfg.num_instances * cfg.tensor_parallel_size * cfg.pipeline_parallel_size
        return total

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeploymentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown deployment keys {sorted(unknown)}; known: {sorted(known)}.")
        kwargs = dict(data)
        phase_fields = {f.name for f in dataclasses.fields(PhaseConfig)}
        for phase in (r.value for r in Role):
            if phase in kwargs and isinstance(kwargs[phase], dict):
                bad = set(kwargs[phase]) - phase_fields
                if bad:
                    raise ValueError(f"unknown {phase} keys {sorted(bad)}; known: {sorted(phase_fields)}.")
                kwargs[phase] = PhaseConfig(**kwargs[phase])
        config = cls(**kwargs)
        config.validate()
        return config

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DeploymentConfig:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"placement file {path} does not exist.") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"placement file {path} is not valid JSON: {exc}.") from None
        if "deployment" in data:  # the planner's file carries its predictions beside it
            data = data["deployment"]
        return cls.from_dict(data)


@dataclass
class ModelConfig:
    """The model as the engine sees it: its Hugging Face config and where the weights are."""

    name: str
    path: str
    gguf_file: str | None
    hf_config: PretrainedConfig
    dtype: torch.dtype
    max_model_len: int

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        return archs[0] if archs else self.hf_config.model_type

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_attention_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.hf_config.hidden_size

    @property
    def head_dim(self) -> int:
        return getattr(self.hf_config, "head_dim", None) or self.hidden_size // self.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    def kv_bytes_per_token(self) -> int:
        """2 (K and V) x layers x KV heads x head dim x dtype bytes."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


@dataclass
class InstanceConfig:
    """One instance's settings, resolved from its phase (what its process is started with)."""

    name: str
    role: Role
    phase: PhaseConfig
    block_size: int
    device: str
    num_threads: int
    cpu_cores: list[int] | None
    seed: int
    swap_space_gb: float
    chunked_prefill: bool = False
    gpu_ids: list[int] | None = None  # one per worker, on CUDA
    kv_transport: str = "auto"
    kv_group: Any = None  # KVGroupSpec of the deployment's KV transfer group, when it has one
    step_log: str | None = None  # folder of the per-step log (DeploymentConfig.step_log)
    enable_prefix_caching: bool = False
    # run steps in turns with the other phase's instances on the same cores (engine/turns.py);
    # the local backend then sets `turns_dir`, its run folder, which holds the lock files
    take_turns: bool = False
    turns_dir: str | None = None

    def __post_init__(self) -> None:
        self.role = Role(self.role)

    @property
    def num_workers(self) -> int:
        return self.phase.tensor_parallel_size * self.phase.pipeline_parallel_size

    def for_worker(self, rank: int) -> InstanceConfig:
        """This instance's settings as worker `rank` runs them: its share of the cores, its GPU."""
        cores = self.cpu_cores
        if cores and self.num_workers > 1:
            per = max(1, len(cores) // self.num_workers)
            cores = cores[rank * per : (rank + 1) * per] or cores
        device = f"cuda:{self.gpu_ids[rank]}" if self.gpu_ids else self.device
        return dataclasses.replace(self, cpu_cores=cores, device=device)

    @property
    def cores_in_use(self) -> set[int]:
        """The CPU cores its workers run on: those it is pinned to, else (on CPU, with more
        workers than cores) every core this process may use; none on a GPU."""
        if self.cpu_cores:
            return set(self.cpu_cores)
        return set(available_cores()) if self.device == "cpu" else set()

    @property
    def max_num_seqs(self) -> int:
        return self.phase.max_num_seqs

    @property
    def preemption_mode(self) -> PreemptionMode:
        # A decode instance never re-runs a prefill silently: it swaps by default.
        if self.phase.preemption_mode is not None:
            return PreemptionMode(self.phase.preemption_mode)
        return PreemptionMode.SWAP if self.role is Role.DECODE else PreemptionMode.RECOMPUTE


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device; use device='cpu'.")
    return device


def resolve_dtype(dtype: str, device: str, hf_config: PretrainedConfig) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if device == "cpu":
        return torch.float32  # no native bf16/fp16 on this class of CPU: fp32 is the fast dtype
    config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = DTYPES.get(config_dtype)
    return config_dtype if config_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def available_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def batched_token_budget(phase: PhaseConfig, mode: Mode) -> int:
    """Tokens one step of the phase's instances may compute: its setting, or the mode's default."""
    if phase.max_num_batched_tokens is not None:
        return phase.max_num_batched_tokens
    return DEFAULT_CHUNK_SIZE if mode is Mode.CHUNKED else DEFAULT_BATCHED_TOKENS


def resolve_instances(config: DeploymentConfig, model: ModelConfig) -> list[InstanceConfig]:
    """One `InstanceConfig` per instance, with step limits filled in and CPU cores split.

    On CPU, instances that name no cores share the machine's cores evenly (1 prefill + 1
    decode on 2 cores get one core each); a colocated instance alone gets all of them.
    """
    device = resolve_device(config.device)
    specs: list[tuple[str, Role, PhaseConfig]] = []
    for phase in config.phases():
        cfg = config.phase(phase)
        for i in range(cfg.num_instances):
            specs.append((f"{phase}-{i}", phase, cfg))
    cores = available_cores()
    workers = sum(c.tensor_parallel_size * c.pipeline_parallel_size for _, _, c in specs)
    per_worker = max(1, len(cores) // max(1, workers))
    instances: list[InstanceConfig] = []
    next_core = next_gpu = 0
    for name, role, cfg in specs:
        phase = dataclasses.replace(cfg, max_num_batched_tokens=batched_token_budget(cfg, config.mode),
                                    quantization=cfg.quantization or config.quantization)
        if phase.cpu_cores is not None:
            instance_cores = list(phase.cpu_cores)
        elif device == "cpu" and workers > 1 and len(cores) >= workers:
            n = per_worker * phase.tensor_parallel_size * phase.pipeline_parallel_size
            instance_cores = cores[next_core : next_core + n]
            next_core += n
        else:
            instance_cores = None
        threads = phase.num_threads or (
            max(1, len(instance_cores) // (phase.tensor_parallel_size * phase.pipeline_parallel_size))
            if instance_cores
            else max(1, len(cores) // max(1, workers))
        )
        instance = InstanceConfig(
            name=name,
            role=role,
            phase=phase,
            block_size=config.block_size,
            device=device,
            num_threads=threads,
            cpu_cores=instance_cores,
            seed=config.seed,
            swap_space_gb=config.swap_space_gb,
            chunked_prefill=config.mode is Mode.CHUNKED,
            kv_transport=config.kv_transport,
            step_log=config.step_log,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        if device == "cuda":
            # workers take the GPUs in turn (instances share them when there are fewer)
            instance.gpu_ids = [(next_gpu + r) % torch.cuda.device_count() for r in range(instance.num_workers)]
            next_gpu += instance.num_workers
        instances.append(instance)
    mark_turns(instances, config)
    return instances


def mark_turns(instances: list[InstanceConfig], config: DeploymentConfig) -> None:
    """Have the prefill and decode instances that share CPU cores take turns by step (all of
    them with `time_share_cores=True`)."""
    if config.time_share_cores is False or config.backend != "local" or config.mode is not Mode.DISAGGREGATED:
        return
    for instance in instances:
        others = [o for o in instances if o.role is not instance.role]
        instance.take_turns = bool(config.time_share_cores) or any(instance.cores_in_use & o.cores_in_use for o in others)


def build_deployment(
    model: str | None = None,
    mode: Mode | str = DEFAULT_MODE,
    *,
    num_instances: int | None = None,
    num_prefill_instances: int | None = None,
    num_decode_instances: int | None = None,
    prefill: PhaseConfig | dict[str, Any] | None = None,
    decode: PhaseConfig | dict[str, Any] | None = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int | None = None,
    kv_cache_gb: float | None = None,
    num_kv_blocks: int | None = None,
    preemption_mode: PreemptionMode | str | None = None,
    num_threads: int | None = None,
    **common: Any,
) -> DeploymentConfig:
    """A deployment from the flat keyword arguments of `LLM(...)`.

    The flat per-instance settings apply to every instance; in disaggregated mode `prefill`
    and `decode` (a PhaseConfig, or a dict of its fields over the flat settings) override
    them per phase. An instance count comes from `num_*_instances`, else from the phase's
    own `num_instances`, else 1; giving both, different, is an error.
    """
    base = PhaseConfig(
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_gb=kv_cache_gb,
        num_kv_blocks=num_kv_blocks,
        preemption_mode=preemption_mode,
        num_threads=num_threads,
    )
    phase_fields = {f.name for f in dataclasses.fields(PhaseConfig)}

    def phase(name: str, count: int | None, override: PhaseConfig | dict[str, Any] | None) -> PhaseConfig:
        if isinstance(override, PhaseConfig):
            cfg = dataclasses.replace(override)
            own = override.num_instances if override.num_instances != 1 else None
        else:
            fields = dict(override or {})
            unknown_keys = set(fields) - phase_fields
            if unknown_keys:
                raise ValueError(f"unknown {name} settings {sorted(unknown_keys)}; known: {sorted(phase_fields)}.")
            own = fields.pop("num_instances", None)
            cfg = dataclasses.replace(base, **fields)
        if count is not None and own is not None and count != own:
            raise ValueError(f"num_{name}_instances={count} contradicts {name}.num_instances={own}; give one of them.")
        cfg.num_instances = count if count is not None else own if own is not None else 1
        return cfg

    known = {f.name for f in dataclasses.fields(DeploymentConfig)} - {r.value for r in Role} - {"model", "mode"}
    unknown = set(common) - known
    if unknown:
        raise TypeError(f"unexpected arguments {sorted(unknown)}")
    config = DeploymentConfig(
        model=model,
        mode=Mode.parse(mode, "mode"),
        prefill=phase("prefill", num_prefill_instances, prefill),
        decode=phase("decode", num_decode_instances, decode),
        colocated=phase("colocated", num_instances, None),
        **common,
    )
    config.validate()
    return config


def deployment_from(
    model: str | None, mode: Mode | str, config: DeploymentConfig | str | None, kwargs: dict[str, Any]
) -> DeploymentConfig:
    """The deployment `LLM(...)` and `AsyncLLM(...)` describe: a whole `config` (or the path of a
    placement file), its model replaced by `model` if given; else the flat keyword arguments."""
    if config is None:
        return build_deployment(model, mode, **kwargs)
    if kwargs:
        raise TypeError(f"give config= or deployment arguments, not both (got {sorted(kwargs)} with config).")
    deployment = dataclasses.replace(config) if isinstance(config, DeploymentConfig) else DeploymentConfig.load(config)
    if model is not None:
        deployment.model = model
    deployment.validate()
    return deployment
