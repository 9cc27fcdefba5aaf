"""Where a worker's KV cache lives on CPU: an instance that shares nothing keeps it in
anonymous memory on 2 MiB boundaries, marked for huge pages where the kernel offers them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distserve.kv.cache import HUGE_PAGE, KVCache, KVLayout

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def smaps_field(address: int, field: str) -> int:
    """`field` of /proc/self/smaps for the mapping of this process that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == f"{field}:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_private_cpu_cache_is_zeroed_and_on_huge_page_boundaries(dtype: torch.dtype) -> None:
    layout = KVLayout(num_blocks=40, block_size=16, layer_start=0, layer_end=3, head_start=0, head_end=4, head_dim=64,
                      dtype=dtype)
    cache = KVCache(layout, "cpu", shared=False)
    assert cache.tensor.shape == layout.shape and cache.tensor.dtype == dtype
    assert cache.tensor.data_ptr() % HUGE_PAGE == 0
    assert cache.tensor.is_contiguous() and not cache.tensor.any()
    k, v = cache.layer(2)
    k[5, 3].fill_(1.5)
    v[7].fill_(-2.0)
    assert float(cache.tensor.sum()) == 1.5 * 4 * 64 - 2.0 * 16 * 4 * 64
    if THP.exists() and "[never]" not in THP.read_text():
        # the mapping is marked for huge pages; whether the kernel finds free 2 MiB pages for it
        # depends on the machine's memory at the time
        assert smaps_field(cache.tensor.data_ptr(), "THPeligible") == 1, "the cache is not marked for huge pages"
