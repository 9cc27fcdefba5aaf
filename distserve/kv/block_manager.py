"""Paged KV cache accounting: a pool of fixed-size blocks, per-request block tables, and the
prefix cache.

A request's `block_table[i]` holds its tokens [i * block_size, (i + 1) * block_size).

Prefix caching (automatic, as vLLM and SGLang do it): a full block is named by the hash of its
tokens and of the block before it (`block_hash`), so equal names mean equal prefixes. Blocks
are reference-counted; a request that starts with tokens whose blocks are cached takes those
blocks (one more reference each) instead of computing them. A block whose last reference goes
stays cached and is evicted, least recently used first, only when a block is needed and none
is free otherwise. A partial last block is never shared: it is named only once full.

    allocated (refs >= 1) ──last ref freed──> evictable (cached) ──taken again──> allocated
                                │                     └──needed by another──> evicted: free
                                └── (not cached) ──> free

Blocks never handed out go first, counted rather than listed (a pool may be as large as the
planner's simulator makes it); then free ones, oldest freed first; then evictable ones. The
same class accounts for swap space (a second pool, no caching).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """The name of a full block: its tokens and the name of the block before it."""
    return hash((parent, tuple(tokens)))


def prefix_hashes(
    token_ids: Sequence[int], block_size: int, start: list[int] | None = None, num_tokens: int | None = None
) -> list[int]:
    """The names of the full blocks of `token_ids` (of its first `num_tokens`), extending
    `start` (names already known; returned as is when nothing is to add)."""
    hashes = start if start is not None else []
    end = (len(token_ids) if num_tokens is None else num_tokens) // block_size
    if len(hashes) >= end:
        return hashes
    hashes = list(hashes)
    parent = hashes[-1] if hashes else None
    for i in range(len(hashes), end):
        parent = block_hash(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._fresh = 0  # blocks [_fresh, num_blocks) were never handed out
        self._freed: deque[int] = deque()  # free, holding nothing cached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, no reference: LRU first
        self._refs: dict[int, int] = {}  # handed-out block -> references
        self._cached: dict[int, int] = {}  # block hash -> block
        self._hash_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> (its hash, its tokens)
        self.num_queried_tokens = 0  # prefix cache lookups, in tokens
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request can get: free ones and cached ones no request holds."""
        return self.num_blocks - self._fresh + len(self._freed) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_missing(self, table: list[int], num_tokens: int) -> int:
        """Blocks a table of `len(table)` blocks still needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    def can_grow(self, table: list[int], num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_missing(table, num_tokens) + reserve <= self.num_free_blocks

    def grow(self, table: list[int], num_tokens: int) -> list[int]:
        """Extend `table` in place to cover `num_tokens` tokens; returns the new blocks."""
        missing = self.blocks_missing(table, num_tokens)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {missing}, {self.num_free_blocks} free")
        fresh = min(missing, self.num_blocks - self._fresh)
        new = list(range(self._fresh, self._fresh + fresh))
        self._fresh += fresh
        for _ in range(missing - fresh):
            new.append(self._freed.popleft() if self._freed else self._evict())
        for block in new:
            self._refs[block] = 1
        table.extend(new)
        return new

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        digest, _ = self._hash_of.pop(block)
        del self._cached[digest]
        return block

    def allocate(self, num_blocks: int) -> list[int]:
        table: list[int] = []
        self.grow(table, num_blocks * self.block_size)
        return table

    def free(self, table: list[int]) -> None:
        """Drop a reference to each block; a block left with none is free, or evictable if
        it is cached. A table's last blocks go first in the eviction order (a longer prefix
        is less likely to be asked for again)."""
        for block in reversed(table):
            refs = self._refs.pop(block) - 1
            if refs:
                self._refs[block] = refs
            elif block in self._hash_of:
                self._evictable[block] = None
            else:
                self._freed.append(block)
        table.clear()

    # -- the prefix cache ---------------------------------------------------------------------
    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (as vLLM's `reset_prefix_cache`: between benchmark runs,
        or after changing weights). Refused, and False, while a request holds a cached block."""
        if any(block in self._refs for block in self._hash_of):
            return False
        self._freed.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()
        self._hash_of.clear()
        return True

    def cached_prefix(self, token_ids: Sequence[int], hashes: list[int], max_tokens: int) -> list[int]:
        """The cached blocks of the longest prefix of full blocks of `token_ids` within its first
        `max_tokens` tokens; `hashes`: the names of its full blocks (`prefix_hashes`)."""
        if not self.enable_caching:
            return []
        bs = self.block_size
        blocks: list[int] = []
        for i, digest in enumerate(hashes[: max_tokens // bs]):
            block = self._cached.get(digest)
            if block is None or self._hash_of[block][1] != tuple(token_ids[i * bs : (i + 1) * bs]):
                break
            blocks.append(block)
        return blocks

    def num_evictable(self, blocks: list[int]) -> int:
        """Of these cached blocks, those no request holds (taking them leaves fewer free)."""
        return sum(1 for block in blocks if block in self._evictable)

    def take(self, blocks: list[int], queried_tokens: int) -> None:
        """One more reference to each of these cached blocks (a new table starts with them);
        counted as a hit of their tokens out of a query of `queried_tokens`."""
        for block in blocks:
            refs = self._refs.get(block, 0)
            if refs == 0:
                del self._evictable[block]
            self._refs[block] = refs + 1
        self.num_queried_tokens += queried_tokens
        self.num_hit_tokens += len(blocks) * self.block_size

    def cache_blocks(self, table: list[int], token_ids: Sequence[int], hashes: list[int], first: int, num_tokens: int) -> int:
        """Name the full blocks of `table` from index `first` up to `num_tokens` tokens (whose
        KV the step computes), so later requests can take them; a name already cached keeps
        its block. Returns the index of the next block to name."""
        if not self.enable_caching:
            return first
        bs = self.block_size
        last = min(num_tokens // bs, len(table), len(hashes))
        for i in range(first, last):
            block, digest = table[i], hashes[i]
            if digest not in self._cached and block not in self._hash_of:
                self._cached[digest] = block
                self._hash_of[block] = (digest, tuple(token_ids[i * bs : (i + 1) * bs]))
        return max(first, last)
