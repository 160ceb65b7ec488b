"""The buddy allocator (mm/page_alloc.c in spirit): splitting, merging, bulk paths, fragmentation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from thpcow.kernel.constants import MAX_PAGE_ORDER
from thpcow.kernel.errors import InvariantViolation
from thpcow.kernel.page_alloc import PhysMem

N = 1 << 16      # 256 MiB


def test_boot_state_and_split_merge():
    m = PhysMem(N)
    m.check()
    reserved = 1 << MAX_PAGE_ORDER
    assert m.nr_free == N - reserved
    p = m.alloc(0)
    # expand(): one order-10 block became free halves of orders 0..9
    assert [len(m.free_lists[o]) for o in range(MAX_PAGE_ORDER)] == [1] * MAX_PAGE_ORDER
    m.check()
    m.free(p, 0)
    assert all(not m.free_lists[o] for o in range(MAX_PAGE_ORDER))   # merged back whole
    assert m.nr_free == N - reserved
    m.check()


def test_alloc_fails_when_no_block_of_the_order_is_left():
    m = PhysMem(N)
    while m.alloc(9) >= 0:
        pass
    assert m.alloc(9) == -1 and m.nr_free == 0
    assert m.alloc_bulk(1) is None


def test_alloc_bulk_takes_exactly_what_was_asked():
    m = PhysMem(N)
    got = m.alloc_bulk(1000)
    assert len(got) == len(np.unique(got)) == 1000
    assert m.nr_free == N - (1 << MAX_PAGE_ORDER) - 1000
    m.check()
    before = m.nr_free
    assert m.alloc_bulk(before + 1) is None and m.nr_free == before


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.floats(0, 1)), min_size=1, max_size=80), st.integers(0, 2**31))
def test_free_bulk_equals_freeing_one_by_one(allocs, seed):
    rng = np.random.default_rng(seed)
    a, b = PhysMem(N), PhysMem(N)
    pages = []
    for order, _ in allocs:
        p, q = a.alloc(order), b.alloc(order)
        assert p == q
        pages.extend(range(p, p + (1 << order)))
    pages = np.array(pages, dtype=np.int64)
    sel = pages[rng.random(len(pages)) < 0.7]
    for pfn in sel.tolist():
        a.free(pfn, 0)
    b.free_bulk(sel)
    a.check()
    b.check()
    assert a.nr_free == b.nr_free
    assert (a.free_order == b.free_order).all()


def test_fragment_breaks_pageblocks_and_take_pfn():
    m = PhysMem(N)
    taken = m.fragment(1.0, np.random.default_rng(0))
    assert taken == (N - (1 << MAX_PAGE_ORDER)) // 512
    assert not m.has_free_order(9)
    assert m.nr_free == N - (1 << MAX_PAGE_ORDER) - taken
    m.check()
    assert m.alloc(8) >= 0                       # smaller blocks are still there


def test_check_catches_a_corrupted_free_list():
    m = PhysMem(N)
    pfn = next(iter(m.free_lists[MAX_PAGE_ORDER]))
    m.free_order[pfn] = 3
    with pytest.raises(InvariantViolation, match="free_order"):
        m.check()
