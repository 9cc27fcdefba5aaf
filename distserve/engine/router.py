"""Where each request goes: which instance prefills its prompt, which decode instance takes it.

The router keeps each instance's load as the controller sees it (prompt tokens sent and not
prefilled yet, requests assigned, KV blocks promised to migrations not pulled yet, free
blocks as last reported) and, for prefix caching, an approximate index of the blocks it
caches (the names of the full blocks of the prompts sent to it and of the requests finished
on it, as many as it has blocks, least recently used forgotten first). Named policies:

    least-loaded   prompts to the prefill instance with the fewest queued prompt tokens (the
                   colocated instance with the fewest requests); prefilled requests to the
                   decode instance with the most free KV blocks
    cache-aware    prompts to the instance where the request's first token comes soonest:
                   the least work ahead of it in prompt tokens, what is queued there plus its
                   own tokens that instance does not cache (so a cached prefix weighs as much
                   as that much queue), among the instances within BALANCE_SLACK requests of
                   the least loaded; prefilled requests to the decode instance that holds the
                   longest prefix of them (fewest blocks to pull: the one that served the
                   conversation's last turn) among those with room, else the one with the most
                   free blocks

Conditional disaggregation (cache-aware, disaggregated): a prompt whose prefix a decode
instance holds already, all but at most `conditional_prefill_tokens` of it (twice that while
the prefill instances have more than 8x that many tokens queued), is prefilled on that decode
instance itself instead of moving through a prefill instance. So is one whose uncached suffix
there is longer, up to 4x that limit, when a prefill instance would have at least twice as
many tokens ahead of its first token (its queue and the prompt tokens it does not cache): the
next turn of a conversation, whose last answer only the decode instance holds. Where the
phases share their cores and take turns by step (`shared_cores`, engine/turns.py), a prompt
prefills as fast on either, so it goes to the decode instance whenever that leaves no more
tokens ahead of its first token than a prefill instance would.

The engine's controller and the planner's simulator both route through this class.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from distserve.config import NamedEnum, Role
from distserve.kv.block_manager import prefix_hashes

BALANCE_SLACK = 4  # requests an instance may have over the least loaded and still be chosen for its cache


class RoutingPolicy(NamedEnum):
    LEAST_LOADED = "least-loaded"
    CACHE_AWARE = "cache-aware"


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
    cached: OrderedDict[int, None] = field(default_factory=OrderedDict)  # block names it likely caches, LRU first

    @property
    def free_blocks(self) -> int:
        free = self.num_blocks if self.reported_free_blocks is None else self.reported_free_blocks
        return free - self.promised_blocks

    def remember(self, hashes: list[int]) -> None:
        """These blocks are (or will soon be) in its cache."""
        for digest in hashes:
            self.cached[digest] = None
            self.cached.move_to_end(digest)
        while len(self.cached) > self.num_blocks:
            self.cached.popitem(last=False)

    def cached_tokens(self, hashes: list[int]) -> int:
        """Tokens of the longest prefix of these blocks it likely caches."""
        n = 0
        for digest in hashes:
            if digest not in self.cached:
                break
            n += 1
        return n * self.block_size


class Router:
    def __init__(
        self, instances: list[InstanceLoad], policy: RoutingPolicy = RoutingPolicy.LEAST_LOADED, conditional_prefill_tokens: int = 0,
        shared_cores: bool = False,
    ) -> None:
        self.policy = RoutingPolicy(policy)
        self.conditional_prefill_tokens = conditional_prefill_tokens
        self.shared_cores = shared_cores
        self.instances = {i.name: i for i in instances}
        # the cache index only serves a choice: between instances of a role, or of where to prefill
        prompt_roles = [i for i in instances if i.role.takes_prompts]
        decode = [i for i in instances if i.role is Role.DECODE]
        self.indexed = self.policy is RoutingPolicy.CACHE_AWARE and (
            len(prompt_roles) > 1 or len(decode) > 1 or bool(conditional_prefill_tokens and decode)
        )

    def alive(self, role: Role) -> list[InstanceLoad]:
        return [i for i in self.instances.values() if i.role is role and i.alive]

    def prompt_instances(self) -> list[InstanceLoad]:
        """The live instances new requests go to."""
        return [i for i in self.instances.values() if i.role.takes_prompts and i.alive]

    def hashes(self, token_ids: list[int], known: list[int] | None = None) -> list[int]:
        """The block names of `token_ids` the routing weighs (extending `known`), or none
        when no choice depends on them."""
        if not self.indexed:
            return []
        return prefix_hashes(token_ids, next(iter(self.instances.values())).block_size, known)

    # -- decisions -----------------------------------------------------------------------------
    def route_prompt(
        self, request_id: str, token_ids: list[int], hashes: list[int], max_queued: int | None = None
    ) -> InstanceLoad | None:
        """The instance that prefills a new request (`hashes`: its prompt's, `hashes()`),
        charged with its prompt; None when none is alive, or none has fewer than `max_queued`
        prompts waiting."""
        candidates = [i for i in self.prompt_instances() if max_queued is None or len(i.queued) < max_queued]
        if not candidates:
            return None
        target = self._conditional_target(token_ids, hashes, candidates)
        if target is None and self.policy is RoutingPolicy.CACHE_AWARE:
            fewest = min(len(i.assigned) for i in candidates)
            balanced = [i for i in candidates if len(i.assigned) <= fewest + BALANCE_SLACK]
            target = min(balanced, key=lambda i: (i.queued_tokens + len(token_ids) - i.cached_tokens(hashes), len(i.assigned)))
        elif target is None and candidates[0].role is Role.PREFILL:
            target = min(candidates, key=lambda i: (i.queued_tokens, len(i.assigned)))
        elif target is None:
            target = min(candidates, key=lambda i: (len(i.assigned), i.queued_tokens))
        target.assigned.add(request_id)
        target.queued[request_id] = len(token_ids)
        target.queued_tokens += len(token_ids)
        target.remember(hashes)
        return target

    def _conditional_target(self, token_ids: list[int], hashes: list[int], prefill: list[InstanceLoad]) -> InstanceLoad | None:
        """A decode instance that caches all but a short suffix of the prompt, if any."""
        limit = self.conditional_prefill_tokens
        if not limit or not hashes or prefill[0].role is not Role.PREFILL:
            return None
        if min(i.queued_tokens for i in prefill) > 8 * limit:
            limit *= 2  # the prefill instances are backed up
        best = max(self.alive(Role.DECODE), key=lambda i: i.cached_tokens(hashes), default=None)
        if best is None:
            return None
        cached = best.cached_tokens(hashes)
        if not cached or best.free_blocks < -(-(len(token_ids) + 1) // best.block_size):
            return None
        suffix = len(token_ids) - cached
        if suffix <= limit:
            return best
        remote = min(i.queued_tokens + len(token_ids) - i.cached_tokens(hashes) for i in prefill)
        if self.shared_cores:
            return best if suffix <= remote else None
        return best if suffix <= 4 * limit and 2 * suffix <= remote else None

    def route_decode(self, request_id: str, token_ids: list[int], hashes: list[int]) -> InstanceLoad | None:
        """The decode instance for a prefilled request (`token_ids`: its prompt; `hashes`: their
        names), charged with the blocks it will take (its next token's slot included); None when
        none is alive."""
        candidates = self.alive(Role.DECODE)
        if not candidates:
            return None
        needed = -(-(len(token_ids) + 1) // candidates[0].block_size)
        roomy = [i for i in candidates if i.free_blocks >= needed]
        if hashes and roomy:
            target = max(roomy, key=lambda i: (i.cached_tokens(hashes), i.free_blocks, -len(i.assigned)))
        else:
            target = max(candidates, key=lambda i: (i.free_blocks, -len(i.assigned)))
        target.assigned.add(request_id)
        target.promised[request_id] = needed
        target.promised_blocks += needed
        target.remember(hashes)
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

    def finished(self, name: str, request_id: str, hashes: list[int]) -> None:
        """The request ended on the instance, which caches its blocks now (`hashes`: the names
        of all its tokens but the last, which has no KV)."""
        self.unassign(name, request_id)
        self.instances[name].remember(hashes)

    def unassign(self, name: str, request_id: str) -> None:
        """The request's KV is no longer on the instance (finished, moved or aborted)."""
        self.prefilled(name, request_id)
        self.pulled(name, request_id)
        self.instances[name].assigned.discard(request_id)

    def reset(self, name: str, num_blocks: int, alive: bool) -> None:
        """The instance (re)started, or died: none of the requests it had are there any more."""
        old = self.instances[name]
        self.instances[name] = InstanceLoad(name, old.role, num_blocks, old.block_size, alive)

    def forget_cached(self) -> None:
        """The instances' prefix caches were emptied (`reset_prefix_cache`)."""
        for load in self.instances.values():
            load.cached.clear()

    def report_free_blocks(self, name: str, free_blocks: int) -> None:
        self.instances[name].reported_free_blocks = free_blocks
