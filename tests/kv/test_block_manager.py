"""The prefix cache's accounting: names, references, eviction order, partial blocks."""

from __future__ import annotations

import pytest

from distserve.kv.block_manager import BlockManager, prefix_hashes

BS = 4


def admit(blocks: BlockManager, tokens: list[int]) -> tuple[list[int], int]:
    """What the scheduler does for a new request: take its cached prefix, grow, name its full
    blocks; its table and the tokens it found cached."""
    hashes = prefix_hashes(tokens, BS)
    table = blocks.cached_prefix(tokens, hashes, len(tokens) - 1)
    blocks.take(table, len(tokens) - 1)
    cached = len(table) * BS
    blocks.grow(table, len(tokens))
    blocks.cache_blocks(table, tokens, hashes, len(table) if cached else 0, len(tokens))
    return table, cached


def test_a_second_request_with_the_same_prompt_shares_all_but_its_last_block() -> None:
    blocks = BlockManager(16, BS, enable_caching=True)
    prompt = list(range(100, 110))  # 2 full blocks and a partial one
    first, cached = admit(blocks, prompt)
    assert cached == 0 and len(first) == 3
    second, cached = admit(blocks, prompt)
    assert cached == 8 and second[:2] == first[:2] and second[2] != first[2]  # the partial block is its own
    assert blocks._refs[first[0]] == 2
    # a prompt of whole blocks computes its last block again (its last token's logits)
    whole = list(range(200, 208))
    a, _ = admit(blocks, whole)
    b, cached = admit(blocks, whole)
    assert cached == 4 and b[0] == a[0] and b[1] != a[1]


def test_a_differing_token_or_parent_is_a_miss() -> None:
    blocks = BlockManager(16, BS, enable_caching=True)
    admit(blocks, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    _, cached = admit(blocks, [1, 2, 3, 4, 5, 6, 7, 0, 9])
    assert cached == 4  # the first block only
    _, cached = admit(blocks, [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert cached == 0  # same second block, other parent
    assert prefix_hashes([5, 6, 7, 8] * 2, BS)[1] != prefix_hashes([5, 6, 7, 8], BS)[0]


def test_freed_cached_blocks_stay_until_needed_and_go_least_recently_used_first() -> None:
    blocks = BlockManager(6, BS, enable_caching=True)
    old, _ = admit(blocks, [1] * 5)  # a named block and a partial one
    new, _ = admit(blocks, [2] * 5)
    oldest = old[0]
    blocks.free(old)
    blocks.free(new)
    assert blocks.num_free_blocks == 6 and blocks.num_cached_blocks == 2
    # the two never-used blocks first, then the partial ones (never named), then the oldest named
    taken = blocks.allocate(5)
    assert blocks.num_cached_blocks == 1 and oldest in taken
    blocks.free(taken)
    _, cached = admit(blocks, [2] * 5)
    assert cached == 4  # the newer one survived


def test_references_free_exactly_once_each() -> None:
    blocks = BlockManager(8, BS, enable_caching=True)
    prompt = [3] * 9
    a, _ = admit(blocks, prompt)
    b, _ = admit(blocks, prompt)
    c, _ = admit(blocks, prompt)
    assert blocks.num_free_blocks == 8 - 5  # 2 shared + 3 partial
    blocks.free(b)
    assert blocks.num_free_blocks == 8 - 4 and blocks._refs[a[0]] == 2
    blocks.free(a)
    blocks.free(c)
    assert blocks.num_free_blocks == 8 and not blocks._refs


def test_no_caching_hands_blocks_out_as_before() -> None:
    blocks = BlockManager(4, BS)
    assert admit(blocks, [1] * 5) == ([0, 1], 0) and admit(blocks, [1] * 5) == ([2, 3], 0)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        blocks.allocate(1)
