"""Messages between the controller and its instances: plain dataclasses, pickled over pipes.

Two channels, each with its own union:

    controller -> instance   InstanceMessage: AddRequest, MigrateRequest (decode), ReleaseKV
                             (prefill), ConnectSources (decode), AbortRequest, StatsRequest,
                             Shutdown
    instance -> controller   InstanceEvent: InstanceReady, InstanceFailed, InstanceStats,
                             StepOutput (tokens and stage stamps), PrefillDone (a request's KV
                             is ready to pull), MigrationDone, RequestFailed

Both travel in lists: whatever one side has for the other at a time goes in one send.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distserve.config import Role
from distserve.kv.cache import KVCacheHandle
from distserve.sampling_params import SamplingParams


# -- controller -> instance ------------------------------------------------------------------
@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    eos_token_ids: frozenset[int]


@dataclass
class MigrateRequest:
    """To a decode instance: pull this prefilled request's KV from `source` and decode it."""

    request: AddRequest
    output_token_ids: list[int]
    source: str
    source_handles: list[KVCacheHandle]
    source_blocks: list[int]
    num_prefill_preemptions: int = 0


@dataclass
class ConnectSources:
    """To a decode instance, once at start: the caches of every prefill worker it may pull
    from, to map now rather than on the first pull (mapping a shared-memory cache populates
    its page tables: ~0.1 s a GiB)."""

    handles: list[KVCacheHandle]


@dataclass
class ReleaseKV:
    """To a prefill instance: the request's KV was pulled (or is no longer wanted)."""

    request_id: str


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class StatsRequest:
    """Ask an instance for an `InstanceStats` now."""


@dataclass
class ResetPrefixCache:
    """Forget the instance's cached blocks (none if a request holds one); answered with its stats."""


@dataclass
class Shutdown:
    pass


InstanceMessage = (
    AddRequest | MigrateRequest | ConnectSources | ReleaseKV | AbortRequest | StatsRequest | ResetPrefixCache | Shutdown
)


# -- instance -> controller ------------------------------------------------------------------
@dataclass
class InstanceStats:
    name: str
    role: Role
    num_waiting: int
    num_running: int
    num_swapped: int
    num_awaiting_pull: int
    num_pending_migrations: int
    kv_blocks_total: int
    kv_blocks_free: int
    block_size: int
    num_preemptions: int = 0
    num_recomputes: int = 0
    num_swaps: int = 0
    num_steps: int = 0
    num_transfers: int = 0
    transferred_tokens: int = 0
    transferred_bytes: int = 0
    transfer_seconds: float = 0.0
    busy_seconds: float = 0.0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of them, tokens found there (not computed, or not pulled)
    prefix_cache_blocks: int = 0  # blocks the prefix cache names now
    # bytes pulled by each transport that moved some (shm, cuda-ipc, torch)
    transferred_bytes_by_transport: dict[str, int] = field(default_factory=dict)
    weight_bytes: int = 0  # the model weights the instance's driver worker holds in memory

    def snapshot(self) -> InstanceStats:
        """A copy to send: the instance goes on updating its own while a queue's feeder
        thread may still be pickling what was put."""
        snapshot = object.__new__(InstanceStats)
        snapshot.__dict__.update(self.__dict__)
        snapshot.transferred_bytes_by_transport = dict(self.transferred_bytes_by_transport)
        return snapshot


@dataclass
class InstanceReady:
    name: str
    pid: int
    num_blocks: int
    block_size: int
    kv_handles: list[KVCacheHandle]
    load_seconds: float


@dataclass
class InstanceFailed:
    name: str
    error: str  # the traceback
    pid: int = 0  # the process that failed (a restarted instance runs in another)


@dataclass
class TokenOutput:
    request_id: str
    token_id: int
    finish_reason: str | None = None
    stop_reason: int | None = None
    logprob: float | None = None
    rank: int | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class StepOutput:
    """One step of one instance: the tokens it produced, and when."""

    instance: str
    step_start: float
    step_end: float
    tokens: list[TokenOutput] = field(default_factory=list)
    started: list[str] = field(default_factory=list)  # first step of a request on this instance
    cached_tokens: dict[str, int] = field(default_factory=dict)  # of those, prompt tokens found in the prefix cache
    preempted: list[str] = field(default_factory=list)
    stats: InstanceStats | None = None


@dataclass
class PrefillDone:
    """A prefill instance holds this request's KV in `blocks`, ready to be pulled."""

    request_id: str
    instance: str
    blocks: list[int]
    num_tokens: int
    num_preemptions: int


@dataclass
class MigrationDone:
    request_id: str
    instance: str
    source: str
    start: float
    end: float
    num_tokens: int
    num_bytes: int
    transports: tuple[str, ...] = ()  # the transports that moved its KV
    num_pulled_blocks: int = 0
    num_reused_blocks: int = 0  # blocks the decode instance held already (its prefix cache)


@dataclass
class RequestFailed:
    """The instance could not run this request (its step raised with it alone); the instance
    freed its blocks and goes on serving the others."""

    request_id: str
    instance: str
    error: str


InstanceEvent = InstanceReady | InstanceFailed | InstanceStats | StepOutput | PrefillDone | MigrationDone | RequestFailed


# -- controller -> the engine's front (LLMEngine) ------------------------------------------------
@dataclass
class RequestUpdate:
    """News of one request from one event: tokens an instance made at `time`, or the error
    that ended it."""

    request_id: str
    time: float
    tokens: list[TokenOutput] = field(default_factory=list)
    error: str | None = None


@dataclass
class InstanceStatus:
    """An instance as the front shows it (health, metrics): alive or not, and its latest stats."""

    name: str
    role: Role
    alive: bool
    num_blocks: int
    stats: InstanceStats | None
    pid: int  # its driver's process (on the machine it runs on)
    state: str = "running"  # running, restarting or down (`supervisor.InstanceState`)
    restarts: int = 0
