"""Where each request goes: which instance prefills its prompt, which decode instance takes it.

The router keeps each instance's load as the controller sees it (prompt tokens sent and not
prefilled yet, requests assigned, KV blocks promised to migrations not pulled yet, free
blocks as last reported) and applies a named policy:

    least-loaded   prompts to the prefill instance with the fewest queued prompt tokens (the
                   colocated instance with the fewest requests); prefilled requests to the
                   decode instance with the most free KV blocks

The engine's controller and the planner's simulator both route through this class, so a
policy is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distserve.config import NamedEnum, Role


class RoutingPolicy(NamedEnum):
    LEAST_LOADED = "least-loaded"


@dataclass
class InstanceLoad:
    """What the router knows of one instance."""

    name: str
    role: Role
    num_blocks: int
    block_size: int
    alive: bool = True
    reported_free_blocks: int | None = None  # from the instance's latest stats
    queued: dict[str, int] = field(default_factory=dict)  # prompt tokens sent and not prefilled yet
    assigned: set[str] = field(default_factory=set)  # unfinished requests whose KV is or will be here
    promised: dict[str, int] = field(default_factory=dict)  # decode: blocks for migrations not pulled yet
    queued_tokens: int = 0
    promised_blocks: int = 0

    @property
    def free_blocks(self) -> int:
        free = self.num_blocks if self.reported_free_blocks is None else self.reported_free_blocks
        return free - self.promised_blocks


class Router:
    def __init__(self, instances: list[InstanceLoad], policy: RoutingPolicy = RoutingPolicy.LEAST_LOADED) -> None:
        self.policy = RoutingPolicy(policy)
        self.instances = {i.name: i for i in instances}

    def alive(self, role: Role) -> list[InstanceLoad]:
        return [i for i in self.instances.values() if i.role is role and i.alive]

    # -- decisions -----------------------------------------------------------------------------
    def prompt_instances(self) -> list[InstanceLoad]:
        """The live instances new requests go to."""
        return [i for i in self.instances.values() if i.role.takes_prompts and i.alive]

    def route_prompt(self, request_id: str, num_prompt_tokens: int, max_queued: int | None = None) -> InstanceLoad | None:
        """The prefill (or colocated) instance for a new request, charged with its prompt;
        None when none is alive, or none has fewer than `max_queued` prompts waiting."""
        candidates = [i for i in self.prompt_instances() if max_queued is None or len(i.queued) < max_queued]
        if not candidates:
            return None
        if candidates[0].role is Role.PREFILL:
            target = min(candidates, key=lambda i: (i.queued_tokens, len(i.assigned)))
        else:
            target = min(candidates, key=lambda i: (len(i.assigned), i.queued_tokens))
        target.assigned.add(request_id)
        target.queued[request_id] = num_prompt_tokens
        target.queued_tokens += num_prompt_tokens
        return target

    def route_decode(self, request_id: str, num_tokens: int) -> InstanceLoad | None:
        """The decode instance for a prefilled request of `num_tokens` tokens of KV, charged
        with the blocks it will take (its next token's slot included); None when none is alive."""
        candidates = self.alive(Role.DECODE)
        if not candidates:
            return None
        target = max(candidates, key=lambda i: (i.free_blocks, -len(i.assigned)))
        blocks = -(-(num_tokens + 1) // target.block_size)
        target.assigned.add(request_id)
        target.promised[request_id] = blocks
        target.promised_blocks += blocks
        return target

    # -- accounting, as the instances report -------------------------------------------------
    def prefilled(self, name: str, request_id: str) -> None:
        """The instance computed the request's prompt."""
        load = self.instances[name]
        load.queued_tokens -= load.queued.pop(request_id, 0)

    def pulled(self, name: str, request_id: str) -> None:
        """The decode instance pulled the request's KV into blocks it now reports."""
        load = self.instances[name]
        load.promised_blocks -= load.promised.pop(request_id, 0)

    def unassign(self, name: str, request_id: str) -> None:
        """The request's KV is no longer on the instance (finished, moved or aborted)."""
        self.prefilled(name, request_id)
        self.pulled(name, request_id)
        self.instances[name].assigned.discard(request_id)

    def reset(self, name: str, num_blocks: int, alive: bool) -> None:
        """The instance (re)started, or died: none of the requests it had are there any more."""
        old = self.instances[name]
        self.instances[name] = InstanceLoad(name, old.role, num_blocks, old.block_size, alive)

    def report_free_blocks(self, name: str, free_blocks: int) -> None:
        self.instances[name].reported_free_blocks = free_blocks
