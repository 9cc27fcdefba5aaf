"""Paged KV cache accounting: a pool of fixed-size blocks and per-request block tables."""

from __future__ import annotations

from collections import deque


class BlockManager:
    """Hands out and takes back blocks of `block_size` token slots.

    A request's `block_table[i]` holds its tokens [i * block_size, (i + 1) * block_size).
    Blocks never handed out go first, in order, then freed ones, oldest freed first; the
    never-used ones are counted, not listed, so a pool may be as large as the planner's
    simulator makes it. The same class accounts for swap space (a second pool).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._fresh = 0  # blocks [_fresh, num_blocks) were never handed out
        self._freed: deque[int] = deque()

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self._fresh + len(self._freed)

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
        new.extend(self._freed.popleft() for _ in range(missing - fresh))
        table.extend(new)
        return new

    def allocate(self, num_blocks: int) -> list[int]:
        table: list[int] = []
        self.grow(table, num_blocks * self.block_size)
        return table

    def free(self, table: list[int]) -> None:
        self._freed.extend(table)
        table.clear()
