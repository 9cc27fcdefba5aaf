"""Paged KV cache accounting: a pool of fixed-size blocks and per-request block tables."""

from __future__ import annotations

from collections import deque

from distserve.request import Request


class BlockManager:
    """Hands out and takes back blocks of `block_size` token slots.

    A request's `block_table[i]` holds its tokens [i * block_size, (i + 1) * block_size).
    The same class accounts for swap space (a second pool) when preemption swaps.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_missing(self, table: list[int], num_tokens: int) -> int:
        """Blocks a table of `len(table)` blocks still needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    def can_grow(self, table: list[int], num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_missing(table, num_tokens) + reserve <= len(self._free)

    def grow(self, table: list[int], num_tokens: int) -> list[int]:
        """Extend `table` in place to cover `num_tokens` tokens; returns the new blocks."""
        missing = self.blocks_missing(table, num_tokens)
        if missing > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {missing}, {len(self._free)} free")
        new = [self._free.popleft() for _ in range(missing)]
        table.extend(new)
        return new

    def allocate(self, num_blocks: int) -> list[int]:
        table: list[int] = []
        self.grow(table, num_blocks * self.block_size)
        return table

    def free(self, table: list[int]) -> None:
        self._free.extend(table)
        table.clear()

    def free_request(self, request: Request) -> None:
        self.free(request.block_table)
